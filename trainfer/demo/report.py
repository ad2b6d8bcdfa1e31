"""The demo's report: ``report.md`` and its PNG plots, drawn from the demo's results.

``write_report(results, directory)`` renders the JSON-able results of :func:`trainfer.demo.pipeline.run`
(see that module for the keys). Plots use matplotlib's object-oriented API on an Agg canvas
(``matplotlib.figure.Figure``): no display, no global backend switch. A section whose step was
skipped says so and why, instead of showing a number.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

Results = Mapping[str, Any]

#: The plot drawn for each results key, by file name.
PLOTS = {
    "training": "training_curves.png",
    "measure": "speed.png",
    "confusion": "confusion_matrix.png",
    "forgot_eval": "forgot_eval.png",
    "serving": "serving.png",
    "pruning": "pruning.png",
}


def write_report(results: Results, directory: str | Path) -> Path:
    """Write ``report.md`` and the plots into ``directory``; return the report's path."""
    directory = Path(directory)
    for key, draw in _DRAWERS.items():
        if key in results:
            _save(draw(results[key]), directory / PLOTS[key])
    sections = [section(results) for section in _SECTIONS]
    path = directory / "report.md"
    path.write_text("\n\n".join(text for text in sections if text) + "\n", "utf-8")
    return path


# ------------------------------------------------------------------ plots
def _figure(width: float = 10, height: float = 4) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _save(figure: Any, path: Path) -> None:
    figure.savefig(path, dpi=110)


def plot_training(training: Results) -> Any:
    """Loss and accuracy per epoch, training vs validation."""
    history = training["history"]
    epochs = [record["epoch"] for record in history]
    figure = _figure()
    loss, accuracy = figure.subplots(1, 2)
    loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train (objective incl. aux head)")
    loss.plot(epochs, [r["val_loss"] for r in history], "o-", label="validation")
    loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    accuracy.plot(epochs, [100 * r["train_accuracy"] for r in history], "o-", label="train (augmented)")
    accuracy.plot(epochs, [100 * r["val_accuracy"] for r in history], "o-", label="validation")
    accuracy.axvline(training["best_epoch"], color="gray", linestyle="--", label="best (saved)")
    accuracy.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for axis in (loss, accuracy):
        axis.grid(alpha=0.3)
        axis.legend()
    return figure


def plot_speed(measure: Results) -> Any:
    """Latency at batch 1 (median, p90 whisker) and throughput at the large batch, per form."""
    forms = measure["forms"]
    names = list(forms)
    figure = _figure()
    latency, throughput = figure.subplots(1, 2)
    medians = [forms[n]["latency_ms"] for n in names]
    whiskers = [forms[n]["latency_p90_ms"] - forms[n]["latency_ms"] for n in names]
    latency.bar(names, medians, yerr=[[0] * len(names), whiskers], capsize=4, color="tab:blue")
    latency.set(ylabel="ms per call (median, p90 whisker)", title="latency, batch 1 (lower is better)")
    throughput.bar(names, [forms[n]["throughput"] for n in names], color="tab:green")
    throughput.set(ylabel="samples / s", title=f"throughput, batch {measure['batch']} (higher is better)")
    for axis in (latency, throughput):
        axis.grid(alpha=0.3, axis="y")
    return figure


def plot_confusion(confusion: Results) -> Any:
    """Counts of (true class, predicted class) on the test set."""
    matrix = confusion["matrix"]
    labels = confusion["labels"]
    figure = _figure(5.5, 5)
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    peak = max(max(row) for row in matrix)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                axis.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    axis.set_xticks(range(len(labels)), labels)
    axis.set_yticks(range(len(labels)), labels)
    axis.set(xlabel="predicted", ylabel="true", title=f"confusion matrix, {confusion['form']} form, test set")
    return figure


def plot_forgot_eval(forgot: Results) -> Any:
    """Accuracy with eval() vs without it per batch size, and how the predicted classes collapse."""
    runs = [forgot["correct"], *forgot["forgot"]]
    names = [run["name"] for run in runs]
    figure = _figure(11, 4)
    accuracy, classes = figure.subplots(1, 2)
    colors = ["tab:green"] + ["tab:red"] * len(forgot["forgot"])
    accuracy.bar(names, [100 * run["accuracy"] for run in runs], color=colors)
    accuracy.set(ylabel="test accuracy (%)", ylim=(0, 100), title="accuracy: eval() vs forgotten eval()")
    accuracy.tick_params(axis="x", labelrotation=15)
    width = 0.8 / len(runs)
    for k, (run, color) in enumerate(zip(runs, ["tab:green", "tab:red", "tab:orange", "tab:purple", "tab:brown"])):
        positions = [c + (k - (len(runs) - 1) / 2) * width for c in range(len(run["predicted_counts"]))]
        classes.bar(positions, run["predicted_counts"], width, label=run["name"], color=color)
    classes.set(xlabel="predicted class", ylabel="test samples", title="predicted classes")
    classes.set_xticks(range(len(forgot["labels"])), forgot["labels"])
    classes.legend(fontsize=8)
    for axis in (accuracy, classes):
        axis.grid(alpha=0.3, axis="y")
    return figure


_DRAWERS: dict[str, Callable[[Results], Any]] = {
    "training": plot_training,
    "measure": plot_speed,
    "confusion": plot_confusion,
    "forgot_eval": plot_forgot_eval,
    "serving": lambda serving: _demo_serving().plot_serving(serving),
    "pruning": lambda pruning: _demo_pruning().plot_pruning(pruning),
}


def _demo_serving() -> Any:
    from trainfer.demo import serving as demo_serving

    return demo_serving


def _demo_pruning() -> Any:
    from trainfer.demo import pruning as demo_pruning

    return demo_pruning


# ------------------------------------------------------------------ markdown
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _percent(value: float) -> str:
    return f"{100 * value:.2f} %"


def _image(key: str, alt: str) -> str:
    return f"![{alt}]({PLOTS[key]})"


def _pixelated(file: str) -> str:
    """An inline 8x8 image drawn large with crisp pixels (HTML, which Markdown renderers pass through)."""
    return f'<img src="{file}" width="40" style="image-rendering: pixelated">'


def _skipped(results: Results, step: str) -> str:
    reason = results.get("skipped", {}).get(step)
    return f"_Skipped: {reason}_" if reason else ""


def _title(results: Results) -> str:
    config = results["config"]
    return (
        "# trainfer demo report\n\n"
        f"`digits_net` on scikit-learn's digits (8x8, 10 classes): {config['train_samples']} training, "
        f"{config['val_samples']} validation and {config['test_samples']} test images; {config['epochs']} epochs, "
        f"seed {config['seed']}, {config['world_size']} process(es) with {config['threads']} torch thread(s) each, "
        f"torch {config['torch']}."
    )


def _training(results: Results) -> str:
    training = results.get("training")
    if training is None:
        return ""
    best = training["history"][training["best_epoch"] - 1]
    return (
        "## 1-2. Training and the training-form bundle\n\n"
        f"Best validation accuracy {_percent(best['val_accuracy'])} at epoch {training['best_epoch']} "
        f"(of {len(training['history'])}); {training['seconds']:.1f} s. The best epoch was saved as the bundle "
        f"`{training['bundle']}`.\n\n" + _image("training", "training curves")
    )


def _deploy(results: Results) -> str:
    deploy = results.get("deploy")
    if deploy is None:
        return "## 3. Deploy\n\n" + _skipped(results, "deploy")
    rows = [[name, f"{counts['train']:,}", f"{counts['deploy']:,}"] for name, counts in deploy["counts"].items()]
    return (
        "## 3. Deploy (automatic folding)\n\n"
        + _table(["", "training form", "deploy form"], rows)
        + f"\n\n```\n{deploy['report']}\n```"
    )


def _agreement(results: Results) -> str:
    agreement = results.get("agreement")
    if agreement is None:
        return "## 4. Do the two forms agree?\n\n" + _skipped(results, "deploy")
    rows = [[form, _percent(accuracy)] for form, accuracy in agreement["accuracy"].items()]
    same = (
        "identical"
        if agreement["identical_classes"]
        else (
            f"different on {agreement['class_differences']} images, {agreement['near_tie_differences']} of them "
            "near-ties (top-2 margin within twice the logits' difference, which rounding breaks either way)"
        )
    )
    return (
        "## 4. Do the two forms agree?\n\n"
        f"On all {agreement['samples']} test images: max |difference| of the logits "
        f"{agreement['max_abs_error']:.2e} (relative to the logit scale {agreement['max_rel_error']:.2e}); "
        f"predicted classes {same}.\n\n" + _table(["form", "test accuracy"], rows)
    )


def _forgot_eval(results: Results) -> str:
    forgot = results.get("forgot_eval")
    if forgot is None:
        return ""
    runs = [forgot["correct"], *forgot["forgot"]]
    rows = [
        [run["name"], _percent(run["accuracy"]), _percent(run["top_class_share"]), f"{run['entropy_bits']:.2f}"]
        for run in runs
    ]
    return (
        "## 5. The classic mistake: forgetting `eval()`\n\n"
        "The same trained model, evaluated on a copy in training mode under `torch.no_grad()`: BatchNorm "
        "normalises each batch with that batch's own statistics and Dropout stays on. Smaller batches "
        "hurt more (a single-image request is normalised against itself). `no_grad` is not `eval()`; "
        "`trainfer.inference(model)` does both.\n\n"
        + _table(["run", "test accuracy", "most common class", "class entropy (bits, max 3.32)"], rows)
        + _guarded(forgot.get("guard_warning"))
        + "\n\n"
        + _image("forgot_eval", "forgot eval comparison")
    )


def _guarded(message: str | None) -> str:
    if message is None:
        return "\n\n`trainfer.guard` raised no warning on these runs."
    quoted = "\n".join(f"> {line}" for line in message.splitlines())
    return f"\n\nWith `trainfer.guard(model)` installed, the mistake does not pass silently:\n\n{quoted}"


def _measure(results: Results) -> str:
    measure = results.get("measure")
    if measure is None:
        return "## 6. Speed and memory\n\n" + _skipped(results, "measure")
    rows = [
        [
            name,
            f"{form['latency_ms']:.3f}",
            f"{form['latency_p90_ms']:.3f}",
            f"{form['throughput']:,.0f}",
            f"{form['speedup_latency']:.1f}x / {form['speedup_throughput']:.1f}x",
            f"{form['parameters']:,}" if form.get("parameters") is not None else "-",
            f"{form['macs']:,}" if form.get("macs") is not None else "-",
        ]
        for name, form in measure["forms"].items()
    ]
    memory = measure["memory"]
    notes = "".join(f"\n\n_{note}_" for note in measure.get("notes", []))
    return (
        "## 6. Speed and memory\n\n"
        + _table(
            [
                "form",
                "latency b=1 (ms, median)",
                "p90 (ms)",
                f"throughput b={measure['batch']} (/s)",
                "vs training form (latency / throughput)",
                "parameters",
                "MACs",
            ],
            rows,
        )
        + f"\n\nPeak tensor memory of one forward pass at batch {measure['batch']} (training form, eval mode): "
        f"{memory['with_grad'] / 2**20:.2f} MiB with gradients vs {memory['inference_mode'] / 2**20:.2f} MiB under "
        "`inference_mode` (no activations kept for backward)."
        + notes
        + "\n\n"
        + _image("measure", "latency and throughput")
    )


def _export(results: Results) -> str:
    predict = results.get("predict")
    export = results.get("export")
    parts = ["## 7. Export and prediction from PNG files"]
    if export is None:
        parts.append(_skipped(results, "export"))
    else:
        parts.append(f"ONNX file `{export['file']}`; max |difference| vs PyTorch {export['max_abs_error']:.2e}.")
    if predict is None:
        parts.append(_skipped(results, "predict"))
    else:
        rows = [
            [
                _pixelated(p["file"]),
                f"`{p['file']}`",
                p["label"],
                p["tensor_class"],
                p["cli_class"],
                f"{p['probability']:.3f}",
            ]
            for p in predict["files"]
        ]
        exact = "exactly" if predict["exact_preprocessing"] else "NOT exactly"
        parts.append(
            f"`{predict['command']}`\n\nThe PNG files map back {exact} to the training tensors "
            "(same 8-bit pixels, same normalisation).\n\n"
            + _table(
                ["digit", "file", "true", "deploy form on the tensor", "`trainfer predict` on the PNG", "probability"],
                rows,
            )
        )
    return "\n\n".join(part for part in parts if part)


def _insight(results: Results) -> str:
    inspect, explain = results.get("inspect"), results.get("explain")
    parts = ["## 8. Inside the model"]
    if inspect is None:
        parts.append(_skipped(results, "inspect"))
    else:
        parts.append(
            f"Where a forgotten `eval()` starts to change the computation (`trainfer.inspect`, train vs eval on "
            f"{inspect['samples']} test images): first divergence at `{inspect['first_divergence']}`.\n\n"
            f"![train vs eval per layer]({inspect['plot']})"
        )
    if explain is None:
        parts.append(_skipped(results, "explain"))
    else:
        parts.append(f"Integrated-gradients heat maps (`Predictor.explain`), {explain['caption']}:")
        parts.append("\n".join(f"![{item['title']}]({item['file']})" for item in explain["files"]))
    return "\n\n".join(parts)


def _sequences(results: Results) -> str:
    """The sequence step's headline (both models, greedy vs beam) and a link to its own report."""
    title = "## Sequences: digit strings, greedy vs beam search"
    found = results.get("sequences")
    if found is None and results["config"].get("sequences", True):
        return ""  # an older results.json, from before the step was part of the demo
    if found is None:
        return f"{title}\n\n_Not run (`--no-sequences`); `trainfer demo --sequences` runs that step alone._"
    rows = [[s["model"], s["decoder"], f"{s['sequence_accuracy']:.3f}", f"{s['cer']:.3f}"] for s in found["scores"]]
    return (
        f"{title}\n\nA CRNN-CTC recogniser and an image-to-sequence encoder-decoder trained on strings of 3 to 6 "
        "training digits, deployed, verified and served from bundles, scored on held-out strings of test "
        f"digits (details, training times and bundles: [{found['report']}]({found['report']})):\n\n"
        + _table(["model", "decoder", "sequence accuracy", "character error rate"], rows)
        + f"\n\n![greedy vs beam]({found['plot']})"
    )


def _confusion(results: Results) -> str:
    return "## Per-class results\n\n" + _image("confusion", "confusion matrix") if "confusion" in results else ""


_SECTIONS: list[Callable[[Results], str]] = [
    _title,
    _training,
    _deploy,
    _agreement,
    _forgot_eval,
    _measure,
    _export,
    _insight,
    _confusion,
    lambda results: _demo_serving().section(results),
    lambda results: _demo_pruning().section(results),
    _sequences,
]

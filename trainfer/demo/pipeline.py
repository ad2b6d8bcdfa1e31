"""``trainfer demo``: train, deploy, prove, measure and report, on the embedded digits data.

The steps, each reading the previous one's artefacts (all written into one output directory):

1. train ``digits_net`` with :func:`trainfer.demo.train.fit` (progress bar per epoch; DDP under torchrun);
2. the best epoch is saved as the training-form bundle ``bundle_train/``;
3. that bundle is loaded and folded by ``trainfer.deploy`` (the automatic folder), saved as ``bundle_deploy/``;
4. both forms run on the whole test set: max logit error, identical classes, accuracy of each;
5. the "forgot ``eval()``" story: a copy run in training mode under ``no_grad``, per batch size;
6. latency (batch 1) and throughput (batch 256) per form, through :mod:`trainfer.bench`, and peak
   memory of a forward pass with gradients vs under ``inference_mode``;
7. ONNX export, and a few test digits written as PNG files predicted by ``trainfer predict``;
8. ``report.md``, its plots and ``results.json``, plus per-layer train/eval divergence
   (``trainfer.inspect``) and explanation heat maps (``Predictor.explain``); unless ``sequences`` is
   off (``--no-sequences``), also the sequence step (:mod:`trainfer.demo.sequences`:
   digit strings, a CRNN-CTC and an encoder-decoder, greedy vs beam) into ``sequences/``, its
   headline in the main report with a link to its own.

The output is built in a temporary directory beside ``--out`` and swapped in only after every
step succeeded, so a failed or interrupted (Ctrl-C) run leaves the previous output as it was.
A step whose optional dependency (``onnx``/``onnxruntime`` for the export, ``captum`` for the heat
maps) is not installed is recorded as skipped, with the reason, in the report; it never shows an
invented number.
"""

from __future__ import annotations

import contextlib
import copy
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn

from trainfer.analysis.inspection import inspect
from trainfer.atomic import DIRECTORY, FILE, recover, remove_staging, replace_directory, staging_directory
from trainfer.bench import Timing, count_macs, count_parameters, num_threads, peak_memory, time_forms
from trainfer.demo import data, sequences
from trainfer.demo.ownership import WRITTEN, OutputLayout
from trainfer.demo.report import PLOTS, write_report
from trainfer.demo.train import fit, logits_of
from trainfer.errors import InputError, ModeWarning
from trainfer.modes.contexts import inference
from trainfer.modes.guard import guard
from trainfer.numerics import relative_error
from trainfer.reparam.deploy import DeployReport, deploy
from trainfer.serve import distributed
from trainfer.serve.bundle import load, save
from trainfer.serve.export import export
from trainfer.serve.onnx_runtime import load_onnx
from trainfer.serve.predictor import Predictor

#: Batch sizes of the "forgot eval()" runs: a single-image request, a small and a large batch.
FORGOT_EVAL_BATCHES = (1, 16, 256)
THROUGHPUT_BATCH = 256
MARKER = "results.json"
#: The most of an existing ``results.json`` read to learn which files the demo wrote (:data:`LAYOUT`); the demo's
#: is about 25 KB.
MAX_MARKER_BYTES = 1 << 20
#: Every entry ``trainfer demo`` writes into its output directory, each with its type: the most a rerun deletes.
#: A subdirectory goes only when it holds nothing but what the demo wrote there (:data:`LAYOUT`); anything else
#: found at the replace, such as a user's file (there before the run or written during it, at the top or in a
#: subdirectory) or a directory under a file's name, keeps the previous output beside it with a warning, never
#: deleted (:func:`_staging`, :data:`trainfer.atomic.OwnFiles`).
OUTPUTS = {
    **dict.fromkeys(
        [MARKER, "report.md", *PLOTS.values(), "inspect_divergence.png", "checkpoint.safetensors", "digits.onnx"], FILE
    ),
    **dict.fromkeys(["bundle_train", "bundle_deploy", "bundle_int8", "digits", "explain", "sequences"], DIRECTORY),
}
#: The demo's output: ``results.json`` records the files the demo wrote into its subdirectories, and
#: ``sequences/`` is the sequence step's output, judged by its own ``scores.json``
#: (:class:`~trainfer.demo.ownership.OutputLayout`).
LAYOUT = OutputLayout(OUTPUTS, MARKER, MAX_MARKER_BYTES, nested={"sequences": sequences.LAYOUT})


@dataclass(frozen=True)
class DemoOptions:
    """What ``trainfer demo`` runs; ``subset`` (first N training images) and ``repeats`` make it quick.

    ``threads``: torch's intra-op threads for the whole run. One is the default: an 8x8 model's
    kernels are too small to share, threads spinning on a busy machine slow training tenfold,
    and a fixed count keeps float reductions, hence the results, the same on every machine.
    """

    out: Path = Path("runs/demo")
    epochs: int = 15
    seed: int = 0
    subset: int | None = None
    batch_size: int = 64
    lr: float = 3e-3
    width: int = 32
    repeats: int = 30
    predict_count: int = 4
    threads: int = 1
    sequences: bool = True


def run(options: DemoOptions, echo: Callable[[str], None] = print) -> Path | None:
    """Run every step; return the report's path on rank 0 (``None`` on other ranks)."""
    device = distributed.setup()
    try:
        with num_threads(options.threads), _staging(Path(options.out)) as work:
            results = _pipeline(options, work, device, echo if distributed.is_main() else _silent)
            distributed.barrier()
        return Path(options.out) / "report.md" if results is not None else None
    finally:
        distributed.cleanup()


def _silent(message: str) -> None:
    """The ``echo`` of ranks other than 0."""


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A fresh directory beside ``out`` (shared by all ranks) that replaces ``out`` on success, deleting only
    the previous output's own entries (:meth:`LAYOUT.own <trainfer.demo.ownership.OutputLayout.own>`)."""
    recover(out / "sequences")  # what a killed `--sequences` run left beside its output
    if out.exists() and not (out / MARKER).is_file() and not _sequences_only(out):
        raise InputError(f"refusing to replace {str(out)!r}: it exists and is not a trainfer demo output")
    work = staging_directory(out) if distributed.is_main() else None
    work = Path(distributed.broadcast_object(str(work)))
    try:
        yield work
        if distributed.is_main():
            replace_directory(work, out, own=LAYOUT.own)
    except BaseException:
        if distributed.is_main():
            remove_staging(work)
        raise


def _sequences_only(out: Path) -> bool:
    """``out`` holds nothing but what ``trainfer demo --sequences`` writes (a proven ``sequences/``)."""
    return [p.name for p in out.iterdir()] == ["sequences"] and sequences.is_output(out / "sequences")


# ------------------------------------------------------------------ the pipeline
def _pipeline(options: DemoOptions, work: Path, device: torch.device, echo: Callable[[str], None]) -> dict | None:
    results: dict[str, Any] = {"config": _config(options), "skipped": {}}
    echo(f"[1/8] training digits_net for {options.epochs} epoch(s) on {results['config']['train_samples']} images")
    results["training"] = _train(options, work, device)
    if not distributed.is_main():
        return None
    bundle = work / "bundle_train"
    trained = load(bundle).eval()
    test = data.splits()["test"]
    inputs, labels = data.normalize(test.pixels), test.labels
    final = Path(options.out)  # where the staged files land once every step has succeeded
    echo(f"[2/8] training-form bundle (best epoch {results['training']['best_epoch']}): {final / bundle.name}")

    echo("[3/8] deploying with trainfer.deploy (automatic folding)")
    deployed = _deploy(trained, inputs, results, echo)
    deploy_bundle = work / "bundle_deploy"
    save(deployed, deploy_bundle, **_bundle_metadata())
    echo(f"      deploy-form bundle: {final / deploy_bundle.name}")
    echo("[4/8] comparing the two forms on the test set")
    predictions = _agreement(trained, deployed, inputs, labels, results)
    results["confusion"] = _confusion(predictions, labels)
    echo("[5/8] the forgotten eval(): the same model in training mode under no_grad")
    results["forgot_eval"] = _forgot_eval(trained, inputs, labels, options.seed)
    echo("[6/8] exporting ONNX; measuring latency, throughput and memory")
    onnx = _optional(results, "export", lambda: _export(deploy_bundle, work, results))
    results["measure"] = _measure(trained, deployed, onnx, inputs, options.repeats)
    echo("[7/8] predicting test digits saved as PNG files through `trainfer predict`")
    served = work / "digits.onnx" if "export" in results else bundle
    _predict_pngs(served, test, predictions, work, options.predict_count, results)
    echo("[8/8] per-layer train/eval divergence, explanations, report")
    _inspect(trained, inputs, work, results)
    _optional(results, "explain", lambda: _explain(bundle, test, predictions, work, results))
    echo("      serving: the auto-chosen runtime and the gated int8 form (trainfer.compile, trainfer.quantize)")
    _optional(results, "serving", lambda: _serving(deploy_bundle, work, (inputs, labels), options.repeats, results))
    echo("      pruning: gated channel pruning, with and without fine-tuning, and pruned + int8 (trainfer.prune)")
    _optional(results, "pruning", lambda: _pruning(deployed, options, (inputs, labels), results))
    if options.sequences:
        echo("      sequences: digit strings, a CRNN-CTC and an encoder-decoder, greedy vs beam search")
        results["sequences"] = _sequences(work / "sequences", options)
    results[WRITTEN] = LAYOUT.written(work)
    (work / MARKER).write_text(json.dumps(results, indent=2), "utf-8")
    write_report(results, work)
    echo(f"report: {final / 'report.md'}  (plots: {', '.join(sorted(p.name for p in work.glob('*.png')))})")
    return results


def _optional(results: dict, step: str, action: Callable[[], Any]) -> Any:
    """Run ``action``; if an optional dependency it needs is missing, record why and go on."""
    try:
        return action()
    except _Unavailable as error:
        results["skipped"][step] = str(error)
        return None


class _Unavailable(Exception):
    """A step cannot run here: an optional dependency it needs is not installed."""


def _need(module: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise _Unavailable(f"{what} needs `{module}`, which is not available here ({error})") from None


def _config(options: DemoOptions) -> dict[str, Any]:
    parts = data.splits()
    return {
        **{key: str(value) if isinstance(value, Path) else value for key, value in asdict(options).items()},
        "train_samples": len(parts["train"].head(options.subset)),
        "val_samples": len(parts["val"]),
        "test_samples": len(parts["test"]),
        "world_size": distributed.world_size(),
        "torch": torch.__version__,
    }


def _train(options: DemoOptions, work: Path, device: torch.device) -> dict[str, Any]:
    from trainfer.models import digits_net

    torch.manual_seed(options.seed)
    model = digits_net(width=options.width).to(device)
    loaders = data.loaders(options.batch_size, options.seed, options.subset)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(options.epochs, 1))
    started = time.perf_counter()
    result = fit(
        model,
        loaders.train,
        loaders.val,
        options.epochs,
        optimizer,
        scheduler=scheduler,
        seed=options.seed,
        checkpoint=work / "checkpoint.safetensors",
        best_bundle=work / "bundle_train",
        bundle_metadata=_bundle_metadata(),
        sync_batchnorm=device.type == "cuda" and distributed.world_size() > 1,
    )
    return {
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "seconds": time.perf_counter() - started,
        "bundle": "bundle_train/",
        "checkpoint": "checkpoint.safetensors",
    }


def _bundle_metadata() -> dict[str, Any]:
    return {"task": "classification", "labels": data.LABELS, "preprocess": data.preprocess_spec()}


_COUNT_LABELS = {
    "parameters": "parameter elements",
    "buffers": "buffer elements",
    "modules": "leaf modules",
    "convolutions": "convolutions run",
    "batch_norms": "batch-norm kernels run",
    "ops": "aten ops run",
}


def _deploy(trained: nn.Module, inputs: Tensor, results: dict, echo: Callable[[str], None]) -> nn.Module:
    """``trainfer.deploy`` by the automatic folder alone (``protocols=False``: the blocks' own
    ``reparameterize`` is not called), verified in float64 and float32 (it raises on a mismatch)."""
    deployed = deploy(trained, (inputs[:8],), protocols=False).eval()
    report = cast(DeployReport, deployed.trainfer_report)
    echo(str(report))
    counts = {
        label: {"train": getattr(report.before, name), "deploy": getattr(report.after, name)}
        for name, label in _COUNT_LABELS.items()
    }
    counts["multiply-adds per image"] = {
        "train": count_macs(trained, inputs[:1]),
        "deploy": count_macs(deployed, inputs[:1]),
    }
    results["deploy"] = {"report": str(report), "counts": counts}
    return deployed


def _agreement(trained: nn.Module, deployed: nn.Module, inputs: Tensor, labels: Tensor, results: dict) -> Tensor:
    """Both forms' logits on the whole test set; returns the deploy form's predicted classes.

    A class may differ only where the training form's top-2 margin is within twice the logits'
    difference (a tie that rounding breaks either way): ``class_differences`` counts differing
    samples, ``near_tie_differences`` those of them at such a margin.
    """
    with inference(trained, deployed):
        reference, candidate = logits_of(trained(inputs)), deployed(inputs)
    max_abs_error = float((candidate - reference).abs().max())
    top2 = reference.topk(2, dim=1).values
    differs = candidate.argmax(1) != reference.argmax(1)
    near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * max_abs_error
    results["agreement"] = {
        "samples": len(labels),
        "max_abs_error": max_abs_error,
        "max_rel_error": relative_error(candidate, reference),
        "identical_classes": not bool(differs.any()),
        "class_differences": int(differs.sum()),
        "near_tie_differences": int((differs & near_tie).sum()),
        "accuracy": {
            "training form (eval)": _accuracy(reference, labels),
            "deploy form": _accuracy(candidate, labels),
        },
    }
    return candidate.argmax(1)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return int((logits.argmax(1) == labels).sum()) / len(labels)


def _confusion(predicted: Tensor, labels: Tensor) -> dict[str, Any]:
    matrix = torch.zeros(data.NUM_CLASSES, data.NUM_CLASSES, dtype=torch.long)
    matrix.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
    return {"matrix": matrix.tolist(), "labels": data.LABELS, "form": "deploy"}


def _forgot_eval(trained: nn.Module, inputs: Tensor, labels: Tensor, seed: int) -> dict[str, Any]:
    """The correct evaluation next to copies run in training mode under ``no_grad``, per batch size;
    each copy under :func:`trainfer.guard`, whose warning the report quotes."""
    with inference(trained):
        correct = _prediction_stats("with eval()", trained(inputs), labels)
    forgot, warned = [], []
    for batch in FORGOT_EVAL_BATCHES:
        mistaken = copy.deepcopy(trained).train()  # a copy: training-mode BatchNorm rewrites its statistics
        with guard(mistaken), warnings.catch_warnings(record=True) as caught, torch.random.fork_rng():
            warnings.simplefilter("always", ModeWarning)
            torch.manual_seed(seed)
            with torch.no_grad():
                logits = torch.cat([logits_of(mistaken(chunk)) for chunk in inputs.split(batch)])
        warned += [str(w.message) for w in caught if issubclass(w.category, ModeWarning)]
        forgot.append(_prediction_stats(f"no eval(), batch {batch}", logits, labels))
    return {"correct": correct, "forgot": forgot, "labels": data.LABELS, "guard_warning": warned[0] if warned else None}


def _prediction_stats(name: str, logits: Tensor, labels: Tensor) -> dict[str, Any]:
    """Accuracy, and how concentrated the predicted classes are (share of the top class, entropy)."""
    counts = torch.bincount(logits.argmax(1), minlength=data.NUM_CLASSES)
    shares = counts[counts > 0].double() / len(labels)
    return {
        "name": name,
        "accuracy": _accuracy(logits, labels),
        "top_class_share": float(counts.max()) / len(labels),
        "entropy_bits": float(-(shares * shares.log2()).sum()),
        "predicted_counts": counts.tolist(),
    }


def _export(bundle: Path, work: Path, results: dict) -> Callable[[Tensor], Tensor]:
    """``digits.onnx`` exported from the deploy-form bundle (``trainfer.export`` checks the file against
    PyTorch; the bundle's manifest, with its preprocessing, travels inside) and a callable on it."""
    _need("onnx", "ONNX export")
    _need("onnxruntime", "running the ONNX file")
    report = export(bundle, work / "digits.onnx", format="onnx")
    results["export"] = {
        "file": "digits.onnx",
        "max_abs_error": report.max_abs_error,
        "max_rel_error": report.max_rel_error,
    }
    return load_onnx(work / "digits.onnx")[0]


def _measure(trained: nn.Module, deployed: nn.Module, onnx: Callable | None, inputs: Tensor, repeats: int) -> dict:
    """Latency at batch 1 and throughput at batch 256 per form; peak memory with and without autograd."""
    one, many = inputs[:1], inputs[:THROUGHPUT_BATCH]
    forms: dict[str, Callable] = {"training form (eval)": trained, "deploy form": deployed}
    if onnx is not None:
        forms["ONNX Runtime"] = onnx
    latency = _interleaved(forms, one, repeats)
    bulk = _interleaved(forms, many, max(3, repeats // 3))
    measured = {
        name: {
            "latency_ms": 1e3 * latency[name].median_s,
            "latency_p90_ms": 1e3 * latency[name].p90_s,
            "throughput": len(many) / bulk[name].median_s,
            "parameters": count_parameters(model) if isinstance(model, nn.Module) else None,
            "macs": count_macs(model, one) if isinstance(model, nn.Module) else None,
        }
        for name, model in forms.items()
    }
    eval_copy = copy.deepcopy(trained).eval()
    with torch.enable_grad():
        with_grad = peak_memory(lambda: eval_copy(many))
    with torch.inference_mode():
        without = peak_memory(lambda: eval_copy(many))
    notes = [] if onnx is not None else ["ONNX Runtime not timed: the export step was skipped (see section 7)."]
    reference = "training form (eval)"
    for name, form in measured.items():  # ratios of figures measured in this one run, interleaved
        form["speedup_latency"] = latency[reference].median_s / latency[name].median_s
        form["speedup_throughput"] = bulk[reference].median_s / bulk[name].median_s
    return {
        "forms": measured,
        "batch": len(many),
        "memory": {"with_grad": with_grad, "inference_mode": without},
        "notes": notes,
    }


def _interleaved(forms: dict[str, Callable], inputs: Tensor, repeats: int, rounds: int = 3) -> dict[str, Timing]:
    """About ``repeats`` timed calls per form, interleaved over ``rounds`` (see :func:`trainfer.bench.time_forms`)."""
    # torch forms are in eval mode; time_forms adds inference_mode
    return time_forms(forms, inputs, rounds=rounds, repeats=max(1, repeats // rounds), warmup=2)


def _predict_pngs(bundle: Path, test: data.Split, predicted: Tensor, work: Path, count: int, results: dict) -> None:
    """Write test digits as PNG files and predict them with the CLI; ``predicted`` are the deploy
    form's classes for the same digits as training tensors (:func:`trainfer.demo.data.normalize`)."""

    directory = work / "digits"
    directory.mkdir()
    chosen = range(count)
    paths = [
        data.save_png(test.pixels[i], directory / f"test{i:03d}_label{int(test.labels[i])}.png", upscale=1)
        for i in chosen
    ]
    command = [sys.executable, "-m", "trainfer", "predict", str(bundle), *map(str, paths), "--format", "jsonl"]
    finished = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env=distributed.single_process_environment()
    )
    if finished.returncode != 0:
        raise RuntimeError(f"`trainfer predict` failed (exit {finished.returncode}): {finished.stderr.strip()[-2000:]}")
    records = [json.loads(line) for line in finished.stdout.splitlines() if line.strip().startswith("{")]
    tensors = data.normalize(test.pixels[list(chosen)])
    results["predict"] = {
        "command": f"trainfer predict {bundle.name} {directory.name}/*.png --format jsonl",
        "served": bundle.name,
        "exact_preprocessing": bool(torch.equal(Predictor.load(bundle).preprocess(paths), tensors)),
        "files": [
            {
                "file": f"{directory.name}/{path.name}",
                "label": int(test.labels[i]),
                "tensor_class": int(predicted[i]),
                "cli_class": int(record["index"]),
                "probability": float(record["probability"]),
            }
            for i, path, record in zip(chosen, paths, records, strict=True)
        ],
    }


def _serving(deploy_bundle: Path, work: Path, test: tuple[Tensor, Tensor], repeats: int, results: dict) -> None:
    """The auto runtime and the int8 form next to the float forms (:mod:`trainfer.demo_serving`)."""
    _need("onnxruntime", "the int8 form")
    from trainfer.demo.serving import serving

    parts = data.splits()
    calibration, validation = data.normalize(parts["train"].pixels), data.normalize(parts["val"].pixels)
    results["serving"] = serving(deploy_bundle, work, (validation, parts["val"].labels), test, calibration, repeats)


def _pruning(deployed: nn.Module, options: DemoOptions, test: tuple[Tensor, Tensor], results: dict) -> None:
    """Pruned, fine-tuned and int8 forms next to the float one (:mod:`trainfer.demo.pruning`)."""
    _need("torch_pruning", "pruning")
    _need("onnxruntime", "the int8 forms")
    from trainfer.demo.pruning import pruning

    parts = data.splits()
    train, val = parts["train"].head(options.subset), parts["val"]
    splits = [(data.normalize(part.pixels), part.labels) for part in (train, val)]
    results["pruning"] = pruning(deployed, splits[0], splits[1], test, options.repeats)


def _sequences(out: Path, options: DemoOptions) -> dict[str, Any]:
    """The sequence step into ``out``; the main report keeps its scores and links to its report."""
    report = sequences.run(out, epochs=min(options.epochs, sequences.EPOCHS), seed=options.seed)
    return {"report": f"{out.name}/report.md", "plot": f"{out.name}/sequences.png", "scores": report["scores"]}


def _inspect(trained: nn.Module, inputs: Tensor, work: Path, results: dict) -> None:
    inspection = inspect(trained, inputs[:64], modes=("train", "eval"))
    inspection.plot(work / "inspect_divergence.png")
    first = inspection.first_divergence
    results["inspect"] = {
        "samples": 64,
        "first_divergence": first.name if first is not None else "(none)",
        "plot": "inspect_divergence.png",
    }


def _explain(bundle: Path, test: data.Split, predicted: Tensor, work: Path, results: dict) -> None:
    """Integrated-gradients heat maps for one correctly and one wrongly classified test digit."""
    _need("captum", "explanations")
    from trainfer.analysis.attribution import explain_to_files

    wrong = (predicted != test.labels).nonzero().flatten().tolist()
    right = (predicted == test.labels).nonzero().flatten().tolist()
    picks = [("correct", right[0])] + ([("misclassified", wrong[0])] if wrong else [])
    directory = work / "explain"
    directory.mkdir()
    paths = [data.save_png(test.pixels[i], directory / f"{kind}_test{i:03d}.png", upscale=1) for kind, i in picks]
    maps = explain_to_files(Predictor.load(bundle), paths, directory / "heatmaps", method="integrated_gradients")
    results["explain"] = {
        "caption": "one correctly classified digit"
        + ("" if wrong else " (no test digit was misclassified)")
        + (" and one misclassified" if wrong else ""),
        "files": [
            {"file": str(path.relative_to(work)), "title": f"{kind} digit (test #{i})"}
            for (kind, i), path in zip(picks, maps, strict=True)
        ],
    }

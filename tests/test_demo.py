import json
import re
import warnings

import pytest
import torch
from agreement import assert_same_classes
from click.testing import CliRunner
from serving_models import Sleeping

import trainfer
from trainfer import WriteWarning, atomic
from trainfer.cli import main
from trainfer.demo import data
from trainfer.demo import pipeline as demo
from trainfer.demo.ownership import WRITTEN
from trainfer.errors import InputError
from trainfer.models import digits_net
from trainfer.modes.contexts import inference
from trainfer.serve.bundle import load
from trainfer.testing import assert_close

pytestmark = pytest.mark.slow  # every test here shares one end-to-end demo run

QUICK = ["--epochs", "1", "--subset", "300", "--repeats", "3", "--no-sequences"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One reduced demo run through the CLI (1 epoch, 300 training images, 3 timed calls)."""
    out = tmp_path_factory.mktemp("runs") / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    return out, result.output, json.loads((out / "results.json").read_text())


def test_every_artefact_exists_and_the_report_links_resolve(demo_run):
    out, printed, results = demo_run
    for name in [
        "report.md",
        "results.json",
        "checkpoint.safetensors",
        "bundle_train/manifest.json",
        "bundle_deploy/manifest.json",
        "digits.onnx",
    ]:
        assert (out / name).is_file(), name
    for plot in [
        "training_curves.png",
        "speed.png",
        "confusion_matrix.png",
        "forgot_eval.png",
        "inspect_divergence.png",
        "pruning.png",
    ]:
        assert (out / plot).stat().st_size > 5_000, plot
    report = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report) + re.findall(r'<img src="([^"]+)"', report)
    assert len(links) >= 9 and all((out / link).is_file() for link in links)
    assert results["skipped"] == {}
    assert f"report: {out / 'report.md'}" in printed
    assert not [p.name for p in out.parent.iterdir() if p.name != "demo"]  # no staging directory left behind
    written = {p.name: atomic.DIRECTORY if p.is_dir() else atomic.FILE for p in out.iterdir()}
    assert written.items() <= demo.OUTPUTS.items()  # what a rerun deletes covers all the demo writes, by type
    assert written.items() <= demo.LAYOUT.own(out).items()  # results.json records every file in its subdirectories


def test_the_two_forms_predict_identical_classes(demo_run):
    out, _, results = demo_run
    agreement = results["agreement"]
    assert agreement["max_rel_error"] < 1e-5 and agreement["samples"] == 270
    assert agreement["class_differences"] == agreement["near_tie_differences"]  # classes flip only at near-ties
    accuracies = list(agreement["accuracy"].values())
    assert abs(accuracies[0] - accuracies[1]) <= agreement["class_differences"] / 270

    # Recomputed from the artefacts: the training bundle in eval mode, the deploy bundle and the ONNX file.
    from trainfer.serve.onnx_runtime import load_onnx

    test = data.splits()["test"]
    inputs = data.normalize(test.pixels)
    trained = load(out / "bundle_train")
    with inference(trained):
        reference = trained(inputs)
    deployed = load(out / "bundle_deploy")
    assert trainfer.recipe_of(deployed).form == "deploy"
    with inference(deployed):
        served = deployed(inputs)
    onnx, _ = load_onnx(out / "digits.onnx")
    for candidate in (served, onnx(inputs)):  # other kernels and runtimes: equal within rounding
        assert_close(candidate, reference)
        assert_same_classes(candidate, reference)
    assert accuracies[0] == int((reference.argmax(1) == test.labels).sum()) / 270
    assert results["forgot_eval"]["correct"]["accuracy"] == accuracies[0]


def test_png_files_predicted_by_the_cli_match_the_tensor_path(demo_run):
    _, _, results = demo_run
    predict = results["predict"]
    assert predict["exact_preprocessing"] and predict["served"] == "digits.onnx"
    assert len(predict["files"]) == 4
    assert all(f["cli_class"] == f["tensor_class"] for f in predict["files"])


def test_measurements_cover_every_form(demo_run):
    _, _, results = demo_run
    measure = results["measure"]
    assert list(measure["forms"]) == ["training form (eval)", "deploy form", "ONNX Runtime"]
    reference = measure["forms"]["training form (eval)"]
    assert reference["speedup_latency"] == reference["speedup_throughput"] == 1.0  # the reference against itself
    for form in measure["forms"].values():
        assert 0 < form["latency_ms"] <= form["latency_p90_ms"] and form["throughput"] > 0
        assert form["speedup_latency"] > 0 and form["speedup_throughput"] > 0  # their values: the test below
    assert measure["memory"]["with_grad"] > measure["memory"]["inference_mode"] > 0
    counts = results["deploy"]["counts"]
    assert counts["batch-norm kernels run"] == {"train": 16, "deploy": 0}
    assert counts["parameter elements"]["deploy"] < counts["parameter elements"]["train"]
    assert counts["buffer elements"]["deploy"] < counts["buffer elements"]["train"]  # no BatchNorm statistics left
    assert "eval()" in results["forgot_eval"]["guard_warning"]
    forgot = results["forgot_eval"]["forgot"]
    assert [run["name"] for run in forgot] == [f"no eval(), batch {b}" for b in demo.FORGOT_EVAL_BATCHES]


def test_a_training_form_made_slower_shows_the_deploy_form_faster():
    """Known answer: a training form sleeping 100 ms a call is slower than its deploy form at both batch sizes."""

    torch.manual_seed(0)
    deployed = trainfer.deploy(digits_net(width=4).eval(), torch.randn(1, 1, 8, 8))
    inputs = torch.randn(demo.THROUGHPUT_BATCH, 1, 8, 8)
    measured = demo._measure(Sleeping(deployed), deployed, None, inputs, 1)["forms"]
    slow, fast = measured["training form (eval)"], measured["deploy form"]
    assert slow["latency_ms"] >= 100 > fast["latency_ms"] and slow["throughput"] < fast["throughput"]
    assert fast["speedup_latency"] > 1 and fast["speedup_throughput"] > 1
    assert slow["speedup_latency"] == slow["speedup_throughput"] == 1.0


def test_an_interrupted_run_leaves_the_previous_output_intact(demo_run, monkeypatch):
    out, _, _ = demo_run
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_forgot_eval", interrupt)
    with pytest.raises(KeyboardInterrupt):
        demo.run(demo.DemoOptions(out=out, epochs=1, subset=64, repeats=1))
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo"]


def test_refuses_to_replace_a_directory_that_is_not_a_demo_output(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "precious"), *QUICK])
    assert result.exit_code == 2
    assert "refusing to replace" in result.output and "not a trainfer demo output" in result.output
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"
    result = CliRunner().invoke(main, ["demo", "--epochs", "-1"])
    assert result.exit_code == 2 and "-1 is not in the range 1<=x<=10000" in result.output


def test_a_sequences_only_output_may_be_replaced_by_the_whole_demo(tmp_path):
    """``trainfer demo --sequences`` first, then ``make demo``: its ``sequences/`` alone is a demo output."""
    out = tmp_path / "demo"
    (out / "sequences").mkdir(parents=True)
    (out / "sequences" / "notes.txt").write_text("not the step's output")
    with pytest.raises(InputError, match="not a trainfer demo output"), demo._staging(out):
        pass
    (out / "sequences" / "notes.txt").unlink()
    (out / "sequences" / "scores.json").write_text("MY SCORES")  # a user's, not the step's
    with pytest.raises(InputError, match="not a trainfer demo output"), demo._staging(out):
        pass
    (out / "sequences" / "scores.json").write_text('{"scores": []}')
    with demo._staging(out) as work:
        (work / "report.md").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]


def test_a_file_written_into_the_output_during_a_run_is_kept_with_the_previous_output(tmp_path, monkeypatch):
    """A user's file lands in ``--out`` just before the new output replaces it: the previous output, the
    file with it, is kept beside it with a warning; a rerun with nothing foreign replaces silently."""
    out = tmp_path / "demo"
    (out / "bundle_train").mkdir(parents=True)
    (out / "bundle_train" / "manifest.json").write_text("old")
    (out / demo.MARKER).write_text(json.dumps({WRITTEN: ["bundle_train/manifest.json"]}))
    exchange = atomic._exchange

    def user_writes_then_exchange(first, second):
        (out / "notes.txt").write_text("mine")
        return exchange(first, second)

    monkeypatch.setattr(atomic, "_exchange", user_writes_then_exchange)
    kept = tmp_path / ("demo" + atomic.KEPT_SUFFIX)
    with pytest.warns(WriteWarning, match=rf"held 'notes.txt' .* kept with them in '{kept}'$"):
        with demo._staging(out) as work:
            (work / demo.MARKER).write_text("new")
    assert (kept / "notes.txt").read_text() == "mine" and (kept / "bundle_train" / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER] and (out / demo.MARKER).read_text() == "new"
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with demo._staging(out) as work:
            (work / demo.MARKER).write_text("newer")
            (work / "bundle_train").mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", kept.name]


def test_a_file_already_in_the_output_before_a_rerun_is_kept_with_the_whole_previous_output(tmp_path):
    """A user's file at the top of ``--out`` before the rerun does not stop it: the previous output,
    ``sequences/`` included, is kept with the file, and the warning does not claim the file came during the run."""
    out = tmp_path / "demo"
    (out / "sequences").mkdir(parents=True)
    (out / "sequences" / "scores.json").write_text("old")
    (out / demo.MARKER).write_text("{}")
    (out / "NOTES.txt").write_text("mine")
    kept = tmp_path / ("demo" + atomic.KEPT_SUFFIX)
    message = rf"held 'NOTES.txt' besides its writer's files \(put there before or during the rewrite\): .* '{kept}'$"
    with pytest.warns(WriteWarning, match=message):
        with demo._staging(out) as work:
            (work / demo.MARKER).write_text("new")
    assert (kept / "NOTES.txt").read_text() == "mine" and (kept / "sequences" / "scores.json").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == [demo.MARKER]


def test_a_missing_optional_dependency_is_reported_as_skipped(demo_run, tmp_path, monkeypatch):
    _, _, results = demo_run
    monkeypatch.setitem(__import__("sys").modules, "captum", None)  # `import captum` now fails
    results = {**results, "skipped": {}}
    del results["explain"]
    assert demo._optional(results, "explain", lambda: demo._need("captum", "explanations")) is None
    assert results["skipped"]["explain"].startswith("explanations needs `captum`, which is not available here")

    from trainfer.demo.report import write_report

    report = write_report(results, tmp_path).read_text()
    assert "_Skipped: explanations needs `captum`" in report and "heat maps (`Predictor.explain`)" not in report


def test_serving_step_shows_the_auto_runtime_and_the_int8_form(demo_run):
    out, _, results = demo_run
    serving = results["serving"]
    forms = serving["forms"]
    assert "deploy form, eager float32" in forms and any(name.startswith("auto: ") for name in forms)
    assert all(0 <= f["accuracy"] <= 1 and f["latency_ms"] > 0 and f["bytes"] > 0 for f in forms.values())
    assert (out / "bundle_deploy" / "runtime.json").is_file() and (out / "serving.png").stat().st_size > 5_000
    assert "## Serving: the fastest verified runtime and the int8 form" in (out / "report.md").read_text()


def _serving_with_gate(demo_run, tmp_path, monkeypatch, gate):
    """The demo's serving step on its deploy bundle (a copy), quantizing under ``gate``: the quick run's
    model is barely trained, so whether the default gate passes is a matter of a few test digits."""
    import functools
    import shutil

    from trainfer.demo.serving import serving
    from trainfer.serve import quantize

    out, _, _ = demo_run
    bundle = shutil.copytree(out / "bundle_deploy", tmp_path / "bundle_deploy")
    monkeypatch.setattr(quantize, "quantize", functools.partial(quantize.quantize, gate=gate))
    parts = data.splits()
    validation, test = ((data.normalize(parts[n].pixels[:size]), parts[n].labels[:size]) for n, size in VAL_TEST)
    return serving(bundle, tmp_path, validation, test, data.normalize(parts["train"].pixels[:64]), 1)


#: The splits the serving step is given in its tests, and how many samples of each: told apart by their sizes.
VAL_TEST = (("val", 200), ("test", 270))


def test_serving_step_writes_the_int8_form_the_gate_passes(demo_run, tmp_path, monkeypatch):
    from trainfer.demo.serving import section

    results = _serving_with_gate(demo_run, tmp_path, monkeypatch, trainfer.AccuracyGate(0.0, 1.0))
    int8 = results["forms"]["int8 (ONNX Runtime, QDQ)"]
    assert results["bundle"] == "bundle_int8/" and results["gate"]["ok"]
    assert (tmp_path / "bundle_int8" / "quantized.onnx").is_file() and int8["bytes"] > 0
    assert int8["bytes"] < results["forms"]["deploy form, eager float32"]["bytes"]  # int8 weights: smaller
    assert results["quantization"].startswith("int8 form: gate passed on 200 samples")  # the validation split's
    assert "gated on the validation split" in section({"serving": results})
    predictor = trainfer.Predictor.load(tmp_path / "bundle_int8")
    pixels = data.splits()["test"].pixels[:3] * data.PIXEL_SCALE  # raw inputs in the scaled range, as files give
    assert {result.label for result in predictor.predict(pixels)} <= set(data.LABELS)


def test_serving_step_reports_the_refusal_of_the_gate(demo_run, tmp_path, monkeypatch):
    results = _serving_with_gate(demo_run, tmp_path, monkeypatch, trainfer.AccuracyGate(max_rel_error=0.0))
    assert results["bundle"] is None and not results["gate"]["ok"] and not (tmp_path / "bundle_int8").exists()
    assert results["quantization"].startswith("refused: no int8 form passes the gate")
    assert "max rel error" in results["quantization"] and "int8 (ONNX Runtime, QDQ)" not in results["forms"]


def test_pruning_step_gates_each_candidate_and_plots_accuracy_against_latency(demo_run):
    from trainfer.demo.pruning import GATE, RATIOS

    out, printed, results = demo_run
    pruning = results["pruning"]
    candidates = pruning["candidates"]
    assert [(c["ratio"], c["finetuned"]) for c in candidates] == [(r, t) for r in RATIOS for t in (False, True)]
    for candidate in candidates:
        (macs, pruned_macs), (parameters, pruned_parameters) = candidate["macs"], candidate["parameters"]
        assert 0 < pruned_macs < macs and 0 < pruned_parameters < parameters
        gate = candidate["gate"]
        assert 0 <= gate["candidate_accuracy"] <= 1 and gate["samples"] == 270  # the validation digits
        assert candidate["verdict"] == ("passed" if gate["accuracy_drop"] <= GATE.max_accuracy_drop else "refused")
    forms = pruning["forms"]
    passed = [c["name"] for c in candidates if c["verdict"] == "passed"]
    assert [name for name, form in forms.items() if form["kind"] == "pruned"] == passed
    assert all(0 <= f["accuracy"] <= 1 and f["latency_b1_ms"] > 0 and f["latency_b256_ms"] > 0 for f in forms.values())
    deploy_accuracy = results["agreement"]["accuracy"]["deploy form"]
    assert abs(forms["float (deploy form)"]["accuracy"] - deploy_accuracy) <= 1 / 270  # other batches: a near-tie
    for name, text in pruning["quantization"].items():  # int8 of the float form and of the smallest passing form
        assert (
            (forms[name]["kind"].endswith("int8") and "gate passed" in text)
            if name in forms
            else text.startswith("refused: no int8 form passes the gate")
        )
    assert len(pruning["quantization"]) == 1 + bool(passed)
    report = (out / "report.md").read_text()
    assert "## Pruning: narrower layers behind the accuracy gate" in report and "![pruning](pruning.png)" in report
    heading = "The forms that passed and their int8 forms" if passed else "No pruned form passed the gate"
    assert heading in report, report
    assert all(f"| {c['name']} |" in report for c in candidates) and "pruned + int8" in printed


def test_the_report_shows_the_sequence_step_headline_and_links_its_report(demo_run, tmp_path):
    out, _, results = demo_run
    assert results["config"]["sequences"] is False and "sequences" not in results
    assert "_Not run (`--no-sequences`)" in (out / "report.md").read_text()
    scores = [
        {"model": model, "decoder": decoder, "sequence_accuracy": accuracy, "cer": cer}
        for model, decoder, accuracy, cer in [
            ("crnn-ctc", "greedy", 0.812, 0.05),
            ("crnn-ctc", "beam 8", 0.823, 0.047),
            ("encoder-decoder", "greedy", 0.411, 0.2),
            ("encoder-decoder", "beam 8", 0.456, 0.18),
        ]
    ]
    found = {"report": "sequences/report.md", "plot": "sequences/sequences.png", "scores": scores}
    config = {**results["config"], "sequences": True}
    from trainfer.demo.report import write_report

    report = write_report({**results, "config": config, "sequences": found}, tmp_path).read_text()
    assert "[sequences/report.md](sequences/report.md)" in report and "Not run" not in report
    assert "| encoder-decoder | beam 8 | 0.456 | 0.180 |" in report
    assert "| crnn-ctc | greedy | 0.812 | 0.050 |" in report

"""Autoregressive (encode/step) sequence models served like the CTC task: Predictor, bundles, CLI, refusals."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_sequence_serving import PATHS, TOKENS, frame_model, one_hot_frames

import trainfer
from trainfer import decoding
from trainfer.cli import main
from trainfer.errors import BundleError, DecodingError, InputError
from trainfer.models.sequence import BOS, EOS, SEQ_TOKENS, deploy_seq2seq, digit_string_seq2seq
from trainfer.numerics import randomize_batchnorm
from trainfer.serve.predictor import Predictor
from trainfer.serve.sequence import SequenceResult

LABELS = list(SEQ_TOKENS)
SETTINGS = {"kind": "autoregressive", "bos": BOS, "eos": EOS, "beam_width": 3, "max_length": 6}


def tiny_model(dtype=torch.float32):
    """A small untrained encoder-decoder, random BN statistics: its searches differ from greedy."""
    torch.manual_seed(0)
    model = digit_string_seq2seq(width=4, hidden=8).to(dtype)
    randomize_batchnorm(model, seed=1)
    with torch.no_grad():
        model.out.weight.mul_(8.0)  # peaked next-token distributions: beams and greedy disagree somewhere
    return model.eval()


def images(count=4, seed=2, dtype=torch.float32):
    return torch.randn(count, 1, 8, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_the_predictor_returns_what_beam_search_finds_with_typed_results():
    model, x = tiny_model(), images()
    predictor = Predictor(model, task="sequence", labels=LABELS, decoder=SETTINGS)
    results = predictor.predict(x, top_k=2)
    with torch.inference_mode():
        direct = decoding.beam_search(model, x, bos=BOS, eos=EOS, max_length=6, num_beams=3, num_return_sequences=2)
    for result, hyps in zip(results, direct, strict=True):
        assert isinstance(result, SequenceResult) and result.frame_confidence is None
        assert result.tokens == list(hyps[0].tokens) and result.score == pytest.approx(hyps[0].score, rel=1e-6)
        assert result.text == "".join(str(t) for t in hyps[0].tokens) and result.finished == hyps[0].finished
        assert result.token_confidence == pytest.approx([math.exp(v) for v in hyps[0].token_log_probs[:]])
        assert [s for _, s in result.n_best] == pytest.approx([h.score for h in hyps], rel=1e-6)
    json.dumps([r.to_record() for r in results], allow_nan=False)


def test_beam_width_one_is_greedy_search():
    model, x = tiny_model(), images()
    predictor = Predictor(model, task="sequence", labels=LABELS, decoder={**SETTINGS, "beam_width": 1})
    with torch.inference_mode():
        greedy = decoding.greedy_search(model, x, bos=BOS, eos=EOS, max_length=6)
    assert [r.tokens for r in predictor.predict(x)] == [list(h.tokens) for h in greedy]


def test_the_deploy_form_folds_the_encoder_exactly_in_float64():
    model = tiny_model(torch.float64)
    folded = deploy_seq2seq(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.Dropout) for m in folded.modules())
    x = images(dtype=torch.float64)
    for a, b in zip(model.encode(x), folded.encode(x), strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12 * float(a.detach().abs().max()))
    assert trainfer.recipe_of(folded).config["deploy"] is True and trainfer.recipe_of(folded).form == "deploy"


def test_a_bundle_records_the_settings_loads_without_a_graph_and_serves_the_same(tmp_path):
    folded, x = deploy_seq2seq(tiny_model()), images()
    decoder = {**SETTINGS, "early_stopping": "never", "length_penalty": 0.5}
    path = trainfer.save(folded, tmp_path / "s2s", task="sequence", labels=LABELS, decoder=decoder, example_inputs=x)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["form"] == "deploy" and manifest["architecture"] is None
    assert manifest["factory"] == "trainfer.models:digit_string_seq2seq" and manifest["config"]["deploy"] is True
    assert manifest["decoder"]["early_stopping"] == "never" and manifest["decoder"]["length_penalty"] == 0.5
    served = Predictor.load(path).predict(x, top_k=2)
    assert [r.to_record() for r in served] == [
        r.to_record() for r in Predictor(folded, task="sequence", labels=LABELS, decoder=decoder).predict(x, top_k=2)
    ]
    for key, value in (("early_stopping", "sometimes"), ("beam_width", 5000), ("max_length", 0)):
        broken = json.loads(json.dumps(manifest))
        broken["decoder"][key] = value
        (path / "manifest.json").write_text(json.dumps(broken))
        with pytest.raises(BundleError, match=f"decoder.{key}"):
            Predictor.load(path)


def test_a_bundle_takes_its_input_shape_from_the_preprocessing_as_a_deploy_form_does(tmp_path):
    model = tiny_model()
    trainfer.attach_recipe(model, dataclasses.replace(trainfer.recipe_of(model), input_shape=None))
    spec = {"input_shape": [1, 8, 64]}
    path = trainfer.save(model, tmp_path / "s2s", task="sequence", labels=LABELS, decoder=SETTINGS, preprocess=spec)
    assert json.loads((path / "manifest.json").read_text())["input"]["shape"] == [1, 1, 8, 64]
    with pytest.raises(BundleError, match="needs example_inputs= .* or preprocess= with its input_shape"):
        trainfer.save(model, tmp_path / "none", task="sequence", labels=LABELS, decoder=SETTINGS)


@pytest.mark.parametrize(
    ("change", "labels", "match"),
    [
        ({"eos": 12}, LABELS, "eos id 12 is outside the token table of 12"),
        ({"max_length": 0}, LABELS, "max_length"),
        ({"beam_width": 0}, LABELS, "beam_width"),
        ({"beam_width": 5000}, LABELS, "beam_width"),
        ({"beam_width": 65}, LABELS, r"beam_width must be in \[1, 64\]"),
        ({"max_length": 513}, LABELS, r"max_length must be in \[1, 512\]"),
        ({"beam_width": 16, "max_length": 512}, LABELS, "beam_width × max_length must be at most 4096"),
        ({"early_stopping": 1}, LABELS, "early_stopping"),
        ({}, [*LABELS, "extra"], "scores over 12 tokens, but the token table has 13"),
    ],
)
def test_bad_settings_and_a_step_of_the_wrong_shape_are_refused(change, labels, match):
    with pytest.raises(DecodingError, match=match):
        Predictor(tiny_model(), task="sequence", labels=labels, decoder={**SETTINGS, **change}).predict(images(1))


def test_what_does_not_apply_to_a_generator_is_refused_clearly(tmp_path):
    model = tiny_model()
    with pytest.raises(InputError, match="cache_size does not apply to an autoregressive"):
        Predictor(model, task="sequence", labels=LABELS, decoder=SETTINGS, cache_size=4)
    predictor = Predictor(model, task="sequence", labels=LABELS, decoder=SETTINGS)
    with pytest.raises(InputError, match="sequence models are not averaged"):
        Predictor.ensemble([predictor, predictor])
    with pytest.raises(DecodingError, match="needs encode"):
        Predictor(torch.nn.Linear(2, 3), task="sequence", labels=LABELS, decoder=SETTINGS).predict(torch.ones(1, 2))


def test_a_model_without_a_factory_is_refused_at_save(tmp_path):
    model = tiny_model()
    trainfer.recipe.attach_recipe(model, trainfer.recipe.ModelRecipe(None, {}, (1, 1, 8, 64)))
    with pytest.raises(BundleError, match="needs factory="):
        trainfer.save(model, tmp_path / "b", task="sequence", labels=LABELS, decoder=SETTINGS, example_inputs=images(1))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["autoregressive", "ctc"])
def test_a_sequence_manifest_without_its_decoder_is_refused_at_load_naming_it(tmp_path, kind):
    """Without ``decoder`` an encoder-decoder was read as CTC (the default kind) and failed later on a
    blank colliding with a digit: the missing settings are the one-line error, for either kind."""
    x = images(2)
    if kind == "autoregressive":
        path = trainfer.save(tiny_model(), tmp_path / "b", task="sequence", labels=LABELS, decoder=SETTINGS)
    else:
        path = trainfer.save(
            frame_model(), tmp_path / "b", factory="test_sequence_serving:frame_model", task="sequence", labels=TOKENS
        )
        x = one_hot_frames(PATHS)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["decoder"]["kind"] == kind  # trainfer.save records it for every sequence bundle
    del manifest["decoder"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    message = "no 'decoder' settings, which a sequence head needs: kind 'ctc' (blank) or 'autoregressive'"
    with pytest.raises(BundleError, match=re.escape(message)):
        Predictor.load(path)
    np.save(tmp_path / "x.npy", x.numpy())
    failed = CliRunner().invoke(main, ["predict", str(path), str(tmp_path / "x.npy")])
    assert failed.exit_code == 2 and failed.output.count("\n") == 1 and message in failed.output, failed.output


def test_trainfer_predict_table_jsonl_csv_and_resumable_out(tmp_path):
    x = images(5)
    trainfer.save(tiny_model(), tmp_path / "s2s", task="sequence", labels=LABELS, decoder=SETTINGS, example_inputs=x)
    np.save(tmp_path / "batch.npy", x.numpy())
    args = ["predict", str(tmp_path / "s2s"), str(tmp_path / "batch.npy")]
    table = CliRunner().invoke(main, args, catch_exceptions=False).output.splitlines()
    assert table[0].split() == ["id", "text", "score", "finished", "min_confidence"] and len(table) == 6
    records = [json.loads(line) for line in _output(args + ["--format", "jsonl", "--top-k", "2"]).splitlines()]
    assert len(records) == 5 and all(len(r["n_best"]) == 2 for r in records)
    assert all(len(r["token_confidence"]) == len(r["tokens"]) for r in records)
    assert float(table[1].split()[4]) == pytest.approx(min(records[0]["token_confidence"]), rel=1e-5)
    assert _output(args + ["--format", "csv"]).splitlines()[0].startswith("id,text,tokens,score,finished")
    out = tmp_path / "preds.jsonl"
    _output(args + ["--top-k", "2", "--out", str(out)])
    whole = out.read_text().splitlines()
    out.write_text("\n".join(whole[:2]) + "\n")  # as if stopped after two records
    _output(args + ["--top-k", "2", "--out", str(out)])
    assert out.read_text().splitlines() == whole
    assert [json.loads(line)["text"] for line in whole] == [r["text"] for r in records]


def _output(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_export_refuses_the_decoding_loop_and_exports_the_encoder(tmp_path):
    pytest.importorskip("onnxruntime")
    folded, x = deploy_seq2seq(tiny_model()), images(2)
    path = trainfer.save(folded, tmp_path / "s2s", task="sequence", labels=LABELS, decoder=SETTINGS, example_inputs=x)
    with pytest.raises(InputError, match="export its encoder"):
        trainfer.export(path, tmp_path / "s2s.onnx")
    assert not (tmp_path / "s2s.onnx").exists()
    report = trainfer.export(folded.encoder, tmp_path / "encoder.onnx", example_inputs=x)
    assert report.max_rel_error < 1e-4
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    (frames,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.inference_mode():
        expected = folded.encoder(x)
    assert np.abs(frames - expected.numpy()).max() <= 1e-5 * float(expected.abs().max())


def test_an_explanation_is_for_the_decoded_sequence_log_probability():
    pytest.importorskip("captum")
    model, x = tiny_model(), images(2)
    predictor = Predictor(model, task="sequence", labels=LABELS, decoder=SETTINGS)
    explained = predictor.explain(x, method="saliency")
    assert explained.values.shape == x.shape and bool(torch.isfinite(explained.values).all())
    assert float(explained.values.abs().sum()) > 0
    with torch.inference_mode():
        found = decoding.beam_search(model, x, bos=BOS, eos=EOS, max_length=6, num_beams=3)
    expected = [hyps[0].log_prob for hyps in found]  # what the search scored, EOS included when it ended
    assert explained.scores.detach().tolist() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"beam_width": 256, "max_length": 512}, "decoder.beam_width"),
        ({"max_length": 4096}, "decoder.max_length"),
        ({"n_best": 65}, "decoder.n_best"),
        ({"beam_width": 64, "max_length": 65}, "beam_width × max_length must be at most 4096"),
    ],
)
def test_a_bundles_decoder_settings_are_bounded_so_one_prediction_is_not_a_compute_bomb(tmp_path, change, match):
    x = images(1)
    path = trainfer.save(
        tiny_model(), tmp_path / "s2s", task="sequence", labels=LABELS, decoder=SETTINGS, example_inputs=x
    )
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["decoder"].update(change)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=match):
        Predictor.load(path)


def test_top_k_cannot_widen_a_served_search_past_the_bounds():
    predictor = Predictor(tiny_model(), task="sequence", labels=LABELS, decoder={**SETTINGS, "max_length": 512})
    with pytest.raises(DecodingError, match="top_k 9 widens the beam"):
        predictor.predict(images(1), top_k=9)
    with pytest.raises(InputError, match="top_k 65 is more than the 64 hypotheses a sequence model returns"):
        predictor.predict(images(1), top_k=65)  # refused up front, before the model runs


def save_s2s(root: Path) -> Path:
    """The tiny encoder-decoder saved as the bundle ``root/s2s``, with the decoder ``SETTINGS``."""
    return trainfer.save(
        tiny_model(), root / "s2s", task="sequence", labels=LABELS, decoder=SETTINGS, example_inputs=images(1)
    )


def _refused_in_one_line(tmp_path, command: list[str]) -> tuple[str, Path]:
    """``trainfer *command`` on a saved encoder-decoder (``{b}``: its path): its one line, exit 2, and the path."""
    path = save_s2s(tmp_path)
    result = CliRunner().invoke(main, [a.format(b=path) for a in command])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0], path


@pytest.mark.parametrize("command", [["verify", "{b}", "{b}"], ["inspect", "{b}"]])
def test_verify_and_inspect_refuse_an_encoder_decoder_in_one_line_saying_what_to_do(tmp_path, command):
    line, _ = _refused_in_one_line(tmp_path, command)
    assert "autoregressive encoder-decoder" in line
    assert f"{command[0]} its encoder" in line and "trainfer predict" in line


@pytest.mark.parametrize(
    ("command", "way_out"),
    [(["serve", "{b}", "--compile"], "drop --compile"), (["compile", "{b}"], "serve it as it is")],
)
def test_the_runtime_search_refuses_an_encoder_decoder_first_in_one_line(tmp_path, monkeypatch, command, way_out):
    """``trainfer serve --compile`` and ``trainfer compile``: refused from the manifest, before a server starts
    or a search is announced, saying what to do instead (not how to export an encoder)."""
    import trainfer.server.run

    pytest.importorskip("uvicorn")
    started = []
    monkeypatch.setattr(trainfer.server.run, "serve", lambda *a, **k: started.append(a))
    line, path = _refused_in_one_line(tmp_path, command)
    assert "does not apply to an encoder-decoder" in line
    assert way_out in line and "export" not in line
    assert not started and not (path / "runtime.json").exists()


def test_a_servers_start_up_search_refuses_an_encoder_decoder_saying_to_serve_it_without(tmp_path):
    """``ServerSettings(compile=...)`` in Python: the model's loader refuses before any search, naming the model."""
    from trainfer.server.model import load_model

    path = save_s2s(tmp_path)
    with pytest.raises(InputError, match="model 's2s': the start-up runtime search .* serve it without a search"):
        load_model("s2s", path, runtime=None, trust_factory=False, max_batch=4, search={})


def test_the_server_refuses_a_runtime_for_an_autoregressive_bundle_at_startup_in_one_line(tmp_path):
    """The server serves encoder-decoders (tests/test_server_sequences.py), but not on another runtime:
    ``--runtime`` compiles one forward per batch, and decoding is a loop of encode() and step() calls."""
    path = save_s2s(tmp_path)
    tests = Path(__file__).parent
    done = subprocess.run(
        [sys.executable, "-m", "trainfer", "serve", str(path), "--port", "0", "--runtime", "torch"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{tests.parent}:{tests}"},
        timeout=180,
    )
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "runtime does not apply to an autoregressive sequence model" in errors[0], done.stderr
    assert done.stderr.strip().splitlines() == errors and "--runtime torch for bundle" in errors[0]
    assert "Uvicorn" not in done.stdout + done.stderr  # refused before a server announced itself (newcomer 7 #5)


def test_a_stray_runtime_json_in_an_autoregressive_bundle_is_refused_at_load_everywhere(tmp_path):
    """trainfer compile never records a runtime for one: predict, serve and Predictor.load all refuse it."""
    path = save_s2s(tmp_path)
    Predictor.load(path)  # loads without it
    (path / "runtime.json").write_text("{}")
    with pytest.raises(BundleError, match="holds a runtime.json"):
        Predictor.load(path)
    np.save(tmp_path / "x.npy", images(1).numpy())
    result = CliRunner().invoke(main, ["predict", str(path), str(tmp_path / "x.npy")])
    assert result.exit_code == 2 and "remove runtime.json" in result.output.strip().splitlines()[-1], result.output

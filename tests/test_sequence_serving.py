"""The sequence task served like the others: bundles with decoder settings, typed results, CLI, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import trainfer
from trainfer.errors import BundleError, DecodingError, InputError
from trainfer.serve.predictor import Predictor
from trainfer.serve.sequence import DecoderSettings, SequenceResult, sequence_results

TOKENS = ["", "a", "b", "c"]


class FrameModel(nn.Module):
    """(N, 1, 4, 12) -> per-frame log-probs (N, 12, 4): a 1x1 conv over the 4 rows, then log-softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.conv(x[:, 0]).transpose(1, 2).log_softmax(-1)


CTC_BEAM = {"kind": "ctc", "blank": 0, "beam_width": 4}


def frame_model() -> nn.Module:
    torch.manual_seed(0)
    model = FrameModel()
    with torch.no_grad():
        model.conv.weight.copy_(4 * torch.eye(4)[:, :, None])
        model.conv.bias.zero_()
    return model


trainfer.register_model(frame_model, name="test_sequence_serving:frame_model")


def one_hot_frames(paths):
    """Inputs whose frame t peaks at class paths[n][t]."""
    x = torch.zeros(len(paths), 1, 4, 12)
    for n, path in enumerate(paths):
        x[n, 0, torch.tensor(path), torch.arange(12)] = 1.0
    return x


PATHS = [[1, 1, 0, 2, 2, 0, 2, 3, 0, 0, 1, 1], [0] * 12]


def save_frame_bundle(root, model=None, decoder=CTC_BEAM):
    """``frame_model`` (or ``model``) saved as a CTC sequence bundle ``root/seq`` over ``TOKENS``, with
    ``decoder`` (None: the manifest records none, trainfer's defaults), on the frames of ``PATHS``."""
    return trainfer.save(
        frame_model() if model is None else model,
        root / "seq",
        factory="test_sequence_serving:frame_model",
        task="sequence",
        labels=TOKENS,
        **({} if decoder is None else {"decoder": decoder}),
        example_inputs=one_hot_frames(PATHS),
    )


def test_a_ctc_predictor_returns_typed_sequence_results():
    predictor = Predictor(frame_model(), task="sequence", labels=TOKENS, decoder={"kind": "ctc", "blank": 0})
    first, empty = predictor.predict(one_hot_frames(PATHS))
    assert isinstance(first, SequenceResult) and first.text == "abbca" and first.tokens == [1, 2, 2, 3, 1]
    assert empty.text == "" and empty.tokens == []
    assert len(first.token_confidence) == 5 and all(0 < c <= 1 for c in first.token_confidence)
    assert len(first.frame_confidence) == 12
    expected = predictor.scores(one_hot_frames(PATHS)).max(dim=2).values.sum(dim=1)
    assert first.score == pytest.approx(float(expected[0]), rel=1e-5)


def test_n_best_from_the_beam_and_records():
    predictor = Predictor(frame_model(), task="sequence", labels=TOKENS, decoder={"kind": "ctc", "beam_width": 4})
    (result,) = predictor.predict(one_hot_frames(PATHS[:1]), top_k=3)
    assert result.text == "abbca" and len(result.n_best) == 3 and result.n_best[0][0] == "abbca"
    scores = [s for _, s in result.n_best]
    assert scores == sorted(scores, reverse=True) and result.score == scores[0]
    record = result.to_record()
    assert record["text"] == "abbca" and record["n_best"][0] == ["abbca", scores[0]]
    json.dumps(record, allow_nan=False)


def test_bundles_record_the_decoder_and_serve_it(tmp_path):
    model = frame_model()
    path = save_frame_bundle(tmp_path, model)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["task"] == "sequence" and manifest["decoder"]["beam_width"] == 4
    predictor = Predictor.load(path)
    assert predictor.decoder == DecoderSettings(kind="ctc", blank=0, beam_width=4)
    assert [r.text for r in predictor.predict(one_hot_frames(PATHS))] == ["abbca", ""]
    manifest["decoder"]["beam_width"] = 100000
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="decoder.beam_width"):
        Predictor.load(path)


def test_a_ctc_head_declared_logits_that_returns_log_probabilities_is_refused_or_warned(tmp_path):
    """The contradiction is a bundle's refusal at load (as any recorded kind the probes contradict) and,
    declared by the caller, an OutputKindWarning at the first prediction."""
    path = save_frame_bundle(tmp_path, decoder=None)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["heads"][0]["output_kind"] == "log_probabilities"  # detected: the final log_softmax
    manifest["heads"][0]["output_kind"] = "logits"
    (path / "manifest.json").write_text(json.dumps(manifest))
    message = "declared output kind 'logits', but outputs look like log-probabilities"
    with pytest.raises(BundleError, match=f"{message}.* probe inputs: refusing to serve it"):
        Predictor.load(path)
    declared = Predictor(frame_model(), task="sequence", labels=TOKENS, output_kind="logits")
    with pytest.warns(trainfer.OutputKindWarning, match=f"{message}.*declared by the caller"):
        assert [r.text for r in declared.predict(one_hot_frames(PATHS))] == ["abbca", ""]


@pytest.mark.parametrize(
    ("decoder", "labels", "match"),
    [
        ({"kind": "ctc", "blank": 1}, TOKENS, "blank id 1 collides with the label 'a'"),
        ({"kind": "ctc", "blank": 7}, TOKENS, "outside"),
        ({"kind": "ctc", "beam_width": 0}, TOKENS, "beam_width"),
        ({"kind": "ctc", "beam_width": 5000}, TOKENS, "beam_width"),
        ({"kind": "autoregressive", "bos": 1, "eos": 2, "max_length": 0}, TOKENS, "max_length"),
        ({"kind": "ctc", "beams": 3}, TOKENS, "unknown decoder settings"),
        ({"kind": "ctc"}, ["", "a", "b"], "3 entries, but the model scores 4"),
    ],
)
def test_bad_decoder_settings_are_refused(decoder, labels, match):
    with pytest.raises(DecodingError, match=match):
        predictor = Predictor(frame_model(), task="sequence", labels=labels, decoder=decoder)
        predictor.predict(one_hot_frames(PATHS))


def test_autoregressive_settings_point_to_the_library():
    settings = DecoderSettings(kind="autoregressive", bos=1, eos=2)
    with pytest.raises(DecodingError, match="trainfer.decoding.beam_search"):
        sequence_results(torch.zeros(1, 3, 4), tuple(TOKENS), settings)


def test_ensembles_of_sequence_predictors_are_refused_with_the_reason():
    member = Predictor(frame_model(), task="sequence", labels=TOKENS)
    with pytest.raises(InputError, match="sequence models are not averaged"):
        Predictor.ensemble([member, member])


def test_trainfer_predict_prints_and_writes_sequences(tmp_path):
    import numpy as np
    from click.testing import CliRunner

    from trainfer.cli import main

    save_frame_bundle(tmp_path)
    np.save(tmp_path / "batch.npy", one_hot_frames(PATHS).numpy())
    args = ["predict", str(tmp_path / "seq"), str(tmp_path / "batch.npy")]
    table = CliRunner().invoke(main, args, catch_exceptions=False).output.splitlines()
    # the table is for reading: text, score and the lowest confidence, not 12 frame confidences per row
    assert table[0].split() == ["id", "text", "score", "min_confidence"] and table[1].split()[1] == "abbca"
    # beam search gives no per-token confidence: the lowest per-frame one, printed to 6 digits
    frames = json.loads(lines_of(args)[0])["frame_confidence"]
    assert float(table[1].split()[3]) == pytest.approx(min(frames), rel=1e-5)
    lines = CliRunner().invoke(main, [*args, "--format", "jsonl", "--top-k", "2"], catch_exceptions=False).output
    assert "frame_confidence" in lines
    first = json.loads(lines.splitlines()[0])
    assert first["text"] == "abbca" and first["n_best"][0][0] == "abbca" and len(first["n_best"]) == 2
    csv_rows = CliRunner().invoke(main, [*args, "--format", "csv"], catch_exceptions=False).output.splitlines()
    assert csv_rows[0].startswith("id,text,tokens,score") and ",abbca," in csv_rows[1]


def test_a_sequence_prediction_is_explained_for_its_decoded_sequence_score():
    predictor = Predictor(frame_model(), task="sequence", labels=TOKENS, decoder={"kind": "ctc", "beam_width": 4})
    x = one_hot_frames(PATHS) + 0.3 * torch.randn(2, 1, 4, 12)
    results = predictor.predict(x)
    explained = predictor.explain(x)  # integrated gradients of log P(decoded sequence)
    assert explained.values.shape == x.shape and explained.target is None
    beam = torch.tensor([r.score for r in results])  # a lower bound of the exact sum over alignments
    assert bool((explained.scores >= beam - 1e-5).all()) and bool((explained.scores - beam < 0.1).all())
    baseline_score = explained.scores.new_tensor(  # completeness: attributions sum to f(x) - f(0)
        [
            -float(
                torch.nn.functional.ctc_loss(
                    predictor.scores(torch.zeros(1, 1, 4, 12)).transpose(0, 1),
                    torch.tensor(r.tokens, dtype=torch.long)[None] if r.tokens else torch.zeros(1, 0, dtype=torch.long),
                    torch.tensor([12]),
                    torch.tensor([len(r.tokens)]),
                    reduction="sum",
                )
            )
            for r in results
        ]
    )
    torch.testing.assert_close(
        explained.values.sum(dim=(1, 2, 3)), explained.scores - baseline_score, rtol=0, atol=2e-3
    )


def lines_of(args):
    """The JSON lines ``trainfer predict ARGS --format jsonl`` prints."""
    from click.testing import CliRunner

    from trainfer.cli import main

    return CliRunner().invoke(main, [*args, "--format", "jsonl"], catch_exceptions=False).output.splitlines()


def test_a_ctc_bundle_exports_to_onnx_and_serves_the_same_sequences(tmp_path):
    pytest.importorskip("onnxruntime")
    x = one_hot_frames(PATHS)
    path = save_frame_bundle(tmp_path)
    trainfer.export(path, tmp_path / "seq.onnx", example_inputs=x)
    served = Predictor.load(tmp_path / "seq.onnx").predict(x, top_k=2)
    expected = Predictor.load(path).predict(x, top_k=2)
    assert [r.text for r in served] == ["abbca", ""] == [r.text for r in expected]
    for got, want in zip(served, expected):
        assert got.score == pytest.approx(want.score, rel=1e-5)


@pytest.mark.parametrize(
    ("command", "what"),
    [
        (["prune", "-o", "{out}", "--data", "{data}"], "trainfer.prune"),
        (["quantize", "--calibration", "{data}", "-o", "{out}"], "trainfer.quantize"),
        (["compile", "--gate-data", "{data}"], "trainfer.compile with gate_data"),
    ],
)
def test_class_agreement_gates_refuse_a_ctc_bundle_in_one_line(tmp_path, command, what):
    """Their gate compares per-sample argmax classes (per frame here), not decoded strings: refused, exit 2."""
    import numpy as np
    from click.testing import CliRunner

    from trainfer.cli import main

    x = one_hot_frames(PATHS)
    path = save_frame_bundle(tmp_path, decoder={"kind": "ctc", "blank": 0})
    np.save(tmp_path / "x.npy", x.numpy())
    args = [a.format(out=tmp_path / "out", data=tmp_path / "x.npy") for a in command]
    result = CliRunner().invoke(main, [args[0], str(path), *args[1:]])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and what in errors[0] and "decodes" in errors[0], result.output
    assert result.output.strip().splitlines() == errors  # refused first: no search or progress announced
    assert not (tmp_path / "out").exists() and not (path / "runtime.json").exists()


class RepeatedFrames(FrameModel):
    """FrameModel's 12 frames repeated 100 times: 1200 frames, as a graph that repeats its output returns."""

    def forward(self, x):
        return super().forward(x).repeat(1, 100, 1)


def repeated_frames() -> nn.Module:
    model = RepeatedFrames()
    model.load_state_dict(frame_model().state_dict())
    return model


trainfer.register_model(repeated_frames, name="test_sequence_serving:repeated_frames")


def test_a_ctc_bundle_whose_frames_make_the_beam_search_too_long_is_refused_at_load(tmp_path):
    path = trainfer.save(
        repeated_frames(),
        tmp_path / "long",
        factory="test_sequence_serving:repeated_frames",
        task="sequence",
        labels=TOKENS,
        output_kind="log_probabilities",
        decoder={**CTC_BEAM, "beam_width": 64},
        example_inputs=one_hot_frames(PATHS),
    )
    with pytest.raises(BundleError, match=r"1200 frames with beam_width 64 .* over the bound of 2.15e\+09"):
        Predictor.load(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["decoder"]["beam_width"] = 4  # 1200 frames are fine for a narrower beam
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert Predictor.load(path).predict(one_hot_frames(PATHS[:1]))[0].text == "abbc" * 100 + "a"  # a|a merge


@pytest.mark.parametrize(("frames", "beam_width", "top_k"), [(2000, 64, None), (2000, 4, 64)])
def test_a_ctc_beam_search_over_too_many_frames_is_refused_before_it_runs(frames, beam_width, top_k):
    log_probs = torch.full((1, frames, 4), -1.0).log_softmax(-1)
    settings = DecoderSettings(kind="ctc", blank=0, beam_width=beam_width)
    with pytest.raises(DecodingError, match=f"over {frames} frames with beam_width 64 .* over the bound"):
        sequence_results(log_probs, tuple(TOKENS), settings, top_k)


def test_variable_width_inputs_are_bounded_at_predict_time_and_realistic_lengths_decode():
    predictor = Predictor(frame_model(), task="sequence", labels=TOKENS, decoder={**CTC_BEAM, "beam_width": 16})
    with pytest.raises(DecodingError, match="over 12000 frames with beam_width 16"):
        predictor.predict(torch.zeros(1, 1, 4, 12000))
    (long_line,) = predictor.predict(torch.zeros(1, 1, 4, 2000))  # 2000 frames, beam 16: within the bound
    assert len(long_line.frame_confidence) == 2000

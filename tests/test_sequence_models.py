"""Digit strings, the CRNN and the encoder-decoder: data, deploy, decoding, and (slow) real training."""

from __future__ import annotations

import pytest
import torch

import trainfer
from trainfer import decoding
from trainfer.demo import sequences
from trainfer.demo.digit_strings import MAX_DIGITS, MIN_DIGITS, WIDTH, digit_strings
from trainfer.models.sequence import BOS, CTC_TOKENS, EOS, digit_string_crnn, digit_string_seq2seq
from trainfer.serve.predictor import Predictor
from trainfer.testing import randomize_batchnorm


def test_digit_strings_are_deterministic_and_built_from_their_split():
    data = digit_strings("test", 20, seed=3)
    again = digit_strings("test", 20, seed=3)
    assert torch.equal(data.pixels, again.pixels) and data.images.shape == (20, 1, 8, WIDTH)
    assert bool(((data.lengths >= MIN_DIGITS) & (data.lengths <= MAX_DIGITS)).all())
    for row, length in zip(data.targets.tolist(), data.lengths.tolist()):
        assert all(0 <= d <= 9 for d in row[:length]) and all(d == -1 for d in row[length:])
    # every pixel column block that is not blank comes from a digit: the ink sums agree
    assert int(data.pixels.sum()) > 0 and len(data.strings()[0]) == int(data.lengths[0])


def test_the_crnn_deploys_exactly_without_its_aux_head(tmp_path):
    model = randomize_batchnorm(digit_string_crnn()).eval()
    x = digit_strings("val", 4).images
    deployed = trainfer.deploy(model, x)
    names = [n for n, _ in deployed.named_modules()]
    assert not any("aux" in n for n in names)
    assert not any(isinstance(m, torch.nn.BatchNorm2d | torch.nn.Dropout) for m in deployed.modules())
    with torch.inference_mode():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-4)
    assert set(model.train()(x)) == {"log_probs", "aux_log_probs"}
    path = trainfer.save(
        deployed,
        tmp_path / "crnn",
        task="sequence",
        labels=list(CTC_TOKENS),
        example_inputs=x,
        decoder={"kind": "ctc", "blank": 0, "beam_width": 4},
    )
    served = Predictor.load(path)  # the deploy form's architecture, read back from the bundle
    expected = decoding.ctc_beam_search(deployed(x).detach(), beam_width=4, blank=0)
    assert [r.tokens for r in served.predict(x)] == [list(h[0].tokens) for h in expected]


def test_the_encoder_decoder_is_a_step_model_whose_batches_agree():
    torch.manual_seed(0)
    model = digit_string_seq2seq().eval()
    x = digit_strings("val", 3).images
    with torch.inference_mode():
        together = decoding.beam_search(model, x, bos=BOS, eos=EOS, max_length=7, num_beams=3)
        for i in range(3):
            alone = decoding.beam_search(model, x[i : i + 1], bos=BOS, eos=EOS, max_length=7, num_beams=3)[0]
            assert alone[0].tokens == together[i][0].tokens
            assert alone[0].score == pytest.approx(together[i][0].score, rel=1e-4)


def test_scores_and_edit_distance():
    assert sequences.edit_distance("4071", "471") == 1 and sequences.edit_distance("", "12") == 2
    result = sequences.score("m", "greedy", ["123", "45", "7"], ["123", "456", "8"])
    assert result.sequence_accuracy == pytest.approx(1 / 3) and result.cer == pytest.approx(2 / 7)


def test_the_demo_bundles_read_strings_from_png_and_unit_npy_as_the_models_were_trained(tmp_path):
    """The demo step's bundles (built at tiny settings) record digit_strings' preprocessing: a PNG of a string's
    8-bit pixels and a .npy of the pixels over 255 become the normalised tensor the models were trained on, and
    decode, through the Predictor and ``trainfer predict``, to what the step's scoring decodes from that tensor."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from trainfer.cli import main

    sequences.run(tmp_path, train_count=32, test_count=2, epochs=1)
    held_out = digit_strings("test", 3, seed=1)
    pngs = [str(tmp_path / f"str{i}.png") for i in range(len(held_out))]
    for path, pixels in zip(pngs, held_out.pixels):
        Image.fromarray(pixels[0].numpy()).save(path)
    npy = tmp_path / "strings.npy"
    np.save(npy, (held_out.pixels.numpy() / 255).astype(np.float32))
    for bundle, decode in (("crnn_bundle", sequences.ctc_strings), ("seq2seq_bundle", sequences.seq2seq_strings)):
        predictor = Predictor.load(tmp_path / bundle)
        assert torch.equal(predictor.preprocess(pngs), held_out.images)
        torch.testing.assert_close(predictor.preprocess(str(npy)), held_out.images, rtol=0, atol=1e-6)
        expected = decode(trainfer.load(tmp_path / bundle), held_out.images, 8)  # the bundle's beam width
        assert [r.text for r in predictor.predict(pngs)] == expected
        found = CliRunner().invoke(main, ["predict", str(tmp_path / bundle), pngs[0], str(npy), "--format", "jsonl"])
        assert found.exit_code == 0, found.output
        texts = [json.loads(line)["text"] for line in found.output.splitlines() if line.startswith("{")]
        assert texts == expected[:1] + expected  # the PNG, then the .npy's strings


@pytest.mark.slow
def test_both_models_learn_digit_strings_and_serve_from_their_bundles(tmp_path):
    """``trainfer demo --sequences`` at its default settings (one thread): far above chance (about 1e-4 for
    3 to 6 digits), served the same from the bundles, the cost recorded."""
    import json

    from click.testing import CliRunner

    from trainfer.cli import main

    result = CliRunner().invoke(main, ["demo", "--sequences", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = tmp_path / "sequences"
    report = json.loads((out / "scores.json").read_text())
    scores = {(s["model"], s["decoder"]): s for s in report["scores"]}
    assert scores[("crnn-ctc", "greedy")]["sequence_accuracy"] > 0.6
    assert scores[("crnn-ctc", "beam 8")]["cer"] <= scores[("crnn-ctc", "greedy")]["cer"] + 0.02
    assert scores[("encoder-decoder", "beam 8")]["sequence_accuracy"] > 0.2
    assert report["step_seconds"]["cpu"] > 0 and "s of process CPU time" in result.output
    predictor = Predictor.load(out / "crnn_bundle")
    held_out = digit_strings("test", 50, seed=1)
    texts = [r.text for r in predictor.predict(held_out.pixels / 255)]  # [0, 1], as a .npy holds them
    assert sum(t == s for t, s in zip(texts, held_out.strings())) > 25
    assert (out / "sequences.png").stat().st_size > 1000
    served = Predictor.load(out / "seq2seq_bundle").predict(held_out.pixels[:20] / 255)
    assert sum(r.text == s for r, s in zip(served, held_out.strings()[:20])) > 3
    assert "sequences.png" in (out / "report.md").read_text()
    refused = CliRunner().invoke(main, ["demo", "--sequences", "--no-sequences", "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "exclude each other" in refused.output


def _per_row(state):
    """The encoder-decoder's state with its per-item memory copied to each item's rows (the generic layout)."""
    h, memory, context = state
    return h, memory.repeat_interleave(h.shape[0] // memory.shape[0], dim=0), context


class _GenericReorder:
    """The encoder-decoder without its own reorder_state: the searches reorder a per-row memory."""

    def __init__(self, model):
        self.encode, self.step = model.encode, model.step


@pytest.mark.parametrize("within", [True, False])
def test_the_encoder_decoders_own_reorder_equals_the_generic_reorder_of_a_per_row_memory(within):
    torch.manual_seed(1)
    model = digit_string_seq2seq().double().eval()
    x = digit_strings("val", 3).images.double()
    items, beams = 3, 4
    with torch.no_grad():
        state = model.reorder_state(model.encode(x), torch.arange(items).repeat_interleave(beams))
        assert state[1].shape[0] == items  # the expansion to beams kept one memory entry per item
        state = model.step(state, torch.randint(0, 10, (items * beams,)))[1]
        if within:  # what the searches do: each item's beams drawn from its own beams
            index = (torch.randint(0, beams, (items, beams)) + beams * torch.arange(items)[:, None]).view(-1)
        else:  # rows from any item, and not a multiple of the items
            index = torch.randint(0, items * beams, (7,))
        own = model.reorder_state(state, index)
        generic = decoding.reorder_state(_per_row(state), index, items * beams)
        assert (own[1] is state[1]) == within  # memory untouched exactly when beams stay in their items
        tokens = torch.randint(0, 10, (index.shape[0],))
        lp_own, next_own = model.step(own, tokens)
        lp_generic, next_generic = model.step(generic, tokens)
    for a, b in zip(_per_row(own), generic):
        assert torch.equal(a, b)
    torch.testing.assert_close(lp_own, lp_generic, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(next_own[2], next_generic[2], rtol=1e-12, atol=1e-12)


def test_the_encoder_decoders_searches_equal_those_with_the_generic_reorder():
    torch.manual_seed(2)
    model = randomize_batchnorm(digit_string_seq2seq()).double().eval()
    x = digit_strings("val", 4).images.double()
    kw = dict(bos=BOS, eos=EOS, max_length=8, num_beams=4, num_return_sequences=4, early_stopping="never")
    own, generic = decoding.beam_search(model, x, **kw), decoding.beam_search(_GenericReorder(model), x, **kw)
    assert [[h.tokens for h in row] for row in own] == [[h.tokens for h in row] for row in generic]
    for row_own, row_generic in zip(own, generic):
        for a, b in zip(row_own, row_generic):
            assert a.score == pytest.approx(b.score, rel=1e-9) and a.finished == b.finished

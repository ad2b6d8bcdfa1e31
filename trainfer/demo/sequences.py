"""The sequence demo: train a CTC recogniser and an encoder-decoder on digit strings, deploy, serve, score.

Both models train in seconds on 2 cores (:func:`train_crnn`, :func:`train_seq2seq`), are deployed
(BN folded, dropout and the auxiliary head dropped; the encoder-decoder's conv encoder folded by
:func:`~trainfer.models.sequence.deploy_seq2seq`), verified, saved as bundles (the CRNN's records
its graph; the encoder-decoder's names its factory, see :mod:`trainfer.serve.generator_bundle`; both
record the strings' preprocessing, :func:`~trainfer.demo.digit_strings.preprocess_spec`),
and scored on held-out strings built from test-split digits: sequence accuracy (the whole string
right) and character error rate (edit distance over reference length), greedy against beam search
(:func:`evaluate`), in ``report.md`` with a plot.

The output directory is written like the main demo's: everything into a fresh staging directory
beside it, then one atomic replace (:func:`trainfer.atomic.atomic_directory`), so a failure or a
kill leaves an earlier output as it was; an existing directory is replaced only if it is provably
an earlier output of this step (:func:`is_output`).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainfer import decoding
from trainfer.atomic import DIRECTORY, FILE, atomic_directory, atomic_file
from trainfer.demo.digit_strings import DigitStrings, digit_strings, preprocess_spec
from trainfer.demo.ownership import WRITTEN, OutputLayout
from trainfer.errors import InputError
from trainfer.models.sequence import (
    BOS,
    CTC_TOKENS,
    EOS,
    SEQ_TOKENS,
    DigitStringSeq2Seq,
    deploy_seq2seq,
    digit_string_crnn,
    digit_string_seq2seq,
)
from trainfer.reparam.deploy import deploy
from trainfer.reparam.verify import verify
from trainfer.serve.bundle import save

EPOCHS = 10
"""Training epochs of each model by default (``trainfer demo`` passes at most its ``--epochs``)."""
TRAIN_COUNT, BATCH_SIZE, LR = 1000, 32, 1e-2
"""Training strings, batch size and AdamW learning rate by default: measured on 2 cores, half the
strings at twice the steps per epoch and 2.5x the rate learn as well as 2000 strings in batches of
64 at 4e-3, at about half the training CPU time (docs/sequences.md, "Measured")."""
OUTPUTS = {
    **dict.fromkeys(["report.md", "scores.json", "sequences.png"], FILE),
    **dict.fromkeys(["crnn_bundle", "seq2seq_bundle"], DIRECTORY),
}
"""What the step writes into its output directory, each with its type: all that an earlier output it may
replace holds, and the most a rerun deletes of it (:data:`LAYOUT`, :func:`staged_output`)."""
MAX_SCORES_BYTES = 1 << 20
"""The most of an existing ``scores.json`` read to prove it is this step's (:func:`is_output`), or to learn
which files it wrote (:data:`LAYOUT`)."""
LAYOUT = OutputLayout(OUTPUTS, "scores.json", MAX_SCORES_BYTES)
"""The step's output: ``scores.json`` records the files it wrote into its bundles, so that a rerun deletes a
bundle directory only when it holds nothing else (:class:`~trainfer.demo.ownership.OutputLayout`)."""


@dataclass(frozen=True)
class Scores:
    """Sequence accuracy and character error rate of one model and decoder on held-out strings."""

    model: str
    decoder: str
    sequence_accuracy: float
    cer: float


def edit_distance(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Levenshtein distance (insertions, deletions, substitutions each cost 1)."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def score(model: str, decoder: str, predicted: Sequence[str], truth: Sequence[str]) -> Scores:
    """Sequence accuracy and CER = sum of edit distances / sum of reference lengths."""
    exact = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    cer = sum(edit_distance(p, t) for p, t in zip(predicted, truth)) / sum(len(t) for t in truth)
    return Scores(model, decoder, exact, cer)


def _batches(count: int, size: int, gen: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(count, generator=gen).split(size))


def train_crnn(
    data: DigitStrings, epochs: int = EPOCHS, seed: int = 0, aux_weight: float = 0.3, batch_size: int = BATCH_SIZE
) -> nn.Module:
    """CTC training of :func:`~trainfer.models.sequence.digit_string_crnn`, the aux head weighted ``aux_weight``."""
    torch.manual_seed(seed)
    model = digit_string_crnn()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    targets = data.targets + 1  # digit d is CTC id d + 1 (0 is the blank)
    model.train()
    for _ in range(epochs):
        for index in _batches(len(data), batch_size, gen):
            out = model(data.images[index])
            frames = out["log_probs"].shape[1]
            lengths = torch.full((len(index),), frames, dtype=torch.long)
            labels, label_lengths = targets[index].clamp(min=1), data.lengths[index]
            main, aux = (
                F.ctc_loss(out[key].transpose(0, 1), labels, lengths, label_lengths, zero_infinity=True)
                for key in ("log_probs", "aux_log_probs")
            )
            loss = main + aux_weight * aux
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def seq2seq_targets(data: DigitStrings) -> tuple[Tensor, Tensor]:
    """Teacher forcing pairs: inputs ``BOS d1 .. dn`` and outputs ``d1 .. dn EOS``, padded with EOS (ignored)."""
    width = data.targets.shape[1] + 1
    out = torch.full((len(data), width), -100, dtype=torch.long)
    inputs = torch.full((len(data), width), EOS, dtype=torch.long)
    inputs[:, 0] = BOS
    for n, length in enumerate(data.lengths.tolist()):
        out[n, :length] = data.targets[n, :length]
        out[n, length] = EOS
        inputs[n, 1 : length + 1] = data.targets[n, :length]
    return inputs, out


def train_seq2seq(
    data: DigitStrings, epochs: int = EPOCHS, seed: int = 0, batch_size: int = BATCH_SIZE
) -> DigitStringSeq2Seq:
    """Teacher-forced training of :func:`~trainfer.models.sequence.digit_string_seq2seq` (NLL per token)."""
    torch.manual_seed(seed)
    model = digit_string_seq2seq()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    inputs, outputs = seq2seq_targets(data)
    model.train()
    for _ in range(epochs):
        for index in _batches(len(data), batch_size, gen):
            log_probs = model(data.images[index], inputs[index])
            loss = F.nll_loss(log_probs.flatten(0, 1), outputs[index].flatten(), ignore_index=-100)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def ctc_strings(model: nn.Module, images: Tensor, beam_width: int) -> list[str]:
    """Decoded strings of a CTC model: greedy for ``beam_width`` 1, else prefix beam search."""
    with torch.inference_mode():
        log_probs = model(images)
    if beam_width == 1:
        found = decoding.ctc_greedy(log_probs, blank=0)
    else:
        found = [list(h[0].tokens) for h in decoding.ctc_beam_search(log_probs, beam_width=beam_width, blank=0)]
    return ["".join(CTC_TOKENS[i] for i in row) for row in found]


def seq2seq_strings(model: nn.Module, images: Tensor, beam_width: int, max_length: int = 8) -> list[str]:
    """Decoded strings of the encoder-decoder: greedy or beam search (HF semantics, length penalty 1)."""
    settings: dict[str, Any] = {"bos": BOS, "eos": EOS, "max_length": max_length}
    with torch.inference_mode():
        if beam_width == 1:
            found = [h.tokens for h in decoding.greedy_search(model, images, **settings)]
        else:
            found = [h[0].tokens for h in decoding.beam_search(model, images, num_beams=beam_width, **settings)]
    return ["".join(str(t) for t in row if t < 10) for row in found]


def evaluate(crnn: nn.Module, seq2seq: nn.Module, held_out: DigitStrings, beam_width: int = 8) -> list[Scores]:
    """Both models, greedy and beam, on ``held_out``."""
    truth = held_out.strings()
    out = []
    for name, decode, model in (("crnn-ctc", ctc_strings, crnn), ("encoder-decoder", seq2seq_strings, seq2seq)):
        for width in (1, beam_width):
            label = "greedy" if width == 1 else f"beam {width}"
            out.append(score(name, label, decode(model, held_out.images, width), truth))
    return out


def is_output(path: Path) -> bool:
    """Whether ``path`` is a directory (not a link) holding nothing but an earlier output of this step:
    every name among :data:`OUTPUTS`, and a ``scores.json`` (at most :data:`MAX_SCORES_BYTES`) that is
    a JSON object with a ``scores`` list, as :func:`run` writes."""
    scores = path / "scores.json"
    try:
        if path.is_symlink() or not path.is_dir() or not {p.name for p in path.iterdir()} <= OUTPUTS.keys():
            return False
        if scores.is_symlink() or not scores.is_file() or scores.stat().st_size > MAX_SCORES_BYTES:
            return False
        found = json.loads(scores.read_text("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(found, dict) and isinstance(found.get("scores"), list)


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A fresh staging directory beside ``out`` that atomically replaces it once the block succeeds.

    Made before any work, so an unwritable ``out`` fails at once (:class:`~trainfer.errors.WriteError`);
    an existing ``out`` that is neither an empty directory nor :func:`is_output` is refused
    (:class:`~trainfer.errors.InputError`). The replace deletes only the earlier output's own entries
    (:meth:`LAYOUT.own <trainfer.demo.ownership.OutputLayout.own>`): a file written into ``out`` or one of its
    bundles meanwhile keeps the earlier output beside it, with a warning. A failure removes
    the staging directory; after a kill, the next write's recovery does.
    """
    if os.path.lexists(out) and not (_empty_directory(out) or is_output(out)):
        raise InputError(f"refusing to replace {str(out)!r}: it exists and is not a trainfer sequence demo output")
    with atomic_directory(out, own=LAYOUT.own) as work:
        yield work


def _empty_directory(path: Path) -> bool:
    """Whether ``path`` is an empty directory (not a link): replacing it loses nothing."""
    try:
        return not path.is_symlink() and path.is_dir() and next(path.iterdir(), None) is None
    except OSError:
        return False


def run(
    out_dir: str | Path | None = None,
    train_count: int = TRAIN_COUNT,
    test_count: int = 500,
    epochs: int = EPOCHS,
    seed: int = 0,
) -> dict[str, Any]:
    """Train, deploy, verify and score both models; with ``out_dir``, also a bundle, a plot and the scores.

    ``out_dir`` is written through :func:`staged_output`: all of it or, on any failure, none of it.
    The report records the step's cost: wall-clock and process CPU seconds from data to written files.
    """
    if out_dir is None:
        return _run(None, train_count, test_count, epochs, seed)
    with staged_output(Path(out_dir)) as work:
        return _run(work, train_count, test_count, epochs, seed)


def _run(out: Path | None, train_count: int, test_count: int, epochs: int, seed: int) -> dict[str, Any]:
    """:func:`run`'s steps, writing into ``out`` (a staging directory); paths recorded are relative to it."""
    began, began_cpu = time.perf_counter(), time.process_time()
    train, held_out = digit_strings("train", train_count, seed), digit_strings("test", test_count, seed + 1)
    start = time.perf_counter()
    crnn = train_crnn(train, epochs, seed)
    crnn_seconds = time.perf_counter() - start
    seq2seq = train_seq2seq(train, epochs, seed)
    seq2seq_seconds = time.perf_counter() - start - crnn_seconds
    example = held_out.images[:4]
    deployed = deploy(crnn, example)  # raises EquivalenceError unless the forms agree
    folded = deploy_seq2seq(seq2seq)
    errors = {
        "crnn-ctc": verify(crnn, deployed, held_out.images[:64]).max_abs_error,
        "encoder-decoder encoder": verify(seq2seq.encoder, folded.encoder, held_out.images[:64]).max_abs_error,
    }
    scores = evaluate(deployed, folded, held_out)
    report: dict[str, Any] = {
        "settings": {
            "train_strings": train_count,
            "held_out_strings": test_count,
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "threads": torch.get_num_threads(),
        },
        "train_seconds": {"crnn-ctc": crnn_seconds, "encoder-decoder": seq2seq_seconds},
        "deploy_max_abs_error": errors,
        "scores": [asdict(s) for s in scores],
    }
    if out is not None:
        save(
            deployed,
            out / "crnn_bundle",
            task="sequence",
            labels=list(CTC_TOKENS),
            decoder={"kind": "ctc", "blank": 0, "beam_width": 8},
            preprocess=preprocess_spec(),
            example_inputs=example,
        )
        save(
            folded,
            out / "seq2seq_bundle",
            task="sequence",
            labels=list(SEQ_TOKENS),
            decoder={"kind": "autoregressive", "bos": BOS, "eos": EOS, "beam_width": 8, "max_length": 8},
            preprocess=preprocess_spec(),
            example_inputs=example[:1],
        )
        report["plot"] = plot(scores, out / "sequences.png").name
    report["step_seconds"] = {"wall": time.perf_counter() - began, "cpu": time.process_time() - began_cpu}
    if out is not None:
        with atomic_file(out / "scores.json") as tmp:
            tmp.write_text(json.dumps({**report, WRITTEN: LAYOUT.written(out)}, indent=2))
        with atomic_file(out / "report.md") as tmp:
            tmp.write_text(markdown(report, scores))
    return report


def markdown(report: dict[str, Any], scores: Sequence[Scores]) -> str:
    """The step's report: training times, deploy errors, the scores table and the plot."""
    rows = "\n".join(f"| {s.model} | {s.decoder} | {s.sequence_accuracy:.3f} | {s.cer:.3f} |" for s in scores)
    errors = ", ".join(f"{name} {value:.1e}" for name, value in report["deploy_max_abs_error"].items())
    seconds = ", ".join(f"{name} {value:.1f} s" for name, value in report["train_seconds"].items())
    settings, step = report["settings"], report["step_seconds"]
    return (
        "# Sequences: digit strings, greedy vs beam search\n\n"
        f"{settings['train_strings']} training strings, {settings['epochs']} epochs (batch {settings['batch_size']}, "
        f"AdamW lr {settings['lr']}), {settings['held_out_strings']} held-out strings, "
        f"{settings['threads']} torch thread(s). The step took {step['wall']:.1f} s wall-clock, "
        f"{step['cpu']:.1f} s of process CPU time.\n\n"
        f"Training (wall-clock): {seconds}. Deploy max abs error (float32): {errors}.\n\n"
        "| model | decoder | sequence accuracy | CER |\n| --- | --- | --- | --- |\n"
        f"{rows}\n\n![greedy vs beam](sequences.png)\n\n"
        "Bundles: `crnn_bundle/` (CTC, prefix beam 8) and `seq2seq_bundle/` (autoregressive, beam 8), "
        "served by `trainfer predict BUNDLE strings.npy` (or a PNG of a string): they record the "
        "preprocessing the models were trained with, so they take a string's 8-bit pixels over 255, in [0, 1]. "
        "docs/sequences.md shows how to write `strings.npy` and a PNG from `trainfer.demo.digit_strings`.\n"
    )


def plot(scores: Sequence[Scores], path: Path) -> Path:
    """Bars of sequence accuracy and CER per model, greedy beside beam."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 3.4), layout="constrained")
    axes = figure.subplots(1, 2)
    models = list(dict.fromkeys(s.model for s in scores))
    decoders = list(dict.fromkeys(s.decoder for s in scores))
    for axis, metric in zip(axes, ("sequence_accuracy", "cer")):
        for k, dec in enumerate(decoders):
            values = [next(getattr(s, metric) for s in scores if s.model == m and s.decoder == dec) for m in models]
            axis.bar([i + 0.38 * k for i in range(len(models))], values, width=0.36, label=dec)
        axis.set_xticks([i + 0.19 for i in range(len(models))], models)
        axis.set_title({"sequence_accuracy": "sequence accuracy", "cer": "character error rate"}[metric])
    axes[0].legend()
    figure.suptitle("held-out digit strings (test-split digits)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    return path

"""Decoding speed: sequences/s of CTC prefix beam search and autoregressive beam search at beams 1, 4, 8.

CTC decodes random per-frame log-probs (no model: all the time is the search's). The autoregressive
search drives a GRU decoder (embedding, GRUCell, attention-free output layer over the encoder's
memory); the time spent inside the model's ``step`` is measured apart, and the share outside it is
the search's own overhead (target: under 20 % at beam 4). Both clocks are reported: wall time
(``perf_counter``) and this process's CPU time (``process_time``; at ``--threads 1`` it is the
work done, unaffected by other processes sharing the cores, which inflate the wall figures).

    .venv/bin/python benchmarks/bench_decoding.py [--batch 32] [--frames 40] [--classes 11]
        [--hidden 256] [--vocab 64] [--max-length 20] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from trainfer import decoding


class GRUDecoder(torch.nn.Module):
    """A user's GRU decoder behind the ``encode`` / ``step`` interface, timing its own steps."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.cell = torch.nn.GRUCell(hidden, hidden)
        self.out = torch.nn.Linear(2 * hidden, vocab)
        self.step_seconds = 0.0
        self.step_cpu_seconds = 0.0

    def encode(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(memory), memory

    def step(self, state, tokens):
        start, cpu = time.perf_counter(), time.process_time()
        h, memory = state
        h = self.cell(self.embed(tokens), h)
        log_probs = self.out(torch.cat([h, memory], dim=1)).log_softmax(dim=1)
        self.step_seconds += time.perf_counter() - start
        self.step_cpu_seconds += time.process_time() - cpu
        return log_probs, (h, memory)


def best_of(repeats: int, run) -> float:
    """The fastest of ``repeats`` runs of ``run()``, in seconds (after one warm-up run)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=40, help="CTC frames per item")
    parser.add_argument("--classes", type=int, default=11, help="CTC classes (blank included)")
    parser.add_argument("--hidden", type=int, default=256, help="GRU width of the autoregressive model")
    parser.add_argument("--vocab", type=int, default=64, help="autoregressive vocabulary")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    log_probs = (3 * torch.randn(args.batch, args.frames, args.classes)).log_softmax(dim=2)
    print(f"CTC: {args.batch} items x {args.frames} frames x {args.classes} classes, {args.threads} thread(s)")
    greedy = best_of(args.repeats, lambda: decoding.ctc_greedy(log_probs))
    print(f"  greedy   {args.batch / greedy:10.0f} sequences/s")
    for width in (1, 4, 8):
        seconds = best_of(args.repeats, lambda w=width: decoding.ctc_beam_search(log_probs, beam_width=w))
        print(f"  beam {width:<3d} {args.batch / seconds:10.0f} sequences/s")

    model = GRUDecoder(args.vocab, args.hidden).eval()
    memory = torch.randn(args.batch, args.hidden)
    settings = dict(bos=0, eos=1, max_length=args.max_length)
    print(f"autoregressive: GRU {args.hidden} wide, vocabulary {args.vocab}, max_length {args.max_length}")
    for width in (1, 4, 8):
        walls, cpus = [], []  # (total, inside step) per run and clock; each clock's fastest run is reported
        for _ in range(args.repeats + 1):
            model.step_seconds = model.step_cpu_seconds = 0.0
            start, cpu = time.perf_counter(), time.process_time()
            decoding.beam_search(model, memory, num_beams=width, early_stopping="never", **settings)
            walls.append((time.perf_counter() - start, model.step_seconds))
            cpus.append((time.process_time() - cpu, model.step_cpu_seconds))
        (wall, wall_in), (cpu, cpu_in) = min(walls[1:]), min(cpus[1:])
        print(
            f"  beam {width:<3d} {args.batch / wall:10.0f} sequences/s, outside the model: "
            f"{100 * (1 - wall_in / wall):5.1f} % of wall, {100 * (1 - cpu_in / cpu):5.1f} % of CPU time"
        )


if __name__ == "__main__":
    main()

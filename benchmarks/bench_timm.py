"""``trainfer.deploy`` on timm's architectures, against timm's own ``reparameterize_model``.

For each model (random weights, random non-trivial BatchNorm statistics, one small input):
whether deploy is exact (float64 max relative error; float32 check), how many BatchNorm kernels
each form still executes (executed aten ops, not module types), the protocols deploy kept or
undid, and the latency ratio deploy / timm-reparameterized, timed paired and alternating in one
run (``trainfer.bench.time_forms``). Each model runs in its own forked process under a time limit,
so one hang or crash costs its row only.

Needs timm (``make test-timm`` builds ``.venv-next``: torch 2.14.1, torchvision 0.29.1, timm 1.0.31):

    .venv-next/bin/python benchmarks/bench_timm.py [--size 64] [--rounds 5] [--models repvgg_a0,...]
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

#: timm's re-parameterizable families (their own protocols), then classic BatchNorm CNNs.
REPARAM_MODELS = (
    "repvgg_a0",
    "mobileone_s0",
    "fastvit_t8",
    "repghostnet_050",
    "repvit_m0_9",
    "levit_128s",
    "efficientvit_m0",
    "tiny_vit_5m_224",
)
BN_CNNS = (
    "resnet18",
    "resnet50d",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "regnetx_002",
    "ese_vovnet19b_dw",
    "mobilevitv2_050",
)
#: Families whose attention or position biases are sized at construction: they take ``img_size``.
SIZED = ("levit", "efficientvit_m", "mobilevitv2")


@dataclass
class Row:
    """One model's figures; ``error`` is set (and the rest zero) when deploy raised or timed out."""

    model: str
    ok: bool = False
    max_rel_error_float64: float = float("nan")
    batch_norms_train: int = 0
    batch_norms_deploy: int = 0
    batch_norms_timm: int = 0
    convolutions_deploy: int = 0
    convolutions_timm: int = 0
    protocols_kept: int = 0
    protocols_undone: int = 0
    fallbacks: int = 0
    deploy_seconds: float = 0.0
    latency_ratio: float = float("nan")
    error: str = ""


def build(name: str, size: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """timm's ``name`` with random weights and BatchNorm statistics, in eval mode, and a ``1x3xSxS`` input."""
    import timm

    from trainfer.testing import randomize_batchnorm

    torch.manual_seed(seed)
    options = {"img_size": size} if name.startswith(SIZED) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **options)
    randomize_batchnorm(model, seed).eval()
    return model, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def compare(name: str, size: int, rounds: int = 0) -> Row:
    """Deploy ``name`` and reparameterize it with timm; count what each executes; time both if ``rounds``."""
    from timm.utils.model import reparameterize_model

    import trainfer
    from trainfer.bench import time_forms
    from trainfer.testing import batch_norm_calls, count_aten_ops

    model, x = build(name, size)
    start = time.perf_counter()
    try:
        deployed = trainfer.deploy(model, x)
        report = deployed.trainfer_report
    except trainfer.EquivalenceError as failure:
        report = failure.report
    seconds = time.perf_counter() - start
    row = Row(name, ok=report.ok, deploy_seconds=seconds)
    row.max_rel_error_float64 = report.verification["float64"].max_rel_error
    row.protocols_kept, row.protocols_undone = len(report.protocols), len(report.protocols_rejected)
    row.fallbacks = len(report.fallbacks)
    if not report.ok:
        row.error = report.failure()[:200]
        return row
    theirs = reparameterize_model(model)
    row.batch_norms_train = batch_norm_calls(model, x)
    row.batch_norms_deploy, row.batch_norms_timm = batch_norm_calls(deployed, x), batch_norm_calls(theirs, x)
    row.convolutions_deploy = count_aten_ops(deployed, x)["convolution"]
    row.convolutions_timm = count_aten_ops(theirs, x)["convolution"]
    if rounds:
        timings = time_forms({"deploy": deployed, "timm": theirs}, x, rounds=rounds, repeats=3, threads=1)
        row.latency_ratio = timings["deploy"].median_s / timings["timm"].median_s
    return row


def require(libraries: Iterable[str], make_target: str) -> None:
    """Return when this Python imports every one of ``libraries``; otherwise say in one line on stderr which
    it lacks and how to get them (``make MAKE_TARGET`` builds ``.venv-next``), and exit with status 2."""
    missing = [name for name in dict.fromkeys(libraries) if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"error: {sys.argv[0]} needs {', '.join(missing)}, which {sys.executable} cannot import: "
            f"`make {make_target}` builds .venv-next with them; run .venv-next/bin/python {sys.argv[0]}",
            file=sys.stderr,
        )
        raise SystemExit(2)


def run_isolated(function: Callable[..., Any], args: tuple[Any, ...], timeout: float, row: type = Row) -> Any:
    """``function(*args)`` in a forked process; a timeout or an exception becomes the row's ``error``.

    ``row`` is the dataclass ``function`` returns (its first field the model's name, with an ``error`` field).
    """
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def target() -> None:
        try:
            queue.put(asdict(function(*args)))
        except Exception as error:  # noqa: BLE001 - reported in the row, with where it came from
            where = traceback.extract_tb(error.__traceback__)[-1]
            queue.put(asdict(row(args[0], error=f"{type(error).__name__}: {str(error)[:160]} ({where.name})")))

    process = context.Process(target=target)
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return row(args[0], error=f"no result within {timeout:.0f} s")
    return row(**queue.get()) if not queue.empty() else row(args[0], error=f"exit code {process.exitcode}")


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | exact (float64 max rel) | BN kernels: train / deploy / timm | convs deploy / timm "
        "| protocols kept / undone | latency deploy / timm |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | no: {r.error} | | | | |")
            continue
        lines.append(
            f"| {r.model} | yes ({r.max_rel_error_float64:.1e}) | {r.batch_norms_train} / {r.batch_norms_deploy} / "
            f"{r.batch_norms_timm} | {r.convolutions_deploy} / {r.convolutions_timm} | {r.protocols_kept} / "
            f"{r.protocols_undone} | {r.latency_ratio:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per model")
    parser.add_argument("--models", default=",".join(REPARAM_MODELS + BN_CNNS), help="comma-separated timm names")
    args = parser.parse_args()
    require(["timm"], "test-timm")
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        rows.append(run_isolated(compare, (name, args.size, args.rounds), args.timeout))
        print(f"{name}: {rows[-1]}", flush=True)
    import timm

    print(f"\ntorch {torch.__version__}, timm {timm.__version__}, input 1x3x{args.size}x{args.size}, 1 thread\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()

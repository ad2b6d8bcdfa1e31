"""What channel pruning (``trainfer.prune``) buys, measured in one run.

1. digits (the demo's ``digits_net``, width 32, and a wider variant, width 96), each trained
   briefly: test accuracy before and after pruning at 30 / 50 / 70 % of the channels, without and
   with fine-tuning (the demo's loop, a few epochs on the pruned deploy form), MACs and parameters,
   and latency ratios pruned / unpruned deploy form at batch 1 and 256, paired (interleaved) in one
   run: wall clock at two threads, and process CPU time at one thread;
2. ``repvgg_a0`` and a ResNet-18-shaped model in plain PyTorch (random weights, 1x3x224x224) at
   50 %: latency ratio against MACs ratio (how close a narrower network comes to its MACs);
3. for each model: float, pruned (50 %), int8 and pruned + int8 (``trainfer.quantize``, ungated:
   QDQ on ONNX Runtime), latency ratios to the float deploy form, the four forms interleaved in one
   run, wall clock at two threads and process CPU time at one thread (an ONNX Runtime session per
   thread count).

    .venv/bin/python benchmarks/bench_prune.py [--epochs 8] [--finetune-epochs 3] [--rounds 5] [--part all|digits|large]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import trainfer
from trainfer.bench import count_macs, num_threads, time_forms
from trainfer.demo import data
from trainfer.demo.train import fit
from trainfer.models import digits_net, repvgg_a0

OPEN = trainfer.AccuracyGate(min_agreement=0.0, max_accuracy_drop=None)  # passes any candidate, deliberately
RATIOS = (0.3, 0.5, 0.7)
WALL_THREADS = 2


def train(model: nn.Module, epochs: int, lr: float = 3e-3) -> nn.Module:
    loaders = data.loaders(64, 0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    fit(model, loaders.train, loaders.val, epochs, optimizer, scheduler=scheduler, progress=False)
    return model.eval()


def accuracy(model: Callable[[Tensor], Tensor], inputs: Tensor, labels: Tensor) -> float:
    with torch.inference_mode():
        return float((model(inputs).argmax(1) == labels).double().mean())


def cpu_times(forms: dict[str, Callable[..., Any]], x: Tensor, rounds: int, repeats: int) -> dict[str, float]:
    """Median process CPU seconds per call at one thread, forms interleaved."""
    samples: dict[str, list[float]] = {name: [] for name in forms}
    with num_threads(1), torch.inference_mode():
        for model in forms.values():
            model(x)
        for _ in range(rounds):
            for name, model in forms.items():
                start = time.process_time()
                for _ in range(repeats):
                    model(x)
                samples[name].append((time.process_time() - start) / repeats)
    return {name: sorted(values)[len(values) // 2] for name, values in samples.items()}


def latency_ratios(
    wall_forms: dict[str, Callable[..., Any]], cpu_forms: dict[str, Callable[..., Any]], x: Tensor, rounds: int
) -> dict[str, tuple[float, float]]:
    """Per form but the first (the reference): (wall-clock ratio at two threads, CPU-time ratio at one thread).

    ``wall_forms`` and ``cpu_forms`` are the same forms (the same names) set up for each thread count.
    """
    reference = next(iter(wall_forms))
    wall = time_forms(wall_forms, x, rounds=rounds, repeats=4, threads=WALL_THREADS)
    cpu = cpu_times(cpu_forms, x, rounds, 2 if len(x) > 1 else 8)
    return {
        name: (wall[name].median_s / wall[reference].median_s, cpu[name] / cpu[reference])
        for name in list(wall_forms)[1:]
    }


def ort_session(onnx: bytes, threads: int) -> Callable[[Tensor], Tensor]:
    """An ONNX Runtime session on an int8 model with ``threads`` intra-op threads, called on a tensor."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def with_int8(base: nn.Module, pruned: nn.Module, calibration: Tensor) -> tuple[dict[str, Any], dict[str, Any]]:
    """float, pruned, int8, pruned + int8, set up for the wall-clock (two threads) and the CPU-time (one) runs."""
    floats = {"float": base, "pruned": pruned}
    int8 = {
        name: trainfer.quantize(model, calibration, validation=calibration[:8], gate=OPEN, equalize=False).onnx_bytes
        for name, model in (("int8", base), ("pruned + int8", pruned))
    }
    wall, cpu = ({**floats, **{name: ort_session(onnx, threads) for name, onnx in int8.items()}}
                 for threads in (WALL_THREADS, 1))  # fmt: skip
    return wall, cpu


def print_ratios(title: str, ratios: dict[str, tuple[float, float]]) -> None:
    print(f"  {title}: latency / float (wall, {WALL_THREADS} threads | CPU time, 1 thread): "
          + ", ".join(f"{n} {w:.2f} | {c:.2f}" for n, (w, c) in ratios.items()))  # fmt: skip


def digits(width: int, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    model = train(digits_net(width=width), args.epochs)
    test = data.splits()["test"]
    inputs, labels = data.normalize(test.pixels), test.labels
    example = inputs[:2]
    base = trainfer.deploy(model, example)
    macs0 = count_macs(base, example[:1])
    params0 = sum(p.numel() for p in base.parameters())
    print(f"\ndigits_net width {width}: test accuracy {accuracy(base, inputs, labels):.2%}, "
          f"{macs0} MACs, {params0} parameters")  # fmt: skip
    forms: dict[str, nn.Module] = {}
    for ratio in RATIOS:
        for tuned in (False, True):
            finetune = (lambda m: train(m, args.finetune_epochs, lr=1e-3)) if tuned else None
            pruned = trainfer.prune(base, example, ratio=ratio, gate=OPEN, finetune=finetune).eval()
            name = f"{int(ratio * 100)}%{' +ft' if tuned else ''}"
            forms[name] = pruned
            macs = count_macs(pruned, example[:1])
            params = sum(p.numel() for p in pruned.parameters())
            print(f"  {name:<8} accuracy {accuracy(pruned, inputs, labels):7.2%}  MACs {macs / macs0:6.1%}  "
                  f"params {params / params0:6.1%}")  # fmt: skip
    untuned: dict[str, Callable[..., Any]] = {
        "float": base,
        **{name: form for name, form in forms.items() if "ft" not in name},
    }
    train_inputs = data.normalize(data.splits()["train"].pixels)
    wall_forms, cpu_forms = with_int8(base, forms["50% +ft"], train_inputs)
    for name, form in wall_forms.items():
        print(f"  {name:<14} test accuracy {accuracy(form, inputs, labels):7.2%}")
    for batch in (1, 256):
        x = inputs[:batch] if batch <= len(inputs) else inputs.repeat(2, 1, 1, 1)[:batch]
        print_ratios(f"batch {batch}, pruned", latency_ratios(untuned, untuned, x, args.rounds))
        print_ratios(f"batch {batch}, int8 (pruned = 50% +ft)", latency_ratios(wall_forms, cpu_forms, x, args.rounds))


class BasicBlock(nn.Module):
    """ResNet's basic block as a user writes it."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))  # fmt: skip
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def large(name: str, model: nn.Module, args: argparse.Namespace) -> None:
    trainfer.numerics.randomize_batchnorm(model)
    x = torch.randn(1, 3, 224, 224)
    base = trainfer.deploy(model.eval(), x)
    pruned = trainfer.prune(base, x, ratio=0.5, gate=OPEN).eval()
    macs = count_macs(pruned, x) / count_macs(base, x)
    wall_forms, cpu_forms = with_int8(base, pruned, torch.randn(16, 3, 224, 224))
    print(f"\n{name} at 50 %: MACs ratio {macs:.3f}")
    print_ratios("batch 1", latency_ratios(wall_forms, cpu_forms, x, args.rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs of each digits model.")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="Fine-tuning epochs after pruning.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved timing rounds.")
    parser.add_argument("--part", choices=["all", "digits", "large"], default="all", help="Which part to run.")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for width in (32, 96) if args.part in ("all", "digits") else ():
        digits(width, args)
    if args.part in ("all", "large"):
        large("repvgg_a0", repvgg_a0(), args)
        large("ResNet-18 (plain PyTorch)", ResNet18(), args)


if __name__ == "__main__":
    main()

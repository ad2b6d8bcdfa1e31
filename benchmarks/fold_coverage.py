"""What deploy folds in models written the way other repositories write them (issue 14): executed ops.

Builds each model from the robustness tests (tests/test_fold_robustness.py: DBB's BNAndPadLayer,
timm-style BatchNormAct2d, ACNet's crop, avg-down shortcuts, a normalised head), deploys it in
float64 with ``protocols=False`` (the folder alone) and prints a markdown table of the aten ops one
forward executes before -> after, with deploy's own float64 error.

    .venv/bin/python benchmarks/fold_coverage.py [--seed 0]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_fold_robustness as t
from torch import nn

import trainfer
from trainfer.testing import batch_norm_calls, count_aten_ops, randomize_batchnorm


def cases() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Each model, built now (its random weights from the current seed), and its input shape."""
    return {
        "AvgPool2d(3,1,1) -> BN": (nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(8)), (1, 8, 12, 12)),
        "avg-down: AvgPool2d(2,2) -> 1x1 conv -> BN": (
            nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)),
            (2, 8, 12, 12),
        ),
        "DBB ResNet-ish (BNAndPad border fill)": (t.dbb_resnet(), (2, 3, 12, 12)),
        "timm-style BatchNormAct2d EfficientNet-ish": (
            nn.Sequential(
                nn.Conv2d(8, 8, 3, padding=1, bias=False),
                t.BatchNormAct2d(8),
                t.InvertedResidualBNAct(8),
                t.InvertedResidualBNAct(8),
            ),
            (2, 8, 9, 9),
        ),
        "BN -> GAP -> flatten -> Linear head": (t.NormHead("view"), (2, 3, 7, 7)),
        "ACNet ACBlock(k=3, padding=0, crop)": (nn.Sequential(t.ACBlock(3, 5, 3, 1, 0), nn.ReLU()), (2, 3, 11, 12)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    print("| model | convs | batch norms | avg pools | float64 max rel error |")
    print("|---|---|---|---|---|")
    for name, (model, shape) in cases().items():
        randomize_batchnorm(model)
        model = model.double().eval()
        x = torch.randn(shape, dtype=torch.float64)
        before = count_aten_ops(model, x)
        d = trainfer.deploy(copy.deepcopy(model), x, protocols=False)
        after = count_aten_ops(d, x)
        err = d.trainfer_report.verification["float64"].max_rel_error
        cells = [f"{before[op]} -> {after[op]}" for op in ("convolution",)]
        cells.append(f"{batch_norm_calls(model, x)} -> {batch_norm_calls(d, x)}")
        cells.append(f"{before['avg_pool2d']} -> {after['avg_pool2d']}")
        print(f"| {name} | " + " | ".join(cells) + f" | {err:.1e} |")


if __name__ == "__main__":
    main()

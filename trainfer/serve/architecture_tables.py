"""The allow-lists of a recorded architecture (:mod:`trainfer.serve.architecture`): the module types with
the constructor arguments read from each, the functions, methods and tensor attributes a node may name,
the node kinds and dtypes. Nothing outside these tables is ever described, imported, built or called.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ATTRIBUTES", "DTYPES", "FUNCTIONS", "FUNCTION_NAMES", "KIND", "MAX_INT", "METHODS", "MODULES", "OPERATORS", "OPS",
    "TYPE_NAMES",
]  # fmt: skip

KIND = "fx-graph"
_CONV = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "bias",
    "padding_mode",
)
_BATCH_NORM = ("num_features", "eps", "momentum", "affine", "track_running_stats", "bias")
_INPLACE = ("inplace",)
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")

#: The module types a described graph may hold, with the constructor arguments read from each (in the
#: order of torch's signatures; tests/test_architecture.py checks them against the installed torch).
MODULES: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Conv1d": (nn.Conv1d, _CONV),
    "Conv2d": (nn.Conv2d, _CONV),
    "Conv3d": (nn.Conv3d, _CONV),
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "BatchNorm1d": (nn.BatchNorm1d, _BATCH_NORM),
    "BatchNorm2d": (nn.BatchNorm2d, _BATCH_NORM),
    "BatchNorm3d": (nn.BatchNorm3d, _BATCH_NORM),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape", "eps", "elementwise_affine", "bias")),
    "GroupNorm": (nn.GroupNorm, ("num_groups", "num_channels", "eps", "affine", "bias")),
    "ReLU": (nn.ReLU, _INPLACE),
    "ReLU6": (nn.ReLU6, _INPLACE),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope", "inplace")),
    "GELU": (nn.GELU, ("approximate",)),
    "SiLU": (nn.SiLU, _INPLACE),
    "Mish": (nn.Mish, _INPLACE),
    "Hardswish": (nn.Hardswish, _INPLACE),
    "Hardsigmoid": (nn.Hardsigmoid, _INPLACE),
    "ELU": (nn.ELU, ("alpha", "inplace")),
    "Sigmoid": (nn.Sigmoid, ()),
    "Tanh": (nn.Tanh, ()),
    "Softmax": (nn.Softmax, ("dim",)),
    "Identity": (nn.Identity, ()),
    "MaxPool1d": (nn.MaxPool1d, _MAX_POOL),
    "MaxPool2d": (nn.MaxPool2d, _MAX_POOL),
    "AvgPool1d": (nn.AvgPool1d, _AVG_POOL[:-1]),
    "AvgPool2d": (nn.AvgPool2d, _AVG_POOL),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",)),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "AdaptiveMaxPool2d": (nn.AdaptiveMaxPool2d, ("output_size", "return_indices")),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Dropout": (nn.Dropout, ("p", "inplace")),
    "Dropout2d": (nn.Dropout2d, ("p", "inplace")),
    "Sequential": (nn.Sequential, ()),
}
TYPE_NAMES = {cls: name for name, (cls, _) in MODULES.items()}

OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "neg", "matmul", "pow", "getitem", "iadd", "imul")
_TORCH = (
    "add", "sub", "mul", "div", "cat", "stack", "flatten", "reshape", "permute", "transpose", "squeeze", "unsqueeze",
    "chunk", "split", "mean", "sum", "amax", "matmul", "clamp", "relu", "sigmoid", "tanh", "softmax", "exp", "sqrt",
    "neg", "conv2d", "addmm", "batch_norm",
)  # fmt: skip
_FUNCTIONAL = (
    "relu", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid", "tanh", "leaky_relu", "elu",
    "softmax", "log_softmax", "conv1d", "conv2d", "linear", "batch_norm", "layer_norm", "group_norm", "avg_pool2d",
    "max_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout", "pad", "interpolate", "normalize",
)  # fmt: skip

#: The functions a ``call_function`` node may name (``getattr`` only for :data:`ATTRIBUTES`).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator.{name}": getattr(operator, name) for name in OPERATORS},
    **{f"torch.{name}": getattr(torch, name) for name in _TORCH},
    **{f"torch.nn.functional.{name}": getattr(F, name) for name in _FUNCTIONAL},
    "getattr": getattr,
    "collections.OrderedDict": OrderedDict,  # a model's OrderedDict output, rebuilt as its own type by the fold
}
FUNCTION_NAMES = {id(function): name for name, function in reversed(FUNCTIONS.items())}
#: The tensor attributes ``getattr`` may read.
ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim"})
#: The tensor methods a ``call_method`` node may call.
METHODS = frozenset(
    {
        "view", "reshape", "flatten", "size", "dim", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
        "expand", "chunk", "split", "mean", "sum", "amax", "add", "sub", "mul", "div", "relu", "sigmoid", "tanh",
        "softmax", "log_softmax", "clamp", "float", "double", "type_as", "flip",
    }
)  # fmt: skip
OPS = ("placeholder", "get_attr", "call_module", "call_function", "call_method", "output")
_DTYPE_LIST = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.bool)
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in _DTYPE_LIST}
MAX_INT = 2**62  #: magnitude of an integer, in the description and computed by a Python operator

"""The runtimes ``trainfer.compile`` knows and the dtypes each serves: the one table records and engines share."""

from __future__ import annotations

RUNTIMES = ("torch", "torch-channels-last", "inductor", "onnxruntime", "openvino")
SUPPORTED_DTYPES = {
    "torch": ("float32", "bfloat16", "float16"),
    "torch-channels-last": ("float32", "bfloat16", "float16"),
    "inductor": ("float32", "bfloat16"),
    "onnxruntime": ("float32",),
    "openvino": ("float32", "bfloat16", "float16"),
}
#: Runtimes that execute a QDQ file (the default, for int8 records that name none, first).
QUANTIZED_RUNTIMES = ("onnxruntime", "openvino")
#: Runtimes that generate source code and compile it when built (inductor: Python and C++, through a compiler).
#: Only the operator's own choice runs one: a file (``runtime.json``) never selects it (docs/security.md).
CODE_GENERATING_RUNTIMES = ("inductor",)
#: What ``runtime="auto"`` tries unless told otherwise, and so the runtimes a ``runtime.json`` may choose.
AUTO_RUNTIMES = tuple(name for name in RUNTIMES if name not in CODE_GENERATING_RUNTIMES)

__all__ = ["AUTO_RUNTIMES", "CODE_GENERATING_RUNTIMES", "QUANTIZED_RUNTIMES", "RUNTIMES", "SUPPORTED_DTYPES", "serves"]


def serves(runtime: str, dtype: str) -> bool:
    """Whether ``runtime`` serves ``dtype`` (int8: a QDQ file, on :data:`QUANTIZED_RUNTIMES`)."""
    return dtype in SUPPORTED_DTYPES.get(runtime, ()) or (dtype == "int8" and runtime in QUANTIZED_RUNTIMES)

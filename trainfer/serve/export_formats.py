"""The file formats ``trainfer.export`` writes: a torch-free table, so ``trainfer export --help`` lists them
without importing torch."""

FORMATS = ("onnx", "torchscript", "exported-program")

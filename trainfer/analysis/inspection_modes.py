"""The modes ``trainfer.inspect`` runs a model in: a torch-free table, so ``trainfer inspect --help`` names
them without importing torch."""

MODES = ("train", "eval")
#: The mode whose outputs are the divergence's reference: the one a deployed model runs in.
REFERENCE_MODE = "eval"

"""Bundles of an older format rewritten in this trainfer's (``trainfer migrate OLD NEW``).

Format 1 stored a deploy form folded by ``trainfer.deploy`` without its architecture: loading rebuilt it
by replaying the fold on the training form (from the manifest's factory, with generic BatchNorm
statistics) and loading the stored weights into the graph that came out. Format 2 records that graph
(:mod:`trainfer.serve.architecture`) and no longer replays anything on load.

:func:`migrate` replays the fold once, here, on the manifest's input shape and deploy options; the stored
weights must fit the graph it gives exactly (strict keys and shapes), otherwise the folder has changed in
a way that matters and nothing is written. That replay computes on real tensors of the recorded shape, which
a hostile manifest chooses (up to 2**24 elements a sample), so it is first run once on the meta device (no
memory, no arithmetic) and refused when it would compute more than :data:`MAX_REPLAY_ELEMENTS` elements
or :data:`MAX_REPLAY_FLOPS` floating-point operations (:func:`_check_replay_cost`). The new bundle keeps
every field of the old manifest, adds the ``architecture`` and this trainfer's versions, and is loaded back
and compared with the replayed model before it replaces ``target``. The factory is allowed exactly as
:func:`trainfer.load` allows it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from trainfer.errors import BundleError
from trainfer.numerics import randomize_batchnorm
from trainfer.reparam.deploy import deploy
from trainfer.reparam.verify import verify
from trainfer.serve.architecture import describe
from trainfer.serve.bundle import build_model, load
from trainfer.serve.bundle_format import FORMAT_VERSION, needs_migration, read_manifest
from trainfer.serve.bundle_write import write_bundle
from trainfer.serve.manifest_build import writer_versions
from trainfer.serve.weights import load_state_dict, read_bundle_weights, weights_dtype

if TYPE_CHECKING:
    from trainfer.serve.manifest import Manifest

__all__ = ["migrate"]

#: The most elements that all the tensors of one run of the training form on :data:`PROBE_SAMPLES` samples of the
#: recorded shape may hold together (2**28: 1 GiB in float32; RepVGG-A0's training form computes 5.2e7 for 4 samples
#: at 224x224, in 1.2e10 operations, measured in 1 s of CPU), and the most floating-point operations it may take
#: (about a minute of one core).
MAX_REPLAY_ELEMENTS = 2**28
MAX_REPLAY_FLOPS = 10**12
#: The samples the migrated bundle is compared with the replayed fold on.
PROBE_SAMPLES = 4


def migrate(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    factory: str | Callable[..., nn.Module] | None = None,
    trust_factory: bool = False,
) -> Path:
    """Write the format-1 deploy-form bundle ``source`` (its directory or its ``manifest.json``) as a current
    bundle at ``target``; return ``target``.

    ``target`` may be ``source`` itself (it is replaced atomically, once the new bundle has been checked).
    Raises :class:`BundleError` for a bundle that needs no migration, a factory that is not allowed, or
    weights that do not fit the graph this trainfer's fold gives; ``target`` is then left as it was.
    """
    from trainfer.serve import manifest as schema

    source = Path(source)
    manifest = read_manifest(source)
    if not needs_migration(manifest):
        raise BundleError(
            f"{str(source)!r} (format_version {manifest.format_version}, form {manifest.form!r}) "
            "loads as it is: nothing to migrate"
        )
    state = read_bundle_weights(source if source.is_dir() else source.parent, manifest)
    deployed = _replay_fold(manifest, state, factory, trust_factory, str(source))
    migrated = schema.build(
        {
            **manifest.to_json(),
            "format_version": FORMAT_VERSION,
            "architecture": describe(deployed),
            "versions": {**writer_versions(), "migrated_from_trainfer": manifest.versions.trainfer},
        }
    )
    shape = manifest.input_shape or []  # _replay_fold refused a manifest without one
    probe = torch.randn(PROBE_SAMPLES, *shape[1:], dtype=weights_dtype(state) or torch.float32)
    return write_bundle(target, migrated, state, finish=lambda staged: _same_outputs(staged, deployed, probe))


def _replay_fold(
    manifest: Manifest,
    state: dict[str, Tensor],
    factory: str | Callable[..., nn.Module] | None,
    trust_factory: bool,
    source: str,
) -> fx.GraphModule:
    """What format 1's loader built: the training form, folded on the manifest's input shape, with the weights."""
    shape = manifest.input_shape
    if not shape:
        raise BundleError(f"{source}: input.shape: a format-1 deploy form needs its input shape to replay the fold")
    stored = sum(value.numel() for value in state.values())
    dtype = weights_dtype(state)
    training = manifest.model_copy(update={"form": "train"})
    train = build_model(training, dtype, factory=factory, trust_factory=trust_factory, stored=stored)
    randomize_batchnorm(train.eval())  # generic statistics, as format 1 used: no BatchNorm is an identity
    _check_replay_cost(train, [max(shape[0], PROBE_SAMPLES), *shape[1:]], dtype or torch.float32, source)
    options = manifest.deploy_options.model_dump(mode="json", exclude_unset=True)
    try:
        deployed = deploy(train, torch.randn(*shape, dtype=dtype or torch.float32), verify=False, **options)
    except Exception as error:  # e.g. an input shape the architecture cannot take: the manifest's
        raise BundleError(
            f"{source}: input.shape: the fold cannot be replayed on inputs of shape {shape}: {error}"
        ) from error
    if not isinstance(deployed, fx.GraphModule):
        raise BundleError(f"{source}: the replayed fold gives a {type(deployed).__name__}, not a graph to record")
    try:
        load_state_dict(deployed, state, source=source)
    except BundleError as error:
        raise BundleError(
            f"{error}: this trainfer folds {manifest.factory!r} into another graph than the trainfer "
            f"{manifest.versions.trainfer} that wrote the bundle; load its training form and save "
            "trainfer.deploy(...) of it instead"
        ) from None
    deployed.eval()
    return deployed


def _same_outputs(staged: Path, replayed: nn.Module, probe: Tensor) -> None:
    """Refuse a migrated bundle whose model does not compute what the replayed one does."""
    equivalence = verify(replayed, load(staged), probe, dtypes=(None,))
    if not equivalence.ok:
        raise BundleError(
            f"the migrated bundle does not compute what the replayed fold does; nothing was written\n{equivalence}"
        )


def _check_replay_cost(train: nn.Module, shape: list[int], dtype: torch.dtype, source: str) -> tuple[int, int] | None:
    """The elements and floating-point operations the training form computes on ``shape``, measured by one run on
    the meta device (which allocates nothing and computes nothing); refuse (:class:`BundleError`) more than
    :data:`MAX_REPLAY_ELEMENTS` elements in all or :data:`MAX_REPLAY_FLOPS` operations. ``None`` for a form the meta
    device cannot run (an op without a meta kernel, a value read back): the replay itself says what fails."""
    tensors = {**dict(train.named_parameters()), **dict(train.named_buffers())}
    meta = {name: torch.empty_like(tensor, device="meta") for name, tensor in tensors.items()}
    counted, flops = _CountedElements(), FlopCounterMode(display=False)
    try:
        with torch.no_grad(), flops, counted:
            functional_call(train, meta, (torch.empty(shape, device="meta", dtype=dtype),))
    except _TooMuch:
        pass
    except Exception:  # noqa: BLE001 -- not a cost: the real replay reports it
        return None
    if counted.elements > MAX_REPLAY_ELEMENTS:
        measured = f"over {MAX_REPLAY_ELEMENTS:,} tensor elements"
    elif flops.get_total_flops() > MAX_REPLAY_FLOPS:
        measured = f"{flops.get_total_flops():.3g} floating-point operations, over {MAX_REPLAY_FLOPS:.0e}"
    else:
        return counted.elements, flops.get_total_flops()
    raise BundleError(
        f"{source}: input.shape: replaying the fold on {shape[0]} samples of shape {shape[1:]} would compute "
        f"{measured}: expected the input shape the model was deployed for"
    )


class _TooMuch(Exception):
    """The meta run has computed more than :data:`MAX_REPLAY_ELEMENTS` elements: no need to go on."""


class _CountedElements(TorchDispatchMode):
    """Sums the elements of every tensor the aten calls inside it return; stops the run past the bound."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        result = func(*args, **(kwargs or {}))
        self.elements += sum(leaf.numel() for leaf in tree_leaves(result) if isinstance(leaf, Tensor))
        if self.elements > MAX_REPLAY_ELEMENTS:
            raise _TooMuch
        return result

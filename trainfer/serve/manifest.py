"""The schema of a bundle manifest: every field typed and bounded, checked before anything is built.

A manifest is untrusted input. :func:`validate` checks the whole parsed JSON against the pydantic
models below (strict types: ``"2"`` is not an integer, ``1`` is not a string) and raises
:class:`~trainfer.errors.BundleError` naming the first bad fields, what each expects and what was
found. Sizes are bounded so that a manifest cannot make loading allocate without limit:

======================  =========================================================================
input / sample shapes   at most 8 dimensions, each 1..65536, at most 2**24 elements in all
config                  JSON values only, at most 8 levels deep, 10000 values, integers within
                        +-2**31, finite floats, strings up to 1000 characters
labels, columns         at most 100000 entries of up to 1000 characters
mean / std              at most 4096 finite numbers
heads                   at most 64
======================  =========================================================================

Fields that state one fact twice must agree (a :class:`~trainfer.errors.BundleError` otherwise):
``preprocess.input_shape`` is ``input.shape`` without the batch dimension and ``preprocess.dtype``
is ``input.dtype`` (where both are given); ``task`` and ``labels`` are those of the one unnamed
head, or ``task`` is ``multi-head`` over named heads whose labels ``labels`` repeats by name; a
regression head declares no output kind.

Imported only when a manifest is read (pydantic costs about 0.1 s to import).
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainfer.errors import BundleError
from trainfer.serve.decoder_bounds import MAX_SERVED_BEAM_WIDTH, MAX_SERVED_LENGTH, search_work_problem
from trainfer.serve.outputs import OutputKindName, TaskName

FORMAT = "trainfer-bundle"
MAX_DIMS = 8
MAX_DIM = 65536
MAX_ELEMENTS = 2**24
MAX_TEXT = 1000
MAX_ENTRIES = 100_000
MAX_CHANNELS = 4096
MAX_HEADS = 64
MAX_CONFIG_DEPTH = 8
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_INT = 2**31
#: ``package.module:function`` (dotted attributes allowed after the colon), or a registered short name.
_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
FACTORY_PATTERN = rf"^{_DOTTED}(:{_DOTTED})?$"
_TYPE_TAGS = frozenset({"int", "str", "float", "bool", "none", "constrained-str", "constrained-int"})
_VERSION = re.compile(r"^(\d{1,6})\.(\d{1,6})")

Text = Annotated[str, Field(max_length=MAX_TEXT)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]
FloatDtype = Literal["float32", "float64", "float16", "bfloat16"]
Channels = Annotated[list[Finite], Field(min_length=1, max_length=MAX_CHANNELS)]
Labels = Annotated[list[Text], Field(max_length=MAX_ENTRIES)]
Selector = Annotated[int, Field(ge=0, le=MAX_ENTRIES)] | Text | None


class _Schema(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _bounded_shape(shape: list[int] | None, what: str) -> list[int] | None:
    if shape is not None and math.prod(shape) > MAX_ELEMENTS:
        raise ValueError(f"{what} of {math.prod(shape)} elements is over the limit of {MAX_ELEMENTS}")
    return shape


class InputSpec(_Schema):
    """The example input: shape with batch dimension (needed to rebuild a deploy form) and dtype."""

    shape: Annotated[list[Dim], Field(min_length=1, max_length=MAX_DIMS)] | None = None
    dtype: FloatDtype | None = None

    @field_validator("shape")
    @classmethod
    def _size(cls, shape: list[int] | None) -> list[int] | None:
        return _bounded_shape(shape, "an input shape")


class Preprocess(_Schema):
    """:class:`trainfer.serve.preprocess.PreprocessSpec`, field for field."""

    input_shape: Annotated[list[Dim], Field(min_length=1, max_length=MAX_DIMS)] | None = None
    dtype: FloatDtype = "float32"
    mean: Channels | None = None
    std: Channels | None = None
    pixel_scale: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1 / 255
    channel_order: Literal["RGB", "BGR"] = "RGB"
    resize: bool = True
    resample: Literal["bilinear", "box", "nearest", "bicubic", "lanczos"] = "bilinear"
    columns: Annotated[list[Text], Field(min_length=1, max_length=MAX_ENTRIES)] | None = None
    target_mean: Channels | None = None
    target_std: Channels | None = None

    @field_validator("input_shape")
    @classmethod
    def _size(cls, shape: list[int] | None) -> list[int] | None:
        return _bounded_shape(shape, "a sample shape")


class HeadSpec(_Schema):
    """One served output: :class:`trainfer.serve.outputs.Head` as a dict."""

    name: Selector = None
    select: Selector = None
    task: TaskName
    labels: Labels | None = None
    output_kind: OutputKindName | None = None
    output_kind_decided_by: Text | None = None


class OutputStructure(_Schema):
    """What the model returns: a tensor, a tuple (length, named fields) or a dict (keys)."""

    type: Literal["tensor", "tuple", "dict"]
    length: Annotated[int, Field(ge=0, le=MAX_HEADS * 16)] | None = None
    fields: Annotated[list[Text], Field(max_length=MAX_HEADS * 16)] | None = None
    keys: Annotated[list[Text], Field(max_length=MAX_HEADS * 16)] | None = None


Fraction = Annotated[float, Field(ge=0, lt=1)]


class PruneOptions(_Schema):
    """How ``trainfer.prune`` narrowed a deploy form (a record; its widths are in the ``architecture``)."""

    ratio: Fraction
    ratios: Annotated[dict[Text, Fraction], Field(max_length=MAX_ENTRIES)] = {}
    global_pruning: bool = False
    round_to: Annotated[int, Field(ge=1, le=MAX_CHANNELS)] | None = None
    importance: Literal["l1", "l2"] = "l2"


class DeployOptions(_Schema):
    """The keyword options ``trainfer.deploy`` ran with (a record; the ``architecture`` rebuilds the form)."""

    protocols: bool = True
    prune_dead: bool = False
    pruned: PruneOptions | None = None


class Weights(_Schema):
    """The weights file inside the bundle directory and its checksum."""

    file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,200}\.safetensors$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    tensors: Annotated[int, Field(ge=0, le=10_000_000)] | None = None


class Versions(_Schema):
    """Library versions of the writer (``trainfer`` is checked against this one, see :func:`newer_writer`)."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)
    trainfer: Annotated[str, Field(pattern=_VERSION.pattern, max_length=64)]
    torch: Annotated[str, Field(max_length=64)] | None = None
    safetensors: Annotated[str, Field(max_length=64)] | None = None


class Exported(_Schema):
    """Present in manifests inside exported files: the format and whether export deployed the model."""

    format: Annotated[str, Field(max_length=64)]
    deployed_here: bool


class Decoder(_Schema):
    """A sequence head's decoder settings (:class:`trainfer.serve.sequence.DecoderSettings`), bounded."""

    kind: Literal["ctc", "autoregressive"]
    blank: Annotated[int, Field(ge=0, le=MAX_ENTRIES)] | None = None
    bos: Annotated[int, Field(ge=0, le=MAX_ENTRIES)] | None = None
    eos: Annotated[int, Field(ge=0, le=MAX_ENTRIES)] | None = None
    pad: Annotated[int, Field(ge=0, le=MAX_ENTRIES)] | None = None
    beam_width: Annotated[int, Field(ge=1, le=MAX_SERVED_BEAM_WIDTH)] = 1
    n_best: Annotated[int, Field(ge=1, le=MAX_SERVED_BEAM_WIDTH)] = 1
    max_length: Annotated[int, Field(ge=1, le=MAX_SERVED_LENGTH)] = 64
    length_penalty: Annotated[float, Field(ge=-10, le=10, allow_inf_nan=False)] = 1.0
    early_stopping: bool | Literal["never"] = False

    @model_validator(mode="after")
    def _bounded_search(self) -> Decoder:
        """An autoregressive search of at most ``MAX_SERVED_SEARCH_WORK`` steps per item."""
        problem = search_work_problem(self.beam_width, self.max_length) if self.kind == "autoregressive" else None
        if problem:
            raise ValueError(problem)
        return self


class Manifest(_Schema):
    """The whole ``manifest.json`` (see :mod:`trainfer.bundle`)."""

    format: Literal["trainfer-bundle"]
    format_version: Annotated[int, Field(ge=1)]
    factory: Annotated[str, Field(max_length=300, pattern=FACTORY_PATTERN)] | None
    config: dict[Annotated[str, Field(max_length=MAX_TEXT)], Any]
    form: Literal["train", "deploy"]
    deploy_options: DeployOptions = DeployOptions()
    #: A deploy form's graph (:mod:`trainfer.serve.architecture` validates it field by field on load).
    architecture: dict[Annotated[str, Field(max_length=MAX_TEXT)], Any] | None = None
    input: InputSpec
    preprocess: Preprocess | None = None
    task: Literal[TaskName, "multi-head"] | None = None
    labels: Labels | dict[Text, Labels] | None = None
    heads: Annotated[list[HeadSpec], Field(max_length=MAX_HEADS)] = []
    output_structure: OutputStructure | None = None
    versions: Versions
    weights: Weights | None = None
    exported: Exported | None = None
    decoder: Decoder | None = None  # the sequence task's decoding settings

    @field_validator("config")
    @classmethod
    def _json_values(cls, config: dict[str, Any]) -> dict[str, Any]:
        _check_config(config, "config", [0], 0)
        return config

    @model_validator(mode="after")
    def _decoded(self) -> Manifest:
        """A sequence head is decoded by its ``decoder`` settings: without them an encoder-decoder would
        be taken for a CTC model (the default kind) and fail later with an error about something else."""
        if self.decoder is None and (self.task == "sequence" or any(h.task == "sequence" for h in self.heads)):
            raise ValueError(
                "no 'decoder' settings, which a sequence head needs: kind 'ctc' (blank) or 'autoregressive' "
                "(bos, eos, max_length), as trainfer.save(..., decoder=...) records them"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        """Fields that state the same fact twice must agree: readers of either would serve differently."""
        problems = _contradictions(self)
        if problems:
            raise ValueError("contradicting fields: " + "; ".join(problems))
        return self

    def preprocess_settings(self) -> dict[str, Any] | None:
        """The ``preprocess`` section as :meth:`~trainfer.serve.preprocess.PreprocessSpec.from_dict` takes it."""
        return None if self.preprocess is None else self.preprocess.model_dump()

    def derived_metadata(self) -> dict[str, Any]:
        """The :func:`trainfer.save` keywords with which a bundle of a form derived from this manifest's model
        (its deploy, int8 or pruned form) serves as this bundle does: task, labels, heads (the output each
        selects, their output kinds), preprocessing and the sequence decoder. The one way every command
        that reads a bundle and writes another carries them over."""
        named = self.task == "multi-head"
        kinds = {head.name: head.output_kind for head in self.heads if head.output_kind is not None}
        labels = {head.name: head.labels for head in self.heads if head.labels is not None}  # keyed as heads=
        return {
            "task": None if named else self.task,
            "labels": labels if named else self.labels,
            "heads": {head.name: head.task for head in self.heads} if named else None,
            "output": None if named or not self.heads else self.heads[0].select,
            "output_kind": (kinds or None) if named else kinds.get(None),
            "preprocess": self.preprocess_settings(),
            "decoder": None if self.decoder is None else self.decoder.model_dump(),
        }

    def head_settings(self) -> list[dict[str, Any]]:
        """The ``heads`` as :meth:`~trainfer.serve.outputs.Head.from_dict` takes them."""
        return [head.model_dump() for head in self.heads]

    @property
    def input_shape(self) -> list[int] | None:
        """The recorded example input shape, batch dimension first (``None``: not recorded)."""
        return self.input.shape

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``manifest.json`` holds: the fields that were given (defaults stay implicit)."""
        return self.model_dump(mode="json", exclude_unset=True)


def _contradictions(manifest: Manifest) -> list[str]:
    """Each pair of manifest fields that contradict each other, as a sentence."""
    problems = []
    shape, spec = manifest.input.shape, manifest.preprocess
    if spec is not None and spec.input_shape is not None and shape is not None and spec.input_shape != shape[1:]:
        problems.append(f"preprocess.input_shape {spec.input_shape} is not input.shape {shape} without its batch")
    if spec is not None and "dtype" in spec.model_fields_set and manifest.input.dtype not in (None, spec.dtype):
        problems.append(f"preprocess.dtype {spec.dtype!r} is not input.dtype {manifest.input.dtype!r}")
    if manifest.heads and manifest.task is not None:
        problems += _head_contradictions(manifest)
    for head in manifest.heads:
        if head.task == "regression" and head.output_kind is not None:
            problems.append(f"head {head.name!r} is a regression head (values) with output_kind {head.output_kind!r}")
    return problems


def _head_contradictions(manifest: Manifest) -> list[str]:
    """``task`` and ``labels`` against the ``heads`` they summarise."""
    heads, labels = manifest.heads, manifest.labels
    if manifest.task == "multi-head":
        if any(head.name is None for head in heads):
            return ["task 'multi-head' with an unnamed head"]
        named = {str(head.name): head.labels for head in heads}
        if labels is not None and (not isinstance(labels, dict) or any(named.get(k) != v for k, v in labels.items())):
            return ["labels differ from the heads' labels"]
        return []
    head = heads[0]
    if len(heads) != 1 or head.name is not None:
        return [f"task {manifest.task!r} (one head) with {len(heads)} head(s) named {[h.name for h in heads]}"]
    if head.task != manifest.task:
        return [f"task {manifest.task!r} differs from heads[0].task {head.task!r}"]
    if labels != head.labels:
        return ["labels differ from heads[0].labels"]
    return []


def _check_config(value: Any, where: str, count: list[int], depth: int) -> None:
    """Raise ``ValueError`` naming ``where`` unless ``value`` is small, finite, plain JSON."""
    count[0] += 1
    if count[0] > MAX_CONFIG_VALUES:
        raise ValueError(f"more than {MAX_CONFIG_VALUES} values")
    if depth > MAX_CONFIG_DEPTH:
        raise ValueError(f"{where} is nested deeper than {MAX_CONFIG_DEPTH} levels")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if abs(value) > MAX_CONFIG_INT:
            raise ValueError(f"{where} = {value} is outside +-2**31")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} = {value} is not finite")
    elif isinstance(value, str):
        if len(value) > MAX_TEXT:
            raise ValueError(f"{where} is a string longer than {MAX_TEXT} characters")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_config(item, f"{where}[{index}]", count, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > MAX_TEXT:
                raise ValueError(f"{where} has a key that is not a string of up to {MAX_TEXT} characters")
            _check_config(item, f"{where}.{key}", count, depth + 1)
    else:
        raise ValueError(f"{where} is a {type(value).__name__}; expected JSON values")


def validate(data: Any, source: str) -> Manifest:
    """``data`` (parsed JSON) as a :class:`Manifest`, or :class:`BundleError` naming every bad field (up to 5)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f'{source} is not a trainfer manifest (expected an object with "format": "{FORMAT}")')
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise schema_error(error, f"invalid manifest {source}") from None


def build(data: dict[str, Any]) -> Manifest:
    """A manifest trainfer writes, from Python values: passed through JSON and :func:`validate`, exactly as a
    reader will see it (so a manifest that would not load is never written)."""
    try:
        text = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise BundleError(f"a manifest holds JSON values only (numbers, strings, lists, dicts): {error}") from None
    return validate(json.loads(text), "the manifest being written")


def schema_error(error: ValidationError, what: str) -> BundleError:
    """One line for a schema's refusal of a bundle file: ``what``, then its first five problems
    (:func:`_describe`) and how many more there are."""
    problems = [_describe(problem) for problem in error.errors(include_url=False)]
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return BundleError(f"{what}: " + "; ".join(problems[:5]) + more)


def _describe(problem: Any) -> str:
    """``field.path: what was expected (found: value)`` for one pydantic error; a check of the whole
    manifest (no field path) gives its message alone, which names the fields."""
    where = ".".join(str(part) for part in problem["loc"] if not _union_tag(part))
    message = re.sub(r" or instance of \w+", "", problem["msg"].removeprefix("Value error, "))
    if not where:
        return message
    if problem["type"] == "missing":
        return f"{where}: required field is missing"
    found = problem.get("input")
    shown = repr(found) if len(repr(found)) <= 60 else repr(found)[:57] + "..."
    return f"{where}: {message} (found {type(found).__name__} {shown})"


def _union_tag(part: Any) -> bool:
    """Whether a location part names a union member (``list[constrained-str]``, ``int``), not a field."""
    return isinstance(part, str) and ("[" in part or part in _TYPE_TAGS)


def newer_writer(version: str, current: str) -> bool:
    """Whether a bundle written by trainfer ``version`` is newer (major.minor) than ``current``."""
    written, ours = _VERSION.match(version), _VERSION.match(current)
    if written is None or ours is None:
        return False
    return tuple(map(int, written.groups())) > tuple(map(int, ours.groups()))

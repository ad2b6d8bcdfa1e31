"""``trainfer.deploy`` on the models of torchvision, Hugging Face transformers and Ultralytics.

Each model is built from its library's own constructor or config (random weights, random
non-trivial BatchNorm statistics, no download), in eval mode, with a small input. For each:

* deploy (protocols on, and off for the models that carry their own ``fuse()``): whether it
  raised, its float64 and model-dtype verification errors, and whether the deployed output has
  the eval output's types (``OrderedDict``, ``ModelOutput``, tuples, lists);
* kernels one forward executes (aten ops, :mod:`trainfer.opcount`): BatchNorm and convolution
  kernels and all ops, of the eval form, the deploy form and the library's own converter where
  one exists (Ultralytics ``fuse()``; torchvision and transformers have none);
* with ``--rounds``: latency of the deploy form and the own converter's form relative to the eval
  form, batch 1, timed paired and interleaved in one run (``trainfer.bench.time_forms``): wall
  time at 2 threads and CPU time of the calling thread at 1 thread;
* with ``--vs-fuse`` (and ``--rounds``): instead, the direct comparison: process CPU time at 1
  thread of eval, deploy and the own converter's form, interleaved call by call, and per round
  deploy / eval, own / eval and deploy / own, each the median of the per-round ratios with a 95 %
  percentile-bootstrap interval (a second table).

Each model runs in its own forked process under a time limit (``bench_timm.run_isolated``).
Needs the ``.venv-next`` of ``make test-interop`` (torch 2.14.1, torchvision 0.29.1, transformers
5.x, ultralytics 8.x):

    .venv-next/bin/python benchmarks/bench_interop.py [--rounds 5] [--models resnet18,yolov8n,...]
    .venv-next/bin/python benchmarks/bench_interop.py --vs-fuse --rounds 40 --protocols off --models yolov8n
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainfer.bench.intervals import median_interval


def _sibling(name: str) -> Any:
    """The benchmark module ``name`` beside this file (benchmarks/ is not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@dataclass
class Case:
    """A model to deploy: its positional and keyword example inputs and the library's own converter."""

    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The library's own conversion of a copy (``None``: the library has none).
    own: Callable[[nn.Module], nn.Module] | None = None
    #: Outputs that may be empty on every input (a detector with no detection on noise).
    allow_empty: bool = False


@dataclass(frozen=True)
class Spread:
    """A paired time ratio: the median of the per-round ratios and its 95 % confidence interval.

    The interval is distribution-free: the order statistics at ranks n/2 -+ 1.96 sqrt(n)/2 of the
    n per-round ratios bound the median with about 95 % confidence.
    """

    median: float = float("nan")
    low: float = float("nan")
    high: float = float("nan")

    @classmethod
    def of(cls, ratios: list[float]) -> Spread:
        if not ratios:
            return cls()
        ordered, half_width = sorted(ratios), 1.96 * math.sqrt(len(ratios)) / 2
        low = max(0, math.floor(len(ordered) / 2 - half_width))
        high = min(len(ordered) - 1, math.ceil(len(ordered) / 2 + half_width))
        return cls(statistics.median(ordered), ordered[low], ordered[high])

    @classmethod
    def bootstrap(cls, ratios: list[float], resamples: int = 2000, seed: int = 0) -> Spread:
        """The median of ``ratios`` with the 2.5 and 97.5 percentiles of the medians of ``resamples``
        resamples (drawn with replacement, seeded: the same ratios give the same interval)."""
        if not ratios:
            return cls()
        return cls(statistics.median(ratios), *median_interval(ratios, resamples, seed))


@dataclass
class Row:
    """One model's figures; ``error`` is set when deploy raised or the run timed out."""

    model: str
    protocols: bool = True
    ok: bool = False
    same_types: bool = False
    max_rel_error_float64: float = float("nan")
    max_rel_error_dtype: float = float("nan")
    near_ties: int = 0
    batch_norms: tuple[int, int, int] = (0, 0, -1)  # eval, deploy, own converter (-1: none)
    convolutions: tuple[int, int, int] = (0, 0, -1)
    ops: tuple[int, int, int] = (0, 0, -1)
    kept: int = 0
    fallbacks: int = 0
    deploy_seconds: float = 0.0
    #: deploy / eval and own / eval: the median of the per-round ratios with its 95 % interval.
    wall_2_threads: tuple[Spread, Spread] = (Spread(), Spread())
    cpu_1_thread: tuple[Spread, Spread] = (Spread(), Spread())
    #: ``--vs-fuse``: deploy / eval, own / eval, deploy / own in process CPU time, bootstrap intervals.
    vs_fuse: tuple[Spread, Spread, Spread] = (Spread(), Spread(), Spread())
    error: str = ""


# --- the models ---------------------------------------------------------------------------------------


def _image(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _torchvision(name: str, size: int = 64, **options: Any) -> Case:
    import torchvision

    return Case(torchvision.models.get_model(name, weights=None, num_classes=10, **options), (_image(size),))


def _faster_rcnn() -> Case:
    from torchvision.models import detection

    model = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=128, max_size=128, box_score_thresh=0.0
    )
    return Case(model, ([_image(128)[0]],))


def _deeplab() -> Case:
    from torchvision.models import segmentation

    model = segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    return Case(model, (_image(64),))


def _text(config: Any, model_class: Any, decoder: bool = False) -> Case:
    ids = torch.randint(3, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    kwargs: dict[str, Any] = {"attention_mask": torch.ones(1, 8, dtype=torch.long)}
    if decoder:  # as users call it: the cache on (the default), so the output holds a key/value cache object
        kwargs.update(decoder_input_ids=ids[:, :5])
    return Case(model_class(config), (ids,), kwargs)


_TINY = {"vocab_size": 99, "max_position_embeddings": 64}


def _bert() -> Case:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, **_TINY)
    return _text(config, BertForSequenceClassification)


def _distilbert() -> Case:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, **_TINY)
    return _text(config, DistilBertForSequenceClassification)


def _t5() -> Case:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    return _text(config, T5ForConditionalGeneration, decoder=True)


def _bart() -> Case:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        **_TINY,
    )
    return _text(config, BartForConditionalGeneration, decoder=True)


def _wav2vec2() -> Case:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(
        vocab_size=12,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16, 16),
        conv_stride=(5, 2, 2),
        conv_kernel=(10, 3, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    signal = torch.randn(1, 1600, generator=torch.Generator().manual_seed(0))
    return Case(Wav2Vec2ForCTC(config), (signal,))


_VISION = {"image_size": 64, "num_channels": 3, "num_labels": 10}


def _vit() -> Case:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, patch_size=16, **_VISION
    )
    return Case(ViTForImageClassification(config), (_image(64),))


def _convnext_hf() -> Case:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1], num_labels=10)
    return Case(ConvNextForImageClassification(config), (_image(64),))


def _resnet_hf() -> Case:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10)
    return Case(ResNetForImageClassification(config), (_image(64),))


def _mobilevit_hf() -> Case:
    from transformers import MobileViTConfig, MobileViTForImageClassification

    config = MobileViTConfig(
        hidden_sizes=[24, 32, 40], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2, **_VISION
    )
    return Case(MobileViTForImageClassification(config), (_image(64),))


def _ultralytics(cfg: str, size: int = 64) -> Case:
    from ultralytics.nn.tasks import ClassificationModel, DetectionModel, RTDETRDetectionModel

    kind = ClassificationModel if "-cls" in cfg else RTDETRDetectionModel if "rtdetr" in cfg else DetectionModel
    model = kind(cfg, nc=10, verbose=False)
    return Case(model, (_image(size),), own=_ultralytics_fuse)


def _ultralytics_fuse(model: nn.Module) -> nn.Module:
    return model.fuse(verbose=False)


#: name -> (source, builder). Sizes are small: the whole table runs in minutes on 2 cores.
MODELS: dict[str, tuple[str, Callable[[], Case]]] = {
    "resnet18": ("torchvision", lambda: _torchvision("resnet18")),
    "mobilenet_v3_small": ("torchvision", lambda: _torchvision("mobilenet_v3_small")),
    "efficientnet_b0": ("torchvision", lambda: _torchvision("efficientnet_b0")),
    "convnext_tiny": ("torchvision", lambda: _torchvision("convnext_tiny")),
    "googlenet": ("torchvision", lambda: _torchvision("googlenet", aux_logits=True, init_weights=False)),
    "inception_v3": ("torchvision", lambda: _torchvision("inception_v3", 96, aux_logits=True, init_weights=False)),
    "densenet121": ("torchvision", lambda: _torchvision("densenet121")),
    "deeplabv3_mobilenet_v3_large": ("torchvision", _deeplab),
    "fasterrcnn_mobilenet_v3_large_320_fpn": ("torchvision", _faster_rcnn),
    "bert": ("transformers", _bert),
    "distilbert": ("transformers", _distilbert),
    "t5": ("transformers", _t5),
    "bart": ("transformers", _bart),
    "wav2vec2_ctc": ("transformers", _wav2vec2),
    "vit": ("transformers", _vit),
    "convnext": ("transformers", _convnext_hf),
    "resnet": ("transformers", _resnet_hf),
    "mobilevit": ("transformers", _mobilevit_hf),
    "yolov8n": ("ultralytics", lambda: _ultralytics("yolov8n.yaml")),
    "yolo11n": ("ultralytics", lambda: _ultralytics("yolo11n.yaml")),
    "yolov8n-cls": ("ultralytics", lambda: _ultralytics("yolov8n-cls.yaml")),
    "rtdetr-l": ("ultralytics", lambda: _ultralytics("rtdetr-l.yaml")),
}


def build(name: str, seed: int = 0) -> Case:
    """``name``'s case: random weights and BatchNorm statistics, eval mode."""
    from trainfer.testing import randomize_batchnorm

    torch.manual_seed(seed)
    case = MODELS[name][1]()
    randomize_batchnorm(case.model, seed).eval()
    return case


# --- measuring ----------------------------------------------------------------------------------------


def same_types(reference: Any, candidate: Any) -> bool:
    """``candidate`` has ``reference``'s container types and keys all the way down to the tensors."""
    if type(reference) is not type(candidate):
        return False
    if isinstance(reference, dict):
        return list(reference) == list(candidate) and all(same_types(reference[k], candidate[k]) for k in reference)
    if isinstance(reference, (list, tuple)):
        return len(reference) == len(candidate) and all(map(same_types, reference, candidate))
    return True


def _counts(model: nn.Module, case: Case) -> tuple[int, int, int]:
    """BatchNorm kernels, convolutions and all aten ops one forward of ``model`` executes."""
    from trainfer.opcount import BATCH_NORM_OPS, AtenOpCounter

    with torch.no_grad(), AtenOpCounter() as counter:
        model(*case.args, **case.kwargs)
    executed = counter.counts
    batch_norms = sum(n for op, n in executed.items() if op in BATCH_NORM_OPS)
    return batch_norms, executed.get("convolution", 0), sum(executed.values())


def compare(name: str, protocols: bool = True, rounds: int = 0, wall: bool = True, vs_fuse: bool = False) -> Row:
    """Deploy ``name``, count what each form executes and, if ``rounds``, time them against eval
    (``vs_fuse``: the direct comparison of :func:`_vs_fuse` instead of wall and thread time)."""
    import trainfer

    case = build(name)
    start = time.perf_counter()
    try:
        deployed = trainfer.deploy(
            case.model, case.args, example_kwargs=case.kwargs, protocols=protocols, allow_empty=case.allow_empty
        )
        report = deployed.trainfer_report
    except trainfer.EquivalenceError as failure:
        report, deployed = failure.report, None
    row = Row(name, protocols, ok=report.ok, deploy_seconds=time.perf_counter() - start)
    equivalences = list(report.verification.values())
    row.max_rel_error_float64 = report.verification["float64"].max_rel_error
    row.max_rel_error_dtype = equivalences[-1].max_rel_error
    row.near_ties = equivalences[-1].near_ties
    row.kept, row.fallbacks = len(report.kept), len(report.fallbacks)
    if deployed is None:
        row.error = report.failure()[:300]
        return row
    with torch.no_grad():
        row.same_types = same_types(case.model(*case.args, **case.kwargs), deployed(*case.args, **case.kwargs))
    forms = {"eval": case.model, "deploy": deployed}
    if case.own is not None:
        forms["own"] = case.own(copy.deepcopy(case.model))
    counts = {label: _counts(form, case) for label, form in forms.items()}
    own = counts.get("own", (-1, -1, -1))
    row.batch_norms, row.convolutions, row.ops = ((counts["eval"][i], counts["deploy"][i], own[i]) for i in range(3))
    if rounds and vs_fuse:
        row.vs_fuse = _vs_fuse(forms, case, rounds)
        return row
    if rounds and wall:
        row.wall_2_threads = _ratios(forms, case, rounds, threads=2, clock=time.perf_counter)
    if rounds:
        row.cpu_1_thread = _ratios(forms, case, rounds, threads=1, clock=time.thread_time)
    return row


def _per_round(
    forms: dict[str, nn.Module], case: Case, rounds: int, threads: int, clock: Callable[[], float]
) -> dict[str, list[float]]:
    """Each form's median time in each round: every round times every form ``repeats`` times in turn
    (``trainfer.bench.time_forms``), so load that changes between rounds falls on all forms alike."""
    from trainfer.bench import time_forms

    repeats = 5

    def calling(model: nn.Module) -> Callable[..., Any]:
        return lambda *args: model(*args, **case.kwargs)

    timings = time_forms(
        {label: calling(form) for label, form in forms.items()},
        case.args,
        rounds=rounds,
        repeats=repeats,
        threads=threads,
        clock=clock,
    )
    return {
        label: [statistics.median(timing.samples[i : i + repeats]) for i in range(0, len(timing.samples), repeats)]
        for label, timing in timings.items()
    }


def _paired(times: dict[str, list[float]], numerator: str, denominator: str) -> list[float]:
    """The per-round ratios ``numerator / denominator`` (empty when a form is missing)."""
    if numerator not in times or denominator not in times:
        return []
    return [t / b for t, b in zip(times[numerator], times[denominator])]


def _ratios(
    forms: dict[str, nn.Module], case: Case, rounds: int, threads: int, clock: Callable[[], float]
) -> tuple[Spread, Spread]:
    """Time of the deploy form and the own converter's form over the eval form's, paired per round."""
    times = _per_round(forms, case, rounds, threads, clock)
    return Spread.of(_paired(times, "deploy", "eval")), Spread.of(_paired(times, "own", "eval"))


def _vs_fuse(forms: dict[str, nn.Module], case: Case, rounds: int) -> tuple[Spread, Spread, Spread]:
    """deploy / eval, own / eval and deploy / own: process CPU time at 1 thread (``time.process_time``,
    all of the process's work, little affected by other processes), paired per round, bootstrap intervals."""
    times = _per_round(forms, case, rounds, threads=1, clock=time.process_time)
    pairs = (("deploy", "eval"), ("own", "eval"), ("deploy", "own"))
    return tuple(Spread.bootstrap(_paired(times, *pair)) for pair in pairs)  # type: ignore[return-value]


def run(
    name: str, protocols: bool = True, rounds: int = 0, timeout: float = 600, wall: bool = True, vs_fuse: bool = False
) -> Row:
    """:func:`compare` in a forked process under ``timeout`` seconds (a hang or crash is the row's error)."""
    row = _sibling("bench_timm").run_isolated(compare, (name, protocols, rounds, wall, vs_fuse), timeout, row=Row)
    row.protocols = protocols  # an error row is built from the name alone
    # the forked process sends the row as a dict (dataclasses.asdict): rebuild the ratios
    row.wall_2_threads, row.cpu_1_thread, row.vs_fuse = (
        tuple(Spread(**s) if isinstance(s, dict) else s for s in pair)
        for pair in (row.wall_2_threads, row.cpu_1_thread, row.vs_fuse)
    )
    return row


# --- the table ----------------------------------------------------------------------------------------


def _triple(values: tuple[int, int, int]) -> str:
    return " / ".join("-" if v < 0 else str(v) for v in values)


def _ratio(value: Spread) -> str:
    if value.median != value.median:
        return "-"
    return f"{value.median:.3f} ({value.low:.3f}-{value.high:.3f})"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | protocols | exact: float64 / model dtype (max rel) | same output types "
        "| BN kernels: eval / deploy / own | convs: eval / deploy / own | aten ops: eval / deploy / own "
        "| wall, 2 threads: deploy / own (x eval) | CPU, 1 thread: deploy / own (x eval) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        protocols = "on" if r.protocols else "off"
        if r.error:
            lines.append(f"| {r.model} | {protocols} | no: {r.error} | | | | | | |")
            continue
        lines.append(
            f"| {r.model} | {protocols} | {r.max_rel_error_float64:.1e} / {r.max_rel_error_dtype:.1e} "
            f"| {'yes' if r.same_types else 'no'} | {_triple(r.batch_norms)} | {_triple(r.convolutions)} "
            f"| {_triple(r.ops)} | {_ratio(r.wall_2_threads[0])} / {_ratio(r.wall_2_threads[1])} "
            f"| {_ratio(r.cpu_1_thread[0])} / {_ratio(r.cpu_1_thread[1])} |"
        )
    return "\n".join(lines)


def markdown_vs_fuse(rows: list[Row]) -> str:
    """The ``--vs-fuse`` table: the three paired ratios of each row, with their bootstrap intervals."""
    lines = [
        "| model | protocols | CPU, 1 thread: deploy / eval | own / eval | deploy / own |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = f"no: {r.error} | | " if r.error else " | ".join(_ratio(spread) for spread in r.vs_fuse)
        lines.append(f"| {r.model} | {'on' if r.protocols else 'off'} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model (0: no timing)")
    parser.add_argument("--no-wall", action="store_true", help="time CPU at 1 thread only (stable under load)")
    parser.add_argument(
        "--vs-fuse",
        action="store_true",
        help="time eval, deploy and the own converter against each other (process CPU time, 1 thread)",
    )
    parser.add_argument(
        "--protocols", choices=("both", "on", "off"), default="both", help="Ultralytics: both settings, on or off"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per model")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names: " + ", ".join(MODELS))
    args = parser.parse_args()
    names = args.models.split(",")
    _sibling("bench_timm").require(["torchvision", *(MODELS[name][0] for name in names)], "test-interop")
    rows = []
    for name in names:
        ultralytics = MODELS[name][0] == "ultralytics"
        settings = {"both": (True, False), "on": (True,), "off": (False,)}[args.protocols if ultralytics else "on"]
        for protocols in settings:
            rows.append(run(name, protocols, args.rounds, args.timeout, not args.no_wall, args.vs_fuse))
            print(f"{name}: {rows[-1]}", flush=True)
    import torchvision

    versions = [f"torch {torch.__version__}", f"torchvision {torchvision.__version__}"]
    for library in ("transformers", "ultralytics"):
        if importlib.util.find_spec(library):
            versions.append(f"{library} {importlib.import_module(library).__version__}")
    print(
        f"\n{', '.join(versions)}; batch 1; timed paired and interleaved, {args.rounds} rounds "
        "(ratio: median of the per-round ratios, with its 95 % confidence interval)\n"
    )
    print(markdown(rows))
    if args.vs_fuse:
        print("\nprocess CPU time, 1 thread; 95 % percentile-bootstrap intervals of the median\n")
        print(markdown_vs_fuse(rows))


if __name__ == "__main__":
    main()

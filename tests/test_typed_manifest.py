"""The serving layer reads manifests as the typed :class:`trainfer.serve.manifest.Manifest`, never as raw dicts.

:func:`trainfer.serve.bundle.check_manifest` validates a manifest into the pydantic schema and returns the
model; the schema's field names are checked by mypy wherever the model is read. A raw dict coming back
(``manifest["form"]``, ``manifest.get("heads")``, a ``manifest: dict`` parameter, a subscripted
``manifest.to_json()``) would bypass both: this test reads every module of ``trainfer/serve`` and
``trainfer/server`` and refuses them (the schema module itself reads parsed JSON on purpose).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "trainfer"
SCHEMA = ROOT / "serve" / "manifest.py"
_DUMPS = {"to_json", "model_dump"}


def _name(node: ast.AST) -> str:
    """The identifier a value is read from: ``manifest`` for ``manifest``, ``self.manifest``, ``x.manifest``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _is_manifest(node: ast.AST) -> bool:
    if "manifest" in _name(node).lower() and _name(node) != "MANIFEST_KEY":
        return True
    # manifest.to_json()[...] / manifest.model_dump()[...]: the raw dict again
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _DUMPS


def raw_manifest_reads(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: what`` for each raw-dict read of a manifest in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Subscript) and _is_manifest(node.value):
            found.append(f"{filename}:{node.lineno}: subscripts a manifest")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and _is_manifest(node.func.value)
        ):
            found.append(f"{filename}:{node.lineno}: .get() on a manifest")
        elif isinstance(node, ast.arg) and "manifest" in node.arg and node.annotation is not None:
            annotation = ast.unparse(node.annotation)
            if any(word in annotation for word in ("dict", "Mapping", "Any")):
                found.append(f"{filename}:{node.lineno}: parameter {node.arg}: {annotation}")
    return found


def _serving_modules() -> list[Path]:
    files = sorted([*(ROOT / "serve").rglob("*.py"), *(ROOT / "server").rglob("*.py")])
    return [path for path in files if path != SCHEMA]


def test_the_serving_layer_reads_no_raw_manifest_dict():
    found = [hit for path in _serving_modules() for hit in raw_manifest_reads(path.read_text(), str(path))]
    assert not found, "read the typed Manifest's attributes instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        'form = manifest["form"]',
        'heads = self.manifest.get("heads")',
        'shape = recorded_manifest["input"]["shape"]',
        'kind = manifest.to_json()["form"]',
        "def f(manifest: dict[str, Any]) -> None: ...",
        "def f(manifest: Mapping[str, Any]) -> None: ...",
    ],
)
def test_the_check_catches_a_raw_read(line):
    assert raw_manifest_reads(line)


@pytest.mark.parametrize(
    "line",
    ["form = manifest.form", 'deploy = manifest.config.get("deploy")', "def f(manifest: Manifest) -> None: ..."],
)
def test_the_check_allows_typed_reads(line):
    assert not raw_manifest_reads(line)


def test_check_manifest_returns_the_typed_model(tmp_path):
    import torch

    import trainfer
    from trainfer.serve.bundle import read_manifest
    from trainfer.serve.manifest import Manifest

    trainfer.save(trainfer.models.digits_net(), tmp_path / "b", labels=[str(d) for d in range(10)])
    manifest = read_manifest(tmp_path / "b")
    assert isinstance(manifest, Manifest) and manifest.input.shape == [1, 1, 8, 8]
    assert manifest.heads[0].labels == [str(d) for d in range(10)] and manifest.weights is not None
    assert torch.Size(manifest.input.shape) == torch.Size([1, 1, 8, 8])

"""The package's shape holds: layers only import downwards, no import cycles, no name shadowed.

The layers and the cycle rule are import-linter contracts in pyproject.toml (checked on the import
graph grimp builds from the source, function-level imports included); these tests run them, and
show on a copy of the package with one upward import that the contracts do catch it.
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import trainfer
from trainfer import _moved

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = [str(Path(sys.executable).with_name("lint-imports"))]


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the package in ``project`` (its pyproject.toml holds the contracts)."""
    return subprocess.run(
        [*LINT_IMPORTS, str(project / "pyproject.toml"), "--no-cache"],
        cwd=project,
        env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_layer_and_cycle_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("reparam/algebra/conv_op.py", "import trainfer.serve.bundle", "layers"),  # an upward import
        ("serve/gate.py", "import trainfer.serve.quantize", "no import cycles"),  # quantize imports gate
        ("serve/outputs.py", "import trainfer.testing", "never imports its test helpers"),
        ("serve/predictor.py", "import trainfer.serve.export", "serving never imports the exporter"),
    ],
)
def test_the_contracts_catch_a_bad_import(tmp_path, module, line, broken):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "pyproject.toml", project)
    shutil.copytree(ROOT / "trainfer", project / "trainfer", ignore=shutil.ignore_patterns("__pycache__"))
    path = project / "trainfer" / module
    path.write_text(path.read_text() + f"\n\ndef _bad():\n    {line}\n")
    result = lint_imports(project)
    assert result.returncode == 1, result.stdout + result.stderr
    summary = result.stdout.split("Broken contracts")[0]  # one line per contract: its name, then KEPT or BROKEN
    assert any(broken in line and line.rstrip().endswith("BROKEN") for line in summary.splitlines()), summary


def test_no_public_function_is_shadowed_by_a_module():
    """``import trainfer.deploy`` cannot hand back a module while ``trainfer.deploy`` is the function."""
    for name in trainfer.__all__:
        value = getattr(trainfer, name)
        if inspect.ismodule(value):
            continue
        full = f"trainfer.{name}"
        assert full not in _moved.MOVED, full
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(full)


@pytest.mark.parametrize("old", sorted(_moved.MOVED))
def test_old_flat_paths_are_the_new_modules_with_a_warning(old):
    new = _moved.MOVED[old]
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alias = importlib.import_module(old)
    assert alias is importlib.import_module(new)
    assert alias.__spec__.name == new  # the real module keeps its own identity
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


def test_the_architecture_page_names_every_module_of_the_tree():
    """docs/architecture.md's tree shows every subpackage and top-level module that exists."""
    page = (ROOT / "docs" / "architecture.md").read_text()
    tree = page.split("```")[1]
    package = ROOT / "trainfer"
    names = [p.name + "/" if p.is_dir() else p.name for p in package.iterdir() if p.suffix == ".py" or p.is_dir()]
    missing = [n for n in names if n not in ("__pycache__/", "__init__.py", "__main__.py") and n not in tree]
    assert not missing, f"docs/architecture.md's tree lacks {missing}"

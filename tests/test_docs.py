"""Every Python code block in the README and in docs/ runs, page by page; every shell command names what exists.

The blocks of one page share a namespace and run in order (later blocks build on earlier ones),
in a fresh working directory, so a page's examples are a script that must work as written.
"""

import importlib
import os
import re
import shlex
import textwrap
import warnings
from pathlib import Path

import click
import matplotlib
import pytest

from trainfer._moved import MOVED

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)  # also blocks indented in lists


def python_blocks(page: Path) -> list[str]:
    return [textwrap.dedent(code) for _, code in BLOCK.findall(page.read_text())]


def test_the_pages_hold_code_to_run():
    assert sum(len(python_blocks(page)) for page in PAGES) >= 20


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    namespace: dict = {"__name__": "__main__"}  # as if the page were a script
    for number, block in enumerate(python_blocks(page), 1):
        try:
            exec(compile(block, f"{page.name}, block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page.name} block {number} failed: {error!r}\n{block}") from error


# Shell blocks train models, launch torchrun or build venvs, so they are not run here: each command in them
# is checked against what it names instead (the CLI's parser, the Makefile's targets, the files and options).
SHELL_BLOCK = re.compile(r"^( *)```(?:bash|console|sh)\n(.*?)^\1```", re.S | re.M)
MAKE_TARGETS = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), re.M))


def shell_commands(page: Path) -> list[list[str]]:
    """The argv of every command line in the page's shell blocks (``$ `` prompts, ``\\`` continuations
    and ``#`` comments removed; output lines, which start with no known program, are skipped)."""
    commands = []
    for _, block in SHELL_BLOCK.findall(page.read_text()):
        for line in textwrap.dedent(block).replace("\\\n", " ").splitlines():
            argv = shlex.split(line.removeprefix("$ "), comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value before the program
                argv = argv[1:]
            if argv and (argv[0] in ("trainfer", "make", "torchrun") or argv[0].endswith("python")):
                commands.append(argv)
    return commands


def _check_trainfer(args: list[str]) -> None:
    """Parse ``trainfer ARGS`` with the real CLI; only paths that must exist may fail (they name user files)."""
    from trainfer.cli import main

    context = click.Context(main, info_name="trainfer")
    command = main.get_command(context, args[0])
    assert command is not None, f"no sub-command {args[0]!r}"
    try:
        command.make_context(args[0], list(args[1:]), parent=context)
    except click.BadParameter as error:
        assert isinstance(error.param.type, click.Path) and "does not exist" in error.message, error.format_message()


def check_command(argv: list[str]) -> None:
    if argv[0] == "make":
        assert set(argv[1:]) <= MAKE_TARGETS, f"not Makefile targets: {set(argv[1:]) - MAKE_TARGETS}"
    elif argv[0] == "trainfer":
        _check_trainfer(argv[1:])
    elif "-m" in argv and argv[argv.index("-m") + 1] == "trainfer":  # torchrun / python -m trainfer
        _check_trainfer(argv[argv.index("-m") + 2 :])
    elif "-m" in argv and argv[argv.index("-m") + 1] == "pytest":
        assert all((ROOT / arg).is_file() for arg in argv if arg.startswith("tests/")), argv
    else:  # python benchmarks/x.py --option ...: the script exists and takes each option
        script = next(ROOT / arg for arg in argv if arg.endswith(".py"))
        options = {arg.split("=")[0] for arg in argv if arg.startswith("--")}
        assert options <= set(re.findall(r"--[\w-]+", script.read_text())), f"{script.name} lacks {options}"


SHELL_PAGES = [p for p in PAGES if shell_commands(p)]


@pytest.mark.parametrize("page", SHELL_PAGES, ids=lambda p: p.name)
def test_shell_commands_name_what_exists(page):
    for argv in shell_commands(page):
        try:
            check_command(argv)
        except (AssertionError, click.ClickException) as error:
            raise AssertionError(f"{page.name}: {shlex.join(argv)}: {error}") from error


def test_a_stale_shell_command_is_caught():
    stale = [
        ["trainfer", "predict", "m", "x.png", "--top-kk", "3"],
        ["trainfer", "deplyo", "x"],
        ["make", "tests"],
        ["python", "benchmarks/bench_predict.py", "--modle", "x"],
        ["python", "-m", "pytest", "tests/test_nowhere.py"],
    ]
    for argv in stale:
        with pytest.raises((AssertionError, click.ClickException)):
            check_command(argv)
    assert sum(len(shell_commands(page)) for page in PAGES) >= 35


DOTTED = re.compile(r"`(trainfer(?:\.[A-Za-z_]\w*)+)")


def documented_names(page: Path) -> set[str]:
    """The dotted ``trainfer.*`` names a page writes in backticks (the table of 0.1 paths excepted)."""
    text = page.read_text()
    old_paths = re.search(r"^## Old import paths\n.*?(?=^## |\Z)", text, re.S | re.M)
    if old_paths:
        text = text.replace(old_paths.group(0), "")
    return set(DOTTED.findall(text))


def resolve(name: str) -> object:
    """The object ``name`` names: its longest importable module prefix, then attributes; a moved
    (deprecated) path or name raises a ``DeprecationWarning`` (already imported or not)."""
    parts = name.split(".")
    for cut in range(2, len(parts) + 1):
        if ".".join(parts[:cut]) in MOVED:
            raise DeprecationWarning(f"{'.'.join(parts[:cut])} moved to {MOVED['.'.join(parts[:cut])]}")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for cut in range(len(parts), 0, -1):
            try:
                found: object = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for part in parts[cut:]:
            found = getattr(found, part)
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if documented_names(p)], ids=lambda p: p.name)
def test_every_dotted_name_a_page_writes_exists_at_its_current_path(page):
    stale = {}
    for name in sorted(documented_names(page)):
        try:
            resolve(name)
        except (AttributeError, DeprecationWarning) as error:
            stale[name] = f"{type(error).__name__}: {error}"
    assert not stale, f"{page.name} names what is not there (or moved): {stale}"


def test_a_moved_or_missing_name_is_caught():
    for name in ("trainfer.algebra", "trainfer.serve.bundle.no_such_function"):
        with pytest.raises((AttributeError, DeprecationWarning)):
            resolve(name)
    assert resolve("trainfer.serve.migrate.migrate") is not None


def test_the_runtimes_page_states_the_tolerances_of_the_code():
    """docs/runtimes.md's table names each reduced precision's tolerance: the one numerics.TOLERANCE holds."""
    import torch

    from trainfer.numerics import TOLERANCE

    page = (ROOT / "docs" / "runtimes.md").read_text().splitlines()
    row = next(line for line in page if line.startswith("| bf16 / fp16"))
    stated = {name: float(value) for value, name in re.findall(r"([0-9.]+e-[0-9]+) \((bf16|fp16)\)", row)}
    assert stated == {
        "bf16": TOLERANCE[torch.bfloat16],
        "fp16": TOLERANCE[torch.float16],
    }


def api_entries() -> set[str]:
    """The ``::: dotted.name`` targets of docs/api.md (mkdocstrings entries)."""
    return set(re.findall(r"^::: (\S+)", (ROOT / "docs" / "api.md").read_text(), re.M))


def undocumented(names: list[str], entries: set[str]) -> list[str]:
    """The public ``names`` of ``trainfer`` that no entry documents: an entry is the object itself (at
    any path that holds it), its module documented whole (the errors), or for a submodule one of its members."""
    import inspect
    import sys

    import trainfer

    documented = [resolve(entry) for entry in entries]
    missing = []
    for name in names:
        value = getattr(trainfer, name)
        if inspect.ismodule(value):
            found = any(entry.startswith(f"{value.__name__}.") for entry in entries) or value in documented
        else:
            found = any(value is entry for entry in documented) or sys.modules[value.__module__] in documented
        if not found:
            missing.append(name)
    return missing


def test_every_public_name_has_an_api_entry():
    import trainfer

    names = [name for name in trainfer.__all__ if name != "__version__"]
    assert undocumented(names, api_entries()) == []
    assert undocumented(["compile", "blocks"], api_entries() - {"trainfer.serve.gated.compile", "trainfer.blocks"}) == [
        "compile",
        "blocks",
    ]  # the check can fail


def tree_sections(tree: str) -> dict[str, str]:
    """The text of docs/architecture.md's package tree per directory (``""`` for ``trainfer/``,
    ``"reparam/fold/"``, ...): the names listed in it and their descriptions. An entry line is indented by
    two spaces per level (names, then two or more spaces, then its description); a description's
    continuation lines are indented deeper than any entry."""
    sections: dict[str, str] = {}
    stack: list[tuple[int, str]] = []  # (indent, directory) of the directories enclosing the current line
    current = ""
    for line in tree.splitlines()[1:]:  # the first line is `trainfer/`
        indent = len(line) - len(line.lstrip())
        if indent < 20:  # an entry: `name.py other.py   description` or `directory/   description`
            stack = [(level, name) for level, name in stack if level < indent]
            names = re.split(r" {2,}", line.strip(), maxsplit=1)[0]
            parent = "".join(name for _, name in stack)
            current = parent + names if names.endswith("/") else parent
            if names.endswith("/"):
                stack.append((indent, names))
        sections[current] = sections.get(current, "") + " " + line
    return sections


def unlisted_modules(tree: str) -> list[str]:
    """The modules of ``trainfer/`` (``__init__`` aside) whose name the tree's section of their directory
    does not write (as a word: ``bundle``, ``bundle.py``)."""
    sections = tree_sections(tree)
    missing = []
    for path in sorted((ROOT / "trainfer").rglob("*.py")):
        relative = path.relative_to(ROOT / "trainfer")
        directory = "".join(f"{part}/" for part in relative.parts[:-1])
        if path.stem != "__init__" and not re.search(rf"\b{path.stem}\b", sections.get(directory, "")):
            missing.append(str(relative))
    return missing


def architecture_tree() -> str:
    page = (ROOT / "docs" / "architecture.md").read_text()
    return re.search(r"^```\n(trainfer/\n.*?)^```", page, re.S | re.M).group(1)


def test_the_architecture_page_lists_every_module():
    assert unlisted_modules(architecture_tree()) == []


def test_a_module_left_out_of_the_tree_is_caught():
    tree = architecture_tree()
    assert "serve/" in tree_sections(tree) and "reparam/fold/" in tree_sections(tree)
    assert unlisted_modules(tree.replace("migrate", "migration")) == ["cli/migrate.py", "serve/migrate.py"]


def aliased_in_table(page: str) -> set[str]:
    """The 0.1 paths the first column of docs/architecture.md's "Old import paths" table names."""
    section = re.search(r"^## Old import paths\n(.*?)(?=^## |\Z)", page, re.S | re.M).group(1)
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`(trainfer\.\w+)`", row.split(" | ")[0])}


def test_the_old_import_paths_table_names_exactly_the_aliases_that_import():
    page = (ROOT / "docs" / "architecture.md").read_text()
    assert aliased_in_table(page) == set(MOVED)
    assert aliased_in_table(page.replace("| `trainfer.dual` |", "| `trainfer.dual`, `trainfer.fold_passes` |")) != set(
        MOVED
    )  # the check can fail

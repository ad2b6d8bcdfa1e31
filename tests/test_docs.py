"""Every Python code block in the README and in docs/ runs, page by page.

The blocks of one page share a namespace and run in order (later blocks build on earlier ones),
in a fresh working directory, so a page's examples are a script that must work as written.
"""

import os
import re
import textwrap
from pathlib import Path

import matplotlib
import pytest

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

"""``import trainfer`` stays light: heavy optional libraries are imported only where they are used.

Not a timing test (benchmarks/bench_import.py measures the cost): a fresh interpreter imports
trainfer and reports which of these modules it pulled in.
"""

import json
import subprocess
import sys

HEAVY = ["matplotlib", "onnx", "onnxruntime", "onnxscript", "captum", "sklearn", "PIL", "scipy"]


def test_import_trainfer_pulls_in_no_heavy_optional_library():
    probe = f"import json, sys, trainfer; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(done.stdout) == []


def test_drawing_a_plot_imports_matplotlib_then():
    probe = (
        "import json, sys, torch, trainfer; "
        "report = trainfer.bench.benchmark(torch.nn.Conv2d(1, 2, 3), (1, 1, 8, 8), forms=('train',), rounds=1, "
        "repeats=1, warmup=0, show_progress=False); report.plot(); "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "matplotlib" in json.loads(done.stdout)


def test_the_command_line_parses_its_arguments_without_importing_torch():
    """``import trainfer.cli`` and ``trainfer [CMD] --help`` for every command: no torch, no numpy (issue 24 §4)."""
    probe = (
        "import json, sys, trainfer.cli\n"
        "from click.testing import CliRunner\n"
        "runner = CliRunner()\n"
        "names = sorted(trainfer.cli.main.commands)\n"
        "commands = [[], *([name] for name in names)]\n"
        "codes = [runner.invoke(trainfer.cli.main, [*command, '--help']).exit_code for command in commands]\n"
        "loaded = [module for module in ('torch', 'numpy') if module in sys.modules]\n"
        "print(json.dumps({'names': names, 'codes': codes, 'loaded': loaded}))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout)
    assert len(report["names"]) >= 13 and "compile" in report["names"]
    assert report["codes"] == [0] * (1 + len(report["names"]))
    assert report["loaded"] == []

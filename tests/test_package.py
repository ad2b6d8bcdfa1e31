"""The package: one version everywhere, a supported torch range rather than a pin."""

import importlib.metadata
import json
import re

from click.testing import CliRunner

import trainfer
from trainfer.cli import main


def test_one_version_in_the_metadata_the_cli_and_the_bundle(tmp_path):
    assert importlib.metadata.version("trainfer") == trainfer.__version__
    printed = CliRunner().invoke(main, ["--version"]).output
    assert trainfer.__version__ in printed
    trainfer.save(trainfer.models.digits_net(), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["versions"]["trainfer"] == trainfer.__version__


def test_torch_is_a_range_that_admits_the_versions_tested():
    requirement = next(r for r in importlib.metadata.requires("trainfer") if re.match(r"torch\b", r))
    assert "==" not in requirement and ">=2.13" in requirement, requirement

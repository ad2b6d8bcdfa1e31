"""A rerun of ``trainfer demo`` deletes a subdirectory of the earlier output only when all it holds is the demo's.

The earlier outputs here are built by hand (no training): the files a demo writes, with the markers recording them
(``results.json``, ``sequences/scores.json``; :mod:`trainfer.demo.ownership`). A user's file, a link or a FIFO in
any subdirectory keeps the whole earlier output beside the new one, with a warning naming the subdirectory.
"""

import json
import os
import shutil
import warnings

import pytest
from nodes import NODES, make_node
from time_limit import time_limit

from trainfer import WriteWarning
from trainfer.atomic import DIRECTORY, FILE, KEPT_SUFFIX
from trainfer.demo import pipeline as demo
from trainfer.demo import sequences
from trainfer.demo.ownership import WRITTEN, OutputLayout

#: The files the earlier demo wrote into its subdirectories, as ``results.json`` records them.
IN_SUBDIRECTORIES = [
    "bundle_deploy/manifest.json",
    "bundle_deploy/model.safetensors",
    "bundle_int8/quantized.onnx",
    "bundle_train/manifest.json",
    "digits/test000_label7.png",
    "explain/correct_test000.png",
    "explain/heatmaps/correct_test000.png",
]
#: The files the earlier sequence step wrote into its bundles, as ``sequences/scores.json`` records them.
IN_BUNDLES = ["crnn_bundle/manifest.json", "crnn_bundle/model.safetensors", "seq2seq_bundle/manifest.json"]


def snapshot(directory):
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


@pytest.fixture
def earlier(tmp_path):
    """An earlier demo output, sequences included: ``tmp_path/demo``."""
    out = tmp_path / "demo"
    for name in ["report.md", *IN_SUBDIRECTORIES, "sequences/report.md", *(f"sequences/{p}" for p in IN_BUNDLES)]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"old {name}")
    (out / demo.MARKER).write_text(json.dumps({"config": {}, WRITTEN: IN_SUBDIRECTORIES}))
    (out / "sequences" / "scores.json").write_text(json.dumps({"scores": [], WRITTEN: IN_BUNDLES}))
    return out


def rerun(out):
    """The demo's replace of ``out``, as a run ends with it."""
    with demo._staging(out) as work:
        (work / demo.MARKER).write_text("new")


def rerun_sequences(out):
    """``trainfer demo --sequences``'s replace of ``out/sequences``."""
    with sequences.staged_output(out / "sequences") as work:
        (work / "scores.json").write_text('{"scores": []}')


def test_a_clean_earlier_output_is_replaced_silently_with_nothing_kept(earlier):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rerun(earlier)
    assert snapshot(earlier) == {demo.MARKER: b"new"} and os.listdir(earlier.parent) == ["demo"]


def test_a_subdirectory_missing_some_of_its_files_is_still_the_demos(earlier):
    """It removes fewer files: nothing of anyone else's is lost."""
    shutil.rmtree(earlier / "explain" / "heatmaps")
    (earlier / "bundle_deploy" / "model.safetensors").unlink()
    shutil.rmtree(earlier / "sequences" / "seq2seq_bundle")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rerun(earlier)
    assert snapshot(earlier) == {demo.MARKER: b"new"} and os.listdir(earlier.parent) == ["demo"]


@pytest.mark.parametrize(
    "mine",
    [
        "bundle_deploy/notes.txt",
        "digits/notes.txt",
        "explain/heatmaps/notes.txt",
        "digits/mine/test000_label7.png",  # a directory the demo does not write, though the name is a file it wrote
        "sequences/notes.txt",
        "sequences/crnn_bundle/notes.txt",
    ],
)
def test_a_users_file_in_a_subdirectory_keeps_the_whole_earlier_output(earlier, mine):
    (earlier / mine).parent.mkdir(exist_ok=True)
    (earlier / mine).write_text("mine")
    before = snapshot(earlier)
    kept = earlier.with_name("demo" + KEPT_SUFFIX)
    top = mine.split("/")[0]
    with pytest.warns(WriteWarning, match=rf"held '{top}' besides its writer's files .* kept with them in '{kept}'$"):
        rerun(earlier)
    assert snapshot(kept) == before and snapshot(earlier) == {demo.MARKER: b"new"}


def test_a_users_file_in_a_bundle_keeps_the_earlier_sequence_output(earlier):
    """``trainfer demo --sequences`` judges the bundles of ``OUT/sequences`` by the same rule."""
    (earlier / "sequences" / "seq2seq_bundle" / "notes.txt").write_text("mine")
    before = snapshot(earlier / "sequences")
    kept = earlier / ("sequences" + KEPT_SUFFIX)
    with pytest.warns(WriteWarning, match=rf"held 'seq2seq_bundle' .* kept with them in '{kept}'$"):
        rerun_sequences(earlier)
    assert snapshot(kept) == before and snapshot(earlier / "sequences") == {"scores.json": b'{"scores": []}'}


@pytest.mark.parametrize("kind", [*NODES, "link to a directory", "link to a file"])
@pytest.mark.parametrize(
    "where", ["digits/test000_label7.png", "explain/heatmaps", "explain/heatmaps/extra", "sequences/crnn_bundle/x"]
)
def test_a_link_or_a_node_in_a_subdirectory_makes_it_foreign_and_is_never_followed(earlier, tmp_path, where, kind):
    """Under a name the demo wrote or another: a link (never followed, what it points to untouched), a FIFO (never
    opened: no hang) or a device is not a file the demo wrote."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("mine")
    path = earlier / where
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if kind == "link to a directory":
        path.symlink_to(outside)
    elif kind == "link to a file":
        path.symlink_to(outside / "precious.txt")
    else:
        make_node(path, kind)
    kept = earlier.with_name("demo" + KEPT_SUFFIX)
    with time_limit(30), pytest.warns(WriteWarning, match=f"held '{where.split('/')[0]}' "):
        rerun(earlier)
    assert os.path.lexists(kept / where) and snapshot(outside) == {"precious.txt": b"mine"}


def test_a_directory_it_cannot_list_or_of_another_type_is_foreign(tmp_path, monkeypatch):
    """Nothing in a directory that cannot be listed (unreadable for this user) can be proven the demo's; nor is a
    directory where the demo wrote a file."""
    layout = OutputLayout({"models": DIRECTORY}, "marker.json", 1000)
    (tmp_path / "models").mkdir()
    (tmp_path / "marker.json").write_text(json.dumps({WRITTEN: ["models/a.bin"]}))
    assert layout.own(tmp_path) == {"models": DIRECTORY}
    (tmp_path / "models" / "a.bin").mkdir()
    assert layout.own(tmp_path) == {}
    os.rmdir(tmp_path / "models" / "a.bin")
    (tmp_path / "models").rename(tmp_path / "elsewhere")
    (tmp_path / "elsewhere" / "a.bin").write_text("mine")
    (tmp_path / "models").symlink_to(tmp_path / "elsewhere")  # holding just what the marker records
    assert layout.own(tmp_path) == {}
    (tmp_path / "models").unlink()
    (tmp_path / "elsewhere").rename(tmp_path / "models")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", unreadable)  # as chmod 0 does for another user than root
    assert layout.own(tmp_path) == {}


@pytest.mark.parametrize(
    "marker",
    ["missing", "a link to a good one", "larger than its bound", "not JSON", "a list", "no record", "not a list"],
)
def test_a_marker_recording_nothing_makes_every_subdirectory_holding_anything_foreign(tmp_path, marker):
    """Only a file the marker records is the demo's: an output written before markers recorded files, or one
    whose marker cannot be read, keeps its subdirectories (an empty one loses nothing: it is still the demo's)."""
    layout = OutputLayout({"report.md": FILE, "models": DIRECTORY, "empty": DIRECTORY}, "marker.json", 1000)
    (tmp_path / "models").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "models" / "a.bin").write_text("old")
    good = json.dumps({WRITTEN: ["models/a.bin"]})
    (tmp_path / "good.json").write_text(good)
    assert layout.own(tmp_path) == {"report.md": FILE, "empty": DIRECTORY}  # "missing"
    contents = {
        "larger than its bound": json.dumps({WRITTEN: ["models/a.bin"], "padding": "x" * 1000}),
        "not JSON": good[:-1],
        "a list": json.dumps([good]),
        "no record": "{}",
        "not a list": json.dumps({WRITTEN: "models/a.bin"}),
    }
    if marker == "a link to a good one":
        (tmp_path / "marker.json").symlink_to(tmp_path / "good.json")
    elif marker != "missing":
        (tmp_path / "marker.json").write_text(contents[marker])
    assert layout.own(tmp_path) == {"report.md": FILE, "empty": DIRECTORY}
    (tmp_path / "marker.json").unlink(missing_ok=True)
    (tmp_path / "marker.json").write_text(good)
    assert layout.own(tmp_path) == {"report.md": FILE, "models": DIRECTORY, "empty": DIRECTORY}


def test_the_marker_records_every_file_in_the_subdirectories_a_nested_output_records_its_own(earlier):
    """What a run records is what it finds there at the end: it cannot go stale when the demo changes."""
    (earlier / "digits" / "test001_label2.png").write_text("new in the demo")
    assert demo.LAYOUT.written(earlier) == sorted([*IN_SUBDIRECTORIES, "digits/test001_label2.png"])
    assert sequences.LAYOUT.written(earlier / "sequences") == IN_BUNDLES

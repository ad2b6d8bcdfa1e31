"""Interrupted writes leave what was there before, and no temporary files behind."""

import pytest

from trainfer.atomic import atomic_directory, atomic_file


class Interrupted(Exception):
    pass


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "report.md"
    target.write_text("old")
    with pytest.raises(Interrupted):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise Interrupted
    assert target.read_text() == "old"
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_atomic_directory_swaps_whole_directories(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target) as staging:
            (staging / "a").write_text("half")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "old"
    with atomic_directory(target) as staging:
        (staging / "b").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]

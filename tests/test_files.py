"""Atomic writes: a directory is swapped in whole, or not at all."""

from __future__ import annotations

import pytest

from lorakit.errors import UserError
from lorakit.files import atomic_write_bytes, previous_directory, staged_directory


def test_staged_directory_replaces_the_old_one_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_directory(out) as staging:
        assert staging.parent == tmp_path and staging != out
        (staging / "new.txt").write_text("new")
        assert (out / "old.txt").is_file()  # readers see the old directory until the end
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old copy left


def test_a_failure_inside_leaves_the_old_directory_and_no_staging(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with staged_directory(out) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_staged_directory_makes_missing_parents_and_names_an_unwritable_one(tmp_path):
    out = tmp_path / "a" / "b" / "model"
    with staged_directory(out) as staging:
        (staging / "x").write_text("x")
    assert (out / "x").read_text() == "x"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to"):
        with staged_directory(blocker / "model"):
            pass


def test_previous_directory_is_a_hidden_sibling(tmp_path):
    assert previous_directory(tmp_path / "checkpoint") == tmp_path / ".checkpoint.old"


def test_atomic_write_bytes_replaces_a_file(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_bytes(path, b"1")
    atomic_write_bytes(path, b"2")
    assert path.read_bytes() == b"2" and [p.name for p in tmp_path.iterdir()] == ["f.json"]

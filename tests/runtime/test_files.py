"""Atomic writes: a file appears complete under its final name or not at all, and what is already
at that name is replaced only when a file can deliberately take its place."""
import pytest

from headsteer.runtime import InputError
from headsteer.runtime.files import atomic_path, write_text_atomic


def test_writing_onto_a_folder_is_refused_before_any_work(tmp_path):
    """os.replace cannot put a file over a folder: that was a bare IsADirectoryError naming the
    temporary file, raised only after the caller had done its work (an ONNX export, a report)."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "keep.txt").write_text("kept")
    entered = []
    with pytest.raises(InputError, match=r"cannot write .*out: it is a folder"):
        with atomic_path(folder, suffix=".onnx") as temp:
            entered.append(temp)
    assert entered == []
    with pytest.raises(InputError, match=r"it is a folder"):
        write_text_atomic(folder, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (folder / "keep.txt").read_text() == "kept"
    write_text_atomic(tmp_path / "report.json", "{}")  # a new name, or a file, is written
    write_text_atomic(tmp_path / "report.json", "[]")
    assert (tmp_path / "report.json").read_text() == "[]"


@pytest.fixture
def disk_events(monkeypatch):
    """Records each os.fsync (as the path it flushed) and os.replace, in order."""
    import os

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _synced(events):
    return {event[1] for event in events if event[0] == "fsync"}


def test_a_staged_folder_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, disk_events):
    """Without fsync a power cut after the swap could keep the renames (the old bundle deleted) but
    lose the new files' contents: both copies gone. Every staged file and folder is flushed before
    the new folder is renamed in, and the parent folder before the old copy is deleted."""
    import os

    from headsteer.runtime.files import staged_directory

    final = tmp_path / "bundle"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with staged_directory(final) as staging:
        (staging / "a.bin").write_bytes(b"a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.bin").write_bytes(b"b")
        staged = {os.path.realpath(p) for p in (staging, staging / "a.bin", staging / "sub", staging / "sub" / "b.bin")}
    publish = next(i for i, e in enumerate(disk_events) if e[0] == "replace" and e[1] == os.path.realpath(staging))
    assert staged <= _synced(disk_events[:publish])
    assert os.path.realpath(tmp_path) in _synced(disk_events[publish:])
    assert (final / "a.bin").read_bytes() == b"a" and not (final / "old.bin").exists()


def test_an_atomic_file_reaches_the_disk_before_it_is_renamed(tmp_path, disk_events):
    import os

    with atomic_path(tmp_path / "model.onnx", suffix=".onnx") as temp:
        temp.write_bytes(b"model")
    publish = next(i for i, e in enumerate(disk_events) if e[0] == "replace")
    assert os.path.realpath(temp) in _synced(disk_events[:publish])
    assert os.path.realpath(tmp_path) in _synced(disk_events[publish:])

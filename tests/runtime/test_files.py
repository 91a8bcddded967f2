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


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_an_atomic_file_gets_the_usual_file_mode(tmp_path, umask):
    """mkstemp makes 0600 files, which a server under another account could not read: the file gets
    what a plain open() would give under the umask (set here, whatever the runner's is)."""
    import os

    previous = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "report.json", "{}")
    finally:
        os.umask(previous)
    assert ((tmp_path / "report.json").stat().st_mode & 0o777) == (0o666 & ~umask)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    final = tmp_path / "model.onnx"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="export failed"):
        with atomic_path(final, suffix=".onnx") as temp:
            temp.write_bytes(b"half")
            raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert final.read_bytes() == b"old"


def _fsync_failing_for(monkeypatch, folders: bool):
    """os.fsync raises EIO on files (folders=False) or EINVAL on folders only (folders=True)."""
    import errno
    import os
    import stat

    real_fsync = os.fsync

    def fsync(fd):
        is_folder = stat.S_ISDIR(os.fstat(fd).st_mode)
        if is_folder and folders:
            raise OSError(errno.EINVAL, "Invalid argument")
        if not is_folder and not folders:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_file_that_cannot_be_flushed_is_not_published(tmp_path, monkeypatch):
    """fsync failing on written data (EIO: it may not be on disk) is an error, and the old copy stays."""
    from headsteer.runtime.files import staged_directory

    final = tmp_path / "model.onnx"
    final.write_bytes(b"old")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "old.bin").write_bytes(b"old")
    _fsync_failing_for(monkeypatch, folders=False)
    with pytest.raises(OSError, match="Input/output error"):
        write_text_atomic(final, "new")
    with pytest.raises(OSError, match="Input/output error"):
        with staged_directory(bundle) as staging:
            (staging / "new.bin").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "model.onnx"]
    assert final.read_bytes() == b"old" and sorted(p.name for p in bundle.iterdir()) == ["old.bin"]


def test_a_folder_that_cannot_be_flushed_does_not_stop_a_write(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL): the write goes on."""
    from headsteer.runtime.files import staged_directory

    _fsync_failing_for(monkeypatch, folders=True)
    write_text_atomic(tmp_path / "report.json", "{}")
    with staged_directory(tmp_path / "bundle") as staging:
        (staging / "a.bin").write_bytes(b"a")
    assert (tmp_path / "report.json").read_text() == "{}" and (tmp_path / "bundle" / "a.bin").read_bytes() == b"a"


def test_check_can_create_names_a_parent_that_is_a_file_or_not_writable(tmp_path, monkeypatch):
    import os
    import re

    from headsteer.runtime.files import check_can_create

    (tmp_path / "notes.txt").write_text("x")
    target = tmp_path / "notes.txt" / "sub" / "report.json"
    with pytest.raises(InputError, match=re.escape(f"--out {target} cannot be created: {tmp_path / 'notes.txt'} is not a folder")):
        check_can_create(target, "--out")
    check_can_create(tmp_path / "new" / "deeper" / "report.json", "--out")  # missing folders are created later
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # (as root, os.access allows everything)
    with pytest.raises(InputError, match=re.escape(f"cannot be created: no permission to write in {tmp_path}")):
        check_can_create(tmp_path / "report.json", "--out")


def test_the_temporary_file_sits_beside_the_final_one_and_keeps_its_extension(tmp_path):
    """Tools that infer a format from the extension (onnx, PIL, a plot's savefig) see the final one,
    and the rename stays on one file system."""
    with atomic_path(tmp_path / "plots" / "usage.png", suffix=".png") as temp:
        assert temp.parent == tmp_path / "plots" and temp.name.startswith(".usage.png.") and temp.suffix == ".png"
        temp.write_bytes(b"png")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["usage.png"]

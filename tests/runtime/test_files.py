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

"""Atomic file writes: everything headsteer writes appears complete under its final name or not at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from headsteer.runtime.errors import InputError

PathLike = Union[str, "os.PathLike[str]"]


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def give_usual_file_mode(path: PathLike) -> None:
    """Set the mode a plain `open(path, "w")` would have given (0666 less the umask): mkstemp and
    safetensors' writer make files 0600, which another account (e.g. a serving process) cannot read."""
    os.chmod(path, 0o666 & ~current_umask())


def check_can_create(path: PathLike, what: str) -> None:
    """InputError unless `path` can be created: its nearest existing parent must be a folder this
    process can write in (missing folders between are created when writing). `what` names the
    path in the message (e.g. "--out")."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what} {path} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path} cannot be created: no permission to write in {parent}")


def _flush_to_disk(path: Path) -> None:
    """fsync a file, or a folder's entries: a rename that publishes a new file must not reach the
    disk before its contents do, or a power cut could leave the final name empty (and, when
    overwriting, the old copy already deleted). Folders that cannot be fsynced are skipped."""
    is_folder = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if is_folder else 0))
    except OSError:
        if is_folder:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_folder:  # some file systems refuse fsync on a folder; a file's failure is real
            raise
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a unique temporary path beside `final` (ending in `suffix`, so tools that infer a
    format from the extension still do); on success rename it onto `final`, else delete it.
    InputError at once if `final` is a folder (a file cannot be renamed over one)."""
    final = Path(final)
    if final.is_dir():
        raise InputError(f"cannot write {final}: it is a folder; give a file name")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp" + suffix, dir=final.parent)
    except OSError as error:
        raise InputError(f"cannot write {final}: {error.strerror or error}") from None
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        give_usual_file_mode(temp)
        _flush_to_disk(temp)
        os.replace(temp, final)
        _flush_to_disk(final.parent)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: PathLike, text: str) -> Path:
    """Write `text` to `final` atomically; returns the path."""
    with atomic_path(final) as temp:
        temp.write_text(text)
    return Path(final)


@contextmanager
def staged_directory(final: PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside `final` (with the usual folder mode); on success it
    replaces `final` (an existing one is swapped out, then removed), else it is deleted."""
    final = Path(os.path.abspath(final))  # "." or "x/.." have no name to stage beside
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as error:
        raise InputError(f"cannot write {final}: {error.strerror or error}") from None
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
        yield staging
        for folder, _, names in os.walk(staging):
            for file in (Path(folder) / name for name in names):
                if file.is_file() and not file.is_symlink():  # (a link's target is not ours to flush)
                    _flush_to_disk(file)
            _flush_to_disk(Path(folder))
        if final.exists():
            _swap_in(staging, final)
        else:
            os.replace(staging, final)
            _flush_to_disk(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_in(staging: Path, final: Path) -> None:
    """Replace the existing `final` by `staging`: move the old one aside, move the new one in,
    then delete the old one. If that is cut short (an error, or Ctrl-C between the two moves),
    the old `final` is put back, so the path never ends up empty with the old copy hidden."""
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
    old = retired / final.name
    try:
        os.replace(final, old)
        os.replace(staging, final)
        _flush_to_disk(final.parent)  # the swap is on disk before the old copy is deleted
    except BaseException:
        _put_back(old, final)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _put_back(old: Path, final: Path) -> None:
    """Undo a half-done swap: move `old` back to `final` if nothing is there, then drop the
    emptied hiding folder. If the move back fails too, the old copy is kept, never deleted."""
    if os.path.lexists(old) and not os.path.lexists(final):
        try:
            os.replace(old, final)
        except OSError:
            return
    if not os.path.lexists(old):
        shutil.rmtree(old.parent, ignore_errors=True)

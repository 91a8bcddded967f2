"""Small helpers shared by the export modules: optional-dependency imports and atomic writes."""
from __future__ import annotations

import importlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from headsteer.runtime.errors import HeadsteerError

PathLike = Union[str, "os.PathLike[str]"]


class MissingDependencyError(HeadsteerError, ImportError):
    """An optional package (an extra of the headsteer distribution) is not installed."""


class ExportError(HeadsteerError):
    """Export could not produce a valid artifact (checker failure, unsupported configuration)."""


EXTRA_FOR = {
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
    "tensorrt": "tensorrt",
}


def require(module: str, what: str):
    """Import an optional module or raise MissingDependencyError naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        extra = EXTRA_FOR.get(module, module)
        hint = f"pip install 'headsteer[{extra}]'"
        if module == "onnxruntime":
            hint += " (CPU) or pip install 'headsteer[gpu]' (onnxruntime-gpu; install only one of the two)"
        raise MissingDependencyError(f"{what} needs the Python package {module!r}, which is not installed ({error}); {hint}") from None


@contextmanager
def atomic_path(final: PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success rename it onto `final`, else delete it."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    except OSError as error:
        raise ExportError(f"cannot write {final}: {error.strerror or error}") from None
    os.close(handle)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(final: PathLike, text: str) -> Path:
    with atomic_path(final) as temp:
        temp.write_text(text)
    return Path(final)

"""Small helpers shared by the export modules: optional-dependency imports and atomic writes."""
from __future__ import annotations

import importlib
import os
from typing import Union

from headsteer.runtime.errors import HeadsteerError
from headsteer.runtime.files import atomic_path, current_umask, write_text_atomic

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["EXTRA_FOR", "ExportError", "MissingDependencyError", "atomic_path", "current_umask", "require", "write_text_atomic"]


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



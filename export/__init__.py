"""Deployment exports of a headsteer bundle: ONNX (masked and sparse attention), ONNX Runtime and
TensorRT runners for `Engine`, and Triton Inference Server model repositories.

Heavy optional packages (onnx, onnxruntime, tensorrt) are imported only when a function needs
them; a missing one is a `MissingDependencyError` naming the extra to install.
"""
from __future__ import annotations

_LAZY = {
    "to_onnx": "headsteer.export.onnx_export",
    "read_metadata": "headsteer.export.onnx_export",
    "load_steering": "headsteer.export.onnx_export",
    "steering_path_for": "headsteer.export.onnx_export",
    "OnnxRunner": "headsteer.export.onnx_runner",
    "make_ort_callable": "headsteer.export.onnx_runner",
    "build_engine": "headsteer.export.tensorrt",
    "TensorRTRunner": "headsteer.export.tensorrt",
    "write_triton_repo": "headsteer.export.triton_repo",
    "ExportableGatedViT": "headsteer.export.onnx_model",
    "MissingDependencyError": "headsteer.export._common",
    "ExportError": "headsteer.export._common",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'headsteer.export' has no attribute {name!r}")


__all__ = sorted(_LAZY)

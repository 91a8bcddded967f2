"""A Triton Inference Server model repository for a bundle:

    DIR/<name>/config.pbtxt          platform onnxruntime_onnx (or tensorrt_plan), max_batch_size,
                                     dynamic_batching, the three inputs and two outputs
    DIR/<name>/1/model.onnx          (or model.plan with engine="plan", and its description model.plan.json)
    DIR/<name>/steering.json         per-class steer_scale/steer_shift rows (see onnx_export)
    DIR/<name>/labels.txt            class names, one per line (the logits output's label_filename)

With max_batch_size > 0 Triton adds the batch dimension itself, so `dims` leave it out. The model
directory is assembled under a temporary name inside DIR and renamed into place.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional, Union

from headsteer.export._common import require
from headsteer.runtime.files import staged_directory
from headsteer.export.onnx_export import DEFAULT_OPSET, external_data_path, resolve_source, steering_document, to_onnx
from headsteer.runtime.errors import InputError

ONNX_TO_TRITON = {
    1: "TYPE_FP32",
    10: "TYPE_FP16",
    16: "TYPE_BF16",
    11: "TYPE_FP64",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    3: "TYPE_INT8",
    2: "TYPE_UINT8",
    9: "TYPE_BOOL",
}
PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}


def _io_from_onnx(onnx_path: Path) -> tuple[list, list]:
    """[(name, triton type, dims without batch)] for the graph inputs and outputs."""
    onnx = require("onnx", "writing a Triton model repository")
    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}

    def describe(values):
        out = []
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            dims = []
            for dim in list(tensor.shape.dim)[1:]:
                dims.append(dim.dim_value if dim.HasField("dim_value") else -1)
            out.append((value.name, ONNX_TO_TRITON[tensor.elem_type], dims))
        return out

    return describe(model.graph.input), describe(model.graph.output)


def render_config(name: str, platform: str, max_batch_size: int, inputs: list, outputs: list, label_output: Optional[str] = None) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig)."""

    def block(entries, label=None):
        parts = []
        for entry_name, data_type, dims in entries:
            lines = [f'    name: "{entry_name}"', f"    data_type: {data_type}", f"    dims: [ {', '.join(str(d) for d in dims)} ]"]
            if label is not None and entry_name == label:
                lines.append('    label_filename: "labels.txt"')
            parts.append("  {\n" + "\n".join(lines) + "\n  }")
        return ",\n".join(parts)

    return (
        f'name: "{name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n{block(inputs)}\n]\n"
        f"output [\n{block(outputs, label_output)}\n]\n"
        "dynamic_batching { }\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
    )


def parse_pbtxt(text: str) -> dict:
    """Parse the protobuf text-format subset `render_config` writes (and hand edits of it):
    `key: scalar`, `key: [ scalars ]`, `key { ... }`, `key [ { ... }, { ... } ]`, # comments.
    Repeated keys collect into lists. Returns plain dicts, lists, str, int, float and enum names."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', re.sub(r"#[^\n]*", "", text))
    position = 0

    def scalar(token):
        if token.startswith('"'):
            return json.loads(token)
        for cast in (int, float):
            try:
                return cast(token)
            except ValueError:
                pass
        return token  # enum name or true/false

    def value():
        nonlocal position
        token = tokens[position]
        if token == "{":
            position += 1
            return message("}")
        if token == "[":
            position += 1
            items = []
            while tokens[position] != "]":
                items.append(value())
                if tokens[position] == ",":
                    position += 1
            position += 1
            return items
        position += 1
        return scalar(token)

    def message(end):
        nonlocal position
        out = {}
        while position < len(tokens) and tokens[position] != end:
            key = tokens[position]
            position += 1
            if tokens[position] == ":":
                position += 1
            item = value()
            if key in out:
                if not isinstance(out[key], list) or not out.get(f"__repeated_{key}"):
                    out[key] = [out[key]]
                    out[f"__repeated_{key}"] = True
                out[key].append(item)
            else:
                out[key] = item
            if position < len(tokens) and tokens[position] in (",", ";"):
                position += 1
        position += 1
        return {k: v for k, v in out.items() if not k.startswith("__repeated_")}

    return message(None)


def _model_name(name: Optional[str], fallback: str) -> str:
    """A given name must already be a valid model name; a derived one (the bundle's folder) is cleaned."""
    if name is not None:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            raise InputError(f"model name {name!r} may hold only letters, digits, '_', '.' and '-' (not first)")
        return name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", fallback).strip("._-") or "headsteer"


def _check_plan_args(precision: str, min_batch: int, opt_batch: Optional[int], max_batch_size: int) -> int:
    """Check a plan's precision and profile batches before anything is exported; returns opt_batch
    (default min(8, max_batch_size)). Triton's dynamic batcher sends any batch from 1 to
    max_batch_size, so the profile must start at 1."""
    from headsteer.export.tensorrt import PRECISIONS, _check_batches, default_opt_batch  # importable without tensorrt

    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    opt_batch = opt_batch if opt_batch is not None else default_opt_batch(min_batch, max_batch_size)
    _check_batches(min_batch, opt_batch, max_batch_size)
    if min_batch != 1:
        raise InputError(
            f"min_batch is {min_batch}, but Triton's dynamic batcher sends batches from 1 to max_batch_size, "
            "which a plan whose profile starts above 1 rejects; use min_batch 1 (--min-batch 1)"
        )
    return opt_batch


# What a model folder written here holds: replacing one with --overwrite deletes nothing else.
_MODEL_DIR_ENTRIES = ("1", "config.pbtxt", "labels.txt", "steering.json")


def _check_replaceable(final: Path, overwrite: bool) -> None:
    """Refuse, before any export, a model folder path that writing must not replace: the new folder
    is swapped in and the old one deleted, so only an empty folder or one holding just what this
    function writes is replaced (with `overwrite`); a file, a dangling link, another version
    folder or anything else there would be lost."""
    if not (final.exists() or final.is_symlink()):
        return
    if not overwrite:
        raise InputError(f"{final} already exists (pass --overwrite to replace it)")
    if not final.is_dir():
        raise InputError(f"{final} exists and is not a folder; remove it or choose another --name")
    foreign = sorted(entry.name for entry in final.iterdir() if entry.name not in _MODEL_DIR_ENTRIES)
    if foreign:
        raise InputError(f"{final} holds {foreign[:8]} beside a model this command writes; --overwrite would delete "
                         "them: move them, or choose another --name or --out")


def write_triton_repo(
    bundle: Union[str, os.PathLike],
    out_dir: Union[str, os.PathLike],
    *,
    name: Optional[str] = None,
    engine: str = "onnx",
    attention: str = "masked",
    opset: int = DEFAULT_OPSET,
    max_batch_size: int = 32,
    precision: str = "fp32",
    min_batch: Optional[int] = None,
    opt_batch: Optional[int] = None,
    overwrite: bool = False,
) -> Path:
    """Write `out_dir/<name>/...` (see the module docstring); returns the model directory.

    engine "onnx" serves the float32 ONNX file with Triton's ONNX Runtime backend (precision must
    be "fp32"); "plan" builds a TensorRT engine (needs tensorrt and a CUDA device) in `precision`
    whose profile spans [min_batch, max_batch], with min_batch 1 (the default: the batcher sends any
    batch); min_batch and opt_batch apply to plans only."""
    if engine not in PLATFORMS:
        raise InputError(f"engine must be one of {sorted(PLATFORMS)}, got {engine!r}")
    # (a bool is an int to isinstance, and would be written as `max_batch_size: True`)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InputError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if engine == "onnx" and precision != "fp32":
        raise InputError(f"precision {precision!r} applies to TensorRT plans; the ONNX model is float32 (use engine 'plan' / --engine plan)")
    if engine == "onnx":  # (they shape a plan's profile only; min_batch 1, the default, changes nothing)
        given = [f"{what}={value!r}" for what, value in (("min_batch", min_batch), ("opt_batch", opt_batch))
                 if value is not None and not (what == "min_batch" and value == 1)]
        if given:
            raise InputError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to engine 'onnx' "
                             "(they shape a TensorRT plan's profile; use engine 'plan' / --engine plan)")
    if engine == "plan":
        min_batch = 1 if min_batch is None else min_batch
        opt_batch = _check_plan_args(precision, min_batch, opt_batch, max_batch_size)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory; --out names the model repository directory")
    if engine == "plan":  # fail before exporting anything
        from headsteer.export.tensorrt import _require_cuda, _tensorrt

        _tensorrt()
        _require_cuda("building a TensorRT engine")
    source = resolve_source(bundle)
    # Triton refuses to load a config with a dimension of 0 ("dimension must be integer >= 1, or
    # -1"), which is what a bundle without SAEs (steering width 0) or gates declares.
    empty = [f"{what} is {dims}" for what, dims, size in (
        ("steer_scale/steer_shift", f"[B, {source.model.steer_width}] (the bundle has no SAE)", source.model.steer_width),
        ("head_mask", f"[B, 0, {source.model.num_heads}] (the bundle has no gated block)", len(source.model.gate_blocks)),
    ) if size == 0]
    if empty:
        raise InputError(
            f"Triton Inference Server refuses a model config with a dimension of 0, and {'; '.join(empty)}; "
            "serve a bundle with gates and an SAE, or export this one with --format onnx / tensorrt"
        )
    # Triton reads label_filename one label per line (split at "\n", a "\r" kept in the label):
    # a name holding a line break would shift every later class's label.
    broken = [label for label in source.class_names if "\n" in label or "\r" in label]
    if broken:
        raise InputError(f"class names {broken[:8]} hold a line break, which labels.txt (one label per line, "
                         "the logits output's label_filename) cannot hold; rename those classes in the bundle")
    model_name = _model_name(name, source.name)
    final = out_dir / model_name
    _check_replaceable(final, overwrite)
    platform, file_name = PLATFORMS[engine]
    with staged_directory(final) as staging:
        version_dir = staging / "1"
        version_dir.mkdir()
        onnx_path = to_onnx(
            bundle, version_dir / "model.onnx", attention=attention, opset=opset, write_steering=False,
            steering_file="../steering.json", precision=precision if engine == "plan" else "fp32",
        )
        inputs, outputs = _io_from_onnx(onnx_path)
        if engine == "plan":
            from headsteer.export.tensorrt import build_engine

            build_engine(
                onnx_path, version_dir / file_name, precision=precision, min_batch=min_batch,
                opt_batch=opt_batch, max_batch=max_batch_size,
            )
            onnx_path.unlink()
            external_data_path(onnx_path).unlink(missing_ok=True)  # the weights of a model over 2 GiB
        (staging / "config.pbtxt").write_text(render_config(model_name, platform, max_batch_size, inputs, outputs, "logits"))
        (staging / "steering.json").write_text(json.dumps(steering_document(source)))
        (staging / "labels.txt").write_text("".join(f"{label}\n" for label in source.class_names))
    return final


__all__ = ["parse_pbtxt", "render_config", "write_triton_repo"]

"""Export a GatedViT (or a bundle) to ONNX under the export contract of DESIGN.md.

    to_onnx(bundle_or_model, "model.onnx", attention="masked" | "sparse", opset=18)

writes `model.onnx` (one self-contained file; above protobuf's 2 GiB cap, plus its weights in
`model.onnx.data`) and, beside it, `model.steering.json`: the per-class
`steer_scale`/`steer_shift` rows, so a client maps a class name to the two input vectors.

Graph inputs: `pixel_values` float32 [B, C, H, W] (normalized with the bundle's mean/std, which
are in the metadata), `steer_scale`, `steer_shift` float32 [B, S_total] (SAE widths concatenated
in site order; identity steering = ones and zeros). Outputs: `logits` float32 [B, classes],
`head_mask` bool [B, L_gated, H]. B is dynamic; every other dimension is static.

The exporter is torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`): on torch 2.x
it traces the data-dependent `NonZero` of the sparse variant and the symbolic batch cleanly,
where the TorchScript exporter fails on the LayerNorm shapes of a dynamic batch. The file is
written to a temporary name, checked with `onnx.checker.check_model(full_check=True)`, then
renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from headsteer.export._common import ExportError, atomic_path, require, write_text_atomic
from headsteer.export.onnx_model import ATTENTION_VARIANTS, COMPUTE_DTYPES, ExportableGatedViT
from headsteer.runtime.errors import InputError

ONNX_FORMAT = "headsteer-onnx"
ONNX_FORMAT_VERSION = 1
STEERING_FORMAT = "headsteer-steering"
STEERING_FORMAT_VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 18, 23
INPUT_NAMES = ("pixel_values", "steer_scale", "steer_shift")
OUTPUT_NAMES = ("logits", "head_mask")
META_PREFIX = "headsteer."
# Above this many bytes of weights, the weights go to a `<file>.data` sidecar (protobuf's 2 GiB cap).
EXTERNAL_DATA_BYTES = 1_800_000_000


@dataclass
class ExportSource:
    """A model plus what the export records about it (from a bundle, or given by the caller)."""

    model: torch.nn.Module
    class_names: list
    mean: tuple
    std: tuple
    steering: Optional[object]  # runtime.bundle.SteeringTable
    name: str
    weights_sha256: Optional[str] = None  # the bundle's model.safetensors checksum (None: a GatedViT)


def steering_path_for(onnx_path: Union[str, os.PathLike]) -> Path:
    """`dir/model.onnx` -> `dir/model.steering.json`."""
    path = Path(onnx_path)
    return path.with_name(path.stem + ".steering.json")


def external_data_path(onnx_path: Union[str, os.PathLike]) -> Path:
    """`dir/model.onnx` -> `dir/model.onnx.data`: the weights sidecar of a model over protobuf's cap."""
    path = Path(onnx_path)
    return path.with_name(path.name + ".data")


def resolve_source(bundle_or_model, *, class_names=None, steering=None, mean=None, std=None) -> ExportSource:
    """Load a bundle directory, or take a GatedViT with optional class names, table, normalization."""
    from headsteer.runtime.bundle import IMAGENET_MEAN, IMAGENET_STD, WEIGHTS_FILE, class_name_list, load_bundle
    from headsteer.runtime.gated_vit import GatedViT

    weights_sha256 = None
    if isinstance(bundle_or_model, (str, os.PathLike)):
        model, info = load_bundle(bundle_or_model)
        default_names, default_mean, default_std = info.class_names, info.mean, info.std
        steering = steering if steering is not None else info.steering
        name = Path(bundle_or_model).resolve().name
        weights_sha256 = info.config["files"][WEIGHTS_FILE]
    elif isinstance(bundle_or_model, GatedViT):
        model = bundle_or_model
        default_names = [str(i) for i in range(model.vit.num_classes)]
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
        name = model.timm_name or "gated_vit"
    else:
        raise InputError(f"to_onnx takes a bundle directory or a GatedViT, got {type(bundle_or_model).__name__}")
    num_classes = model.vit.num_classes
    names = class_name_list(class_names, num_classes) if class_names is not None else list(default_names)
    if steering is not None and steering.width != model.steer_width:
        raise InputError(f"steering table is {steering.width} wide; the model's steer_width is {model.steer_width}")
    return ExportSource(
        model=model,
        class_names=names,
        mean=tuple(mean or default_mean),
        std=tuple(std or default_std),
        steering=steering,
        name=name,
        weights_sha256=weights_sha256,
    )


def model_metadata(source: ExportSource, attention: str, steering_file: Optional[str]) -> dict:
    """The metadata_props written into the ONNX file (string values; lists/dicts as JSON)."""
    model = source.model
    in_chans = model.vit.patch_embed.proj.in_channels
    values = {
        "format": ONNX_FORMAT,
        "format_version": ONNX_FORMAT_VERSION,
        "attention": attention,
        "gating": "threshold",  # keep = gate logit > 0; a head budget is not part of the contract
        "class_names": list(source.class_names),
        "num_classes": len(source.class_names),
        "image_size": list(model.image_size),
        "in_chans": in_chans,
        "normalization": {"mean": [float(v) for v in source.mean], "std": [float(v) for v in source.std]},
        "num_heads": model.num_heads,
        "gated_blocks": list(model.gate_blocks),
        "sae_blocks": list(model.sae_blocks),
        "sae_widths": list(model.sae_widths),
        "sae_offsets": list(model.sae_offsets),
        "steer_width": model.steer_width,
        "steer_mode": model.steer_mode,
        "timm_name": model.timm_name or "",
        "steering_file": steering_file or "",
        # (prefixed, so read_metadata never decodes an all-digit digest as a number)
        "weights_sha256": f"sha256:{source.weights_sha256}" if source.weights_sha256 else "",
    }
    return {META_PREFIX + key: value if isinstance(value, str) else json.dumps(value) for key, value in values.items()}


def read_metadata(model_or_path) -> dict:
    """headsteer metadata of an ONNX file (or ModelProto / InferenceSession metadata map), decoded."""
    if isinstance(model_or_path, dict):
        props = model_or_path
    else:
        onnx = require("onnx", "reading ONNX metadata")
        proto = model_or_path
        if isinstance(model_or_path, (str, os.PathLike)):
            try:
                proto = onnx.load(str(model_or_path), load_external_data=False)
            except Exception as error:  # protobuf's DecodeError, a folder, an unreadable file
                raise InputError(f"{model_or_path} is not a readable ONNX file ({type(error).__name__}: {error})") from None
        props = {p.key: p.value for p in proto.metadata_props}
    out = {}
    for key, value in props.items():
        if not key.startswith(META_PREFIX):
            continue
        key = key[len(META_PREFIX) :]
        try:
            out[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            out[key] = value
    return out


def check_rows_replaceable(rows_path: Path, rows_text: str, overwrite: bool) -> None:
    """Refuse, unless `overwrite`, a steering rows file at `rows_path` holding other rows than
    `rows_text`: exports of one bundle into one folder (model.onnx, model.plan) share
    model.steering.json and may rewrite it, but another model's rows are not replaced silently."""
    if overwrite or not rows_path.exists():
        return
    try:
        same = json.loads(rows_path.read_text()) == json.loads(rows_text)
    except (OSError, ValueError):
        same = False
    if not same:
        raise InputError(f"{rows_path} already exists beside the model and holds other steering rows (another "
                         "model's?); pass overwrite=True / --overwrite to replace it")


def steering_document(source: ExportSource) -> dict:
    """The JSON beside the model: per-class steering rows plus how to build identity steering."""
    model = source.model
    table = source.steering
    doc = {
        "format": STEERING_FORMAT,
        "format_version": STEERING_FORMAT_VERSION,
        "steer_width": model.steer_width,
        "inputs": {"scale": "steer_scale", "shift": "steer_shift"},
        "identity": {"steer_scale": 1.0, "steer_shift": 0.0},
        "sae_sites": [
            {"block": block, "width": width, "offset": offset}
            for block, width, offset in zip(model.sae_blocks, model.sae_widths, model.sae_offsets)
        ],
        "classes": [],
        "rows": {},
        "info": [],
    }
    if table is not None:
        scale = table.scale.detach().float().cpu()
        shift = table.shift.detach().float().cpu()
        doc["classes"] = list(table.class_names)
        # float32 -> Python float (exact) -> JSON repr: a float32 round trip is exact.
        doc["rows"] = {
            name: {"steer_scale": scale[row].tolist(), "steer_shift": shift[row].tolist()}
            for row, name in enumerate(table.class_names)
        }
        doc["info"] = list(table.info)
    return doc


def load_steering(path: Union[str, os.PathLike]) -> dict:
    """Read a `.steering.json` back: {class name: (steer_scale [S], steer_shift [S]) float32 tensors}."""
    doc = json.loads(Path(path).read_text())
    if doc.get("format") != STEERING_FORMAT:
        raise InputError(f"{path} is not a {STEERING_FORMAT} file")
    return {
        name: (torch.tensor(row["steer_scale"], dtype=torch.float32), torch.tensor(row["steer_shift"], dtype=torch.float32))
        for name, row in doc["rows"].items()
    }


def _check_args(attention: str, opset: int) -> None:
    if attention not in ATTENTION_VARIANTS:
        raise InputError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"opset must be an integer in [{MIN_OPSET}, {MAX_OPSET}], got {opset!r}")


def _save_checked(onnx, proto, path: Path, attention: str, check: bool, sidecar: Optional[str] = None) -> None:
    """Save `proto` to `path` (weights to the file `sidecar` beside it when given), then check it."""
    if sidecar:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=sidecar)
    else:
        onnx.save_model(proto, str(path))
    if check:
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as error:
            raise ExportError(f"the exported {attention} graph fails onnx.checker: {error}") from error


def _save_with_sidecar(onnx, proto, out_path: Path, attention: str, check: bool) -> None:
    """Save a model over protobuf's cap as `out_path` plus `external_data_path(out_path)`.

    onnx writes (appends to) the sidecar beside the model under the name the model records, its
    final name; so both are written and checked in a fresh folder beside `out_path`, then moved
    onto temporary names and renamed into place, the sidecar first."""
    sidecar = external_data_path(out_path)
    with atomic_path(out_path, suffix=".onnx") as temp, atomic_path(sidecar, suffix=".data") as sidecar_temp:
        folder = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
        try:
            _save_checked(onnx, proto, folder / out_path.name, attention, check, sidecar=sidecar.name)
            os.replace(folder / sidecar.name, sidecar_temp)
            os.replace(folder / out_path.name, temp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def export_proto(
    model: torch.nn.Module, attention: str = "masked", opset: int = DEFAULT_OPSET, example_batch: int = 2, precision: str = "fp32"
):
    """Trace `model` (a GatedViT) into an onnx.ModelProto with a dynamic batch (no metadata).

    precision "fp16"/"bf16" stores the backbone in that type (inputs and logits stay float32, the
    SAEs and gates stay fp32): the graph for strongly typed TensorRT engines."""
    require("onnx", "ONNX export")
    require("onnxscript", "ONNX export (torch's dynamo exporter)")
    _check_args(attention, opset)
    was_training = model.training
    model.eval()
    try:
        if precision not in COMPUTE_DTYPES:
            raise InputError(f"precision must be one of {sorted(COMPUTE_DTYPES)}, got {precision!r}")
        wrapper = ExportableGatedViT(model, attention, COMPUTE_DTYPES[precision]).eval()
        parameter = next(model.parameters())
        in_chans = model.vit.patch_embed.proj.in_channels
        example = (
            torch.randn(example_batch, in_chans, *model.image_size, device=parameter.device),
            torch.ones(example_batch, model.steer_width, device=parameter.device),
            torch.zeros(example_batch, model.steer_width, device=parameter.device),
        )
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic = {name: {0: batch} for name in INPUT_NAMES}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapper,
                example,
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes=dynamic,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        proto = program.model_proto
    except InputError:
        raise
    except Exception as error:  # the exporter's own errors are long; keep the first line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"torch.onnx.export failed for the {attention} variant: {first}") from error
    finally:
        model.train(was_training)
    return proto


def to_onnx(
    bundle_or_model,
    out_path: Union[str, os.PathLike],
    attention: str = "masked",
    opset: int = DEFAULT_OPSET,
    *,
    class_names: Optional[Sequence[str]] = None,
    steering=None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    write_steering: bool = True,
    steering_file: Optional[str] = None,
    overwrite: bool = True,
    check: bool = True,
    precision: str = "fp32",
) -> Path:
    """Export a bundle directory (or a GatedViT) to `out_path`; returns the path written.

    attention: "masked" (all heads, pruned ones zeroed; static shapes; TensorRT-parseable) or
    "sparse" (only kept heads; data-dependent NonZero/gather/scatter). opset: ONNX opset
    (18..23). With write_steering, the per-class steering rows go to
    `steering_path_for(out_path)` (`<stem>.steering.json`; other rows already there are replaced
    only with `overwrite`, `check_rows_replaceable`). steering_file: the rows file's path relative
    to the model, recorded in the metadata when the caller writes the rows elsewhere (the Triton
    repository's `../steering.json`); without it, the file written beside the model, or "". precision: "fp32" (the contract's
    default), or "fp16"/"bf16" backbone weights for strongly typed TensorRT builds. Every file is written under a
    temporary name and renamed into place after `onnx.checker.check_model(full_check=True)`."""
    onnx = require("onnx", "ONNX export")
    _check_args(attention, opset)
    if steering_file is not None and write_steering:
        raise InputError("steering_file names rows written elsewhere; with write_steering=True they go beside the model")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise InputError(f"{out_path} is a directory; --out names the .onnx file to write")
    if not overwrite and out_path.exists():
        raise InputError(f"{out_path} already exists (pass overwrite=True / --overwrite to replace it)")
    source = resolve_source(bundle_or_model, class_names=class_names, steering=steering, mean=mean, std=std)
    rows_text = json.dumps(steering_document(source)) if write_steering else None
    if write_steering:
        check_rows_replaceable(steering_path_for(out_path), rows_text, overwrite)
    proto = export_proto(source.model, attention, opset, precision=precision)
    if steering_file is None and write_steering:
        steering_file = steering_path_for(out_path).name
    metadata = model_metadata(source, attention, steering_file)
    metadata[META_PREFIX + "precision"] = precision
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "headsteer"
    proto.doc_string = (
        f"headsteer GatedViT ({source.name}), {attention} attention. Inputs: pixel_values float32 [B,C,H,W] "
        "normalized with headsteer.normalization; steer_scale/steer_shift float32 [B,S_total] (identity: ones/zeros). "
        "Outputs: logits float32 [B,classes], head_mask bool [B,L_gated,H]."
    )
    weight_bytes = sum(init.ByteSize() for init in proto.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        _save_with_sidecar(onnx, proto, out_path, attention, check)
    else:
        with atomic_path(out_path, suffix=".onnx") as temp:
            _save_checked(onnx, proto, temp, attention, check)
    if write_steering:
        write_text_atomic(steering_path_for(out_path), rows_text)
    return out_path


__all__ = [
    "DEFAULT_OPSET",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "export_proto",
    "external_data_path",
    "load_steering",
    "read_metadata",
    "resolve_source",
    "steering_document",
    "steering_path_for",
    "to_onnx",
]

"""TensorRT engines from the exported ONNX graph, and the `tensorrt` backend of `Engine`.

    build_engine(bundle_or_onnx, "model.plan", precision="fp16", min_batch=1, opt_batch=8, max_batch=32)
    Engine.load(bundle, backend="tensorrt", device="cuda", engine_path="model.plan")

Building: the ONNX file is parsed with TensorRT's ONNX parser into an explicit-batch network
(TensorRT 10 networks are always explicit batch; on TensorRT 8 the EXPLICIT_BATCH flag is set),
one optimization profile spans [min_batch, opt_batch, max_batch] for the three inputs, and the
serialized engine is written under a temporary name and renamed into place. Built from a bundle,
the per-class steering rows are written beside it as `<stem>.steering.json`, as the ONNX export does.

A plan carries no metadata of its own, so `<plan>.json` beside it (`plan_description_path`)
describes it: the source ONNX file's headsteer metadata (class names, shapes, the bundle's weights
checksum), the precision, the profile, the TensorRT version, and the plan's own sha256, which
binds the description to these bytes. The runner checks it against the bundle before
deserializing: a plan of another bundle's weights, or one replaced without its description, is
refused. A plan without one (built by trtexec, or before descriptions existed) loads with its
tensor shapes checked only.

TF32 is off (TensorRT enables BuilderFlag.TF32 by default): fp32 layers, the SAEs and gates that
decide the head mask among them, run in full fp32 as the spec does, not with 10-bit-mantissa inputs.

Precision: "fp32" builds the contract's fp32 graph. "fp16"/"bf16" build from a graph whose
backbone weights are already fp16/bf16 while the SAEs and gates (which decide the head mask) stay
fp32, as a strongly typed network: the precision of every layer is the graph's, so TensorRT cannot
move a gate to fp16 and flip a near-threshold decision. Inputs and `logits` stay float32,
`head_mask` stays bool (TensorRT accepts BOOL network I/O).

A sparse-attention graph builds too (NonZero is supported since TensorRT 8.5; its data-dependent
shapes stay internal: both outputs have static shapes once the batch is set).

Needs the `tensorrt` extra and a CUDA device; without either, a MissingDependencyError says which.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional, Union

import torch

from headsteer.export._common import ExportError, MissingDependencyError, atomic_path, require, write_text_atomic
from headsteer.export.onnx_export import (DEFAULT_OPSET, INPUT_NAMES, ONNX_FORMAT, check_rows_replaceable,
                                          read_metadata, steering_path_for, to_onnx)
from headsteer.export.onnx_runner import check_against_bundle, check_io_dims, check_steer_shape
from headsteer.runtime.errors import BundleError, InputError

PRECISIONS = ("fp32", "fp16", "bf16")
PLAN_FORMAT = "headsteer-tensorrt-plan"
PLAN_FORMAT_VERSION = 1


def _tensorrt():
    return require("tensorrt", "the TensorRT backend")


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise MissingDependencyError(f"{what} needs a CUDA device, and torch sees none (TensorRT runs on NVIDIA GPUs only)")


def default_opt_batch(min_batch: int, max_batch: int) -> int:
    """The batch a profile is tuned for when none is given: 8, within [min_batch, max_batch]."""
    return max(min_batch, min(8, max_batch))


def plan_description_path(plan_path: Union[str, os.PathLike]) -> Path:
    """Where the description of `plan_path` lives: `model.plan` -> `model.plan.json`."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


def plan_description(onnx_metadata: dict, plan_bytes, precision: str, batches: tuple[int, int, int], tensorrt_version: str) -> dict:
    """The document `build_engine` writes to `plan_description_path(plan)` (see the module docstring)."""
    min_batch, opt_batch, max_batch = batches
    return {
        "format": PLAN_FORMAT,
        "format_version": PLAN_FORMAT_VERSION,
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "tensorrt_version": tensorrt_version,
        "precision": precision,
        "profile": {"min_batch": min_batch, "opt_batch": opt_batch, "max_batch": max_batch},
        "onnx": onnx_metadata,
    }


def check_plan_description(plan_path: Union[str, os.PathLike], plan_bytes, info) -> Optional[dict]:
    """Raise BundleError when the description beside `plan_path` does not describe these plan
    bytes or this bundle (`info`); returns the description, or None when the plan has none."""
    plan_path = Path(plan_path)
    path = plan_description_path(plan_path)
    if not path.exists():
        return None
    remedy = f"rebuild the plan (`headsteer export BUNDLE --format tensorrt --out {plan_path.name}`) or delete {path.name}"
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path} beside the plan is not a readable plan description ({type(error).__name__}: {error}); {remedy}") from None
    if not isinstance(document, dict) or document.get("format") != PLAN_FORMAT or not isinstance(document.get("onnx"), dict):
        raise BundleError(f"{path} beside the plan is not a headsteer plan description; {remedy}")
    if document.get("plan_sha256") != hashlib.sha256(plan_bytes).hexdigest():
        raise BundleError(f"{path} describes another plan than {plan_path} (the plan's sha256 differs: it was replaced "
                          f"without its description); {remedy}")
    check_against_bundle(document["onnx"], info, plan_path)
    return document


def _check_batches(min_batch: int, opt_batch: int, max_batch: int) -> None:
    for name, value in (("min_batch", min_batch), ("opt_batch", opt_batch), ("max_batch", max_batch)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    if not min_batch <= opt_batch <= max_batch:
        raise InputError(f"batch sizes must satisfy min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")


def _network_flags(trt, strongly_typed: bool) -> int:
    flags = 0
    major = int(trt.__version__.split(".")[0])
    creation = trt.NetworkDefinitionCreationFlag
    if major < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed:
        if not hasattr(creation, "STRONGLY_TYPED"):
            raise ExportError(f"TensorRT {trt.__version__} has no strongly typed networks; fp16/bf16 builds need TensorRT >= 9.1")
        flags |= 1 << int(creation.STRONGLY_TYPED)
    return flags


def _rows_of(onnx_path: Path, metadata: dict) -> Optional[Path]:
    """The steering rows file of an exported ONNX file, or None: the file its metadata names
    (relative to it; `<stem>.steering.json`, or the Triton repository's `../steering.json`), else
    `<stem>.steering.json` when the pair was renamed together. A file exported without rows
    (`write_steering=False`) or by another exporter has none, whatever lies beside it."""
    recorded = metadata.get("steering_file")
    if not recorded or not isinstance(recorded, str):
        return None
    for candidate in (onnx_path.parent / recorded, steering_path_for(onnx_path)):
        if candidate.is_file():
            return candidate
    return None


def build_engine(
    source,
    plan_path: Union[str, os.PathLike],
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: Optional[int] = None,
    max_batch: int = 32,
    attention: str = "masked",
    opset: int = DEFAULT_OPSET,
    workspace_gib: float = 4.0,
    overwrite: bool = True,
) -> Path:
    """Build and serialize a TensorRT engine; returns `plan_path`.

    source: a bundle directory (exported to ONNX first, in `precision`; its steering rows are then
    written to `steering_path_for(plan_path)` once the plan is in place), or an `.onnx` file from
    `to_onnx` (then `precision` must match the file's, which its metadata records; the rows
    its metadata names (`_rows_of`) are copied beside the plan, and without them none is left there).
    The plan's description goes to `plan_description_path(plan_path)` (from an ONNX file without
    headsteer metadata, none is written and a stale one there is removed).
    opt_batch defaults to `default_opt_batch(min_batch, max_batch)` (8 within the profile)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if opt_batch is None:
        opt_batch = default_opt_batch(min_batch, max_batch)
    _check_batches(min_batch, opt_batch, max_batch)
    if isinstance(workspace_gib, bool) or not isinstance(workspace_gib, numbers.Real) or not 0 < workspace_gib < float("inf"):
        raise InputError(f"workspace_gib must be a positive number (GiB of TensorRT workspace), got {workspace_gib!r}")
    plan_path = Path(plan_path)
    if plan_path.is_dir():
        raise InputError(f"{plan_path} is a directory; --out names the .plan file to write")
    if not overwrite and plan_path.exists():
        raise InputError(f"{plan_path} already exists (pass --overwrite to replace it)")
    # The plan's steering rows (a client maps class names with them) go beside it. Rows already
    # there are rewritten when they are the same (`export --format onnx` then `--format tensorrt`
    # into one folder share model.steering.json) and otherwise, another model's, only with
    # `overwrite` (`check_rows_replaceable`): kept, they would map this plan's classes wrongly.
    steering_out = steering_path_for(plan_path)
    trt = _tensorrt()
    _require_cuda("building a TensorRT engine")

    workdir = Path(tempfile.mkdtemp(prefix="headsteer-trt-"))
    try:
        source = Path(source)
        if source.is_dir():
            onnx_path = to_onnx(source, workdir / "model.onnx", attention=attention, opset=opset, precision=precision)
            onnx_metadata = read_metadata(onnx_path)
            steering = steering_path_for(onnx_path)
        elif source.is_file():
            onnx_path = source
            onnx_metadata = read_metadata(onnx_path)
            steering = _rows_of(onnx_path, onnx_metadata)
            recorded = onnx_metadata.get("precision", "fp32")
            if recorded != precision:
                raise InputError(f"{onnx_path} holds a {recorded} graph; export it with precision={precision!r} or build with precision={recorded!r}")
        else:
            raise InputError(f"{source} is neither a bundle directory nor an ONNX file")
        rows_text = steering.read_text() if steering is not None else None
        # (before the build; with no rows to write, any rows file there is another model's)
        check_rows_replaceable(steering_out, rows_text if rows_text is not None else "null", overwrite)

        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(_network_flags(trt, strongly_typed=precision != "fp32"))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; the gates must decide in fp32
        profile = builder.create_optimization_profile()
        for index in range(network.num_inputs):
            tensor = network.get_input(index)
            dims = list(tensor.shape)[1:]
            profile.set_shape(tensor.name, [min_batch] + dims, [opt_batch] + dims, [max_batch] + dims)
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ExportError("TensorRT failed to build the engine (see the TensorRT log above)")
        with atomic_path(plan_path, suffix=".plan") as temp:
            with open(temp, "wb") as handle:
                handle.write(memoryview(serialized))
        # After the plan: a description left from an older plan no longer matches its sha256.
        description_path = plan_description_path(plan_path)
        if onnx_metadata.get("format") == ONNX_FORMAT:
            description = plan_description(onnx_metadata, memoryview(serialized), precision,
                                           (min_batch, opt_batch, max_batch), trt.__version__)
            write_text_atomic(description_path, json.dumps(description, indent=1) + "\n")
        else:  # (an ONNX file of another exporter: nothing to describe the plan with)
            description_path.unlink(missing_ok=True)
        if rows_text is not None:  # only beside a plan that was written
            write_text_atomic(steering_out, rows_text)
        else:  # (an ONNX file exported without steering rows: none beside its plan either)
            steering_out.unlink(missing_ok=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return plan_path


def _torch_dtype(trt, dtype):
    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.int32: torch.int32,
        trt.int8: torch.int8,
        trt.bool: torch.bool,
    }
    for name, torch_dtype in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = torch_dtype
    if dtype not in table:
        raise BundleError(f"the engine uses I/O type {dtype}, which headsteer cannot bind")
    return table[dtype]


TENSOR_ALIGNMENT = 256  # bytes; IExecutionContext::setTensorAddress: "The pointer must have at least 256-byte alignment."


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or a copy of it (a fresh allocation) when it is a view starting off TensorRT's alignment."""
    return tensor if tensor.data_ptr() % TENSOR_ALIGNMENT == 0 else tensor.clone()


def _bind(context, name: str, tensor: torch.Tensor, batches: tuple[int, int], is_input: bool) -> None:
    """Give TensorRT one tensor's shape (inputs) and address. TensorRT answers False, not an
    exception, for a shape outside the optimization profile; that becomes an InputError here,
    before anything is enqueued."""
    shape = list(tensor.shape)
    allowed = f"batch {batches[0]} to {batches[1]}, the other dims as built"
    if is_input and not context.set_input_shape(name, tuple(shape)):
        raise InputError(f"{name} of shape {shape} is outside this engine's optimization profile ({allowed}); split the batch or rebuild")
    if not context.set_tensor_address(name, tensor.data_ptr()):
        raise InputError(f"TensorRT refused the address of {name} of shape {shape} (the profile allows {allowed})")


class TensorRTRunner:
    """`Engine` runner for backend "tensorrt": deserializes a plan and runs it on torch CUDA tensors.

    engine_path: a `.plan` from `headsteer export --format tensorrt`. Without it, the bundle is
    exported and built into a temporary directory (slow: minutes for large models) with
    `precision`, `min_batch`/`opt_batch`/`max_batch`. Calls are serialized by a lock (one
    execution context) and run on a stream of the runner's own, ordered after the caller's
    current stream and before its later work (enqueueV3 on the legacy default stream would add
    synchronizations)."""

    def __init__(
        self,
        info,
        device: Union[str, torch.device] = "cuda",
        engine_path: Optional[Union[str, os.PathLike]] = None,
        precision: str = "fp32",
        min_batch: int = 1,
        opt_batch: Optional[int] = None,
        max_batch: int = 32,
        attention: str = "masked",
    ):
        trt = _tensorrt()
        device = torch.device(device)
        if device.type != "cuda":
            raise InputError(f"the tensorrt backend runs on a CUDA device; got device={str(device)!r} (pass device='cuda')")
        _require_cuda("the tensorrt backend")
        if device.index is None:  # the engine lives on the GPU current now, whichever thread calls later
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.steer_width = int(info.config["steer_width"])
        workdir = None
        try:  # (a build that fails leaves no temporary folder behind either)
            if engine_path is None:
                workdir = Path(tempfile.mkdtemp(prefix="headsteer-trt-"))
                with torch.cuda.device(device):  # TensorRT builds for the current GPU: the one it will run on
                    engine_path = build_engine(
                        info.path, workdir / "model.plan", precision=precision,
                        min_batch=min_batch, opt_batch=opt_batch, max_batch=max_batch, attention=attention,
                    )
            engine_path = Path(engine_path)
            if not engine_path.is_file():
                raise InputError(f"engine_path {engine_path} does not exist (build one with `headsteer export BUNDLE --format tensorrt --out FILE.plan`)")
            self._logger = trt.Logger(trt.Logger.WARNING)
            self._runtime = trt.Runtime(self._logger)
            plan_bytes = engine_path.read_bytes()
            self.description = check_plan_description(engine_path, plan_bytes, info)  # before deserializing
            with torch.cuda.device(device):
                self.engine = self._runtime.deserialize_cuda_engine(plan_bytes)
                if self.engine is None:
                    raise BundleError(f"{engine_path} is not a TensorRT engine for this TensorRT version/GPU (rebuild it here)")
                self.context = self.engine.create_execution_context()
                if self.context is None:  # (nullptr: e.g. no device memory left for the activations)
                    raise ExportError(f"TensorRT could not create an execution context for {engine_path} on {device} (see the TensorRT log; is the GPU out of memory?)")
                self._stream = torch.cuda.Stream(device=device)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        self.engine_path = engine_path
        self._lock = threading.Lock()
        self.inputs, self.outputs = {}, {}
        for index in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(index)
            dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(name))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs[name] = dtype
            else:
                self.outputs[name] = dtype
        if set(self.inputs) != set(INPUT_NAMES) or not {"logits", "head_mask"} <= set(self.outputs):
            raise BundleError(f"{engine_path} has inputs {sorted(self.inputs)} and outputs {sorted(self.outputs)}; not a headsteer engine")
        shape_min, _, shape_max = self.engine.get_tensor_profile_shape("pixel_values", 0)
        self.min_batch, self.max_batch = int(shape_min[0]), int(shape_max[0])
        dims = {name: list(self.engine.get_tensor_shape(name))[1:] for name in (*self.inputs, *self.outputs)}
        check_io_dims(dims, info, engine_path)

    def __call__(self, pixel_values: torch.Tensor, steer_scale: Optional[torch.Tensor] = None, steer_shift: Optional[torch.Tensor] = None):
        batch = pixel_values.shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise InputError(
                f"batch {batch} is outside this engine's optimization profile [{self.min_batch}, {self.max_batch}]; "
                "rebuild with --min-batch/--max-batch or split the batch"
            )
        for name, vector in (("steer_scale", steer_scale), ("steer_shift", steer_shift)):
            # (each alone fits the profile: TensorRT would only fail at execution, with no reason given)
            if vector is not None:
                check_steer_shape(name, vector, batch, self.steer_width)
        to = dict(device=self.device)
        feeds = {
            "pixel_values": pixel_values.to(dtype=self.inputs["pixel_values"], **to).contiguous(),
            "steer_scale": (torch.ones(batch, self.steer_width) if steer_scale is None else steer_scale)
            .to(dtype=self.inputs["steer_scale"], **to).contiguous(),
            "steer_shift": (torch.zeros(batch, self.steer_width) if steer_shift is None else steer_shift)
            .to(dtype=self.inputs["steer_shift"], **to).contiguous(),
        }
        feeds = {name: _aligned(tensor) for name, tensor in feeds.items()}
        batches = (self.min_batch, self.max_batch)
        with self._lock, torch.cuda.device(self.device):
            for name, tensor in feeds.items():
                _bind(self.context, name, tensor, batches, is_input=True)
            results = {}
            for name, dtype in self.outputs.items():
                shape = tuple(self.context.get_tensor_shape(name))
                if any(dim < 0 for dim in shape):
                    raise BundleError(f"output {name} has an unresolved shape {shape}")
                results[name] = torch.empty(shape, dtype=dtype, **to)  # on the caller's stream
                _bind(self.context, name, results[name], batches, is_input=False)
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)  # the inputs were copied (and outputs allocated) there
            if not self.context.execute_async_v3(self._stream.cuda_stream):
                raise ExportError("TensorRT execution failed (see the TensorRT log)")
            caller.wait_stream(self._stream)  # the caller's later work sees the results
            self._stream.synchronize()  # the inputs, allocated on the caller's stream, are freed on return
        return results["logits"].float().cpu(), results["head_mask"].bool().cpu()


__all__ = ["PRECISIONS", "TensorRTRunner", "build_engine", "check_plan_description", "plan_description", "plan_description_path"]

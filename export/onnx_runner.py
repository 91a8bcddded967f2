"""The `onnxruntime` backend of `Engine`, and a session builder for the bench harness.

    Engine.load(bundle, backend="onnxruntime")                       # exports on the fly
    Engine.load(bundle, backend="onnxruntime", onnx_path="m.onnx")   # runs a file from `headsteer export`
    Engine.load(bundle, backend="onnxruntime", device="cuda", providers=[...])

Without `onnx_path` the bundle is exported (attention variant `attention`, default "masked") into a
fresh temporary directory, the ONNX Runtime session is built from it, and the directory is
deleted at once: a session holds its graph in memory, so nothing is left on disk and nothing is
ever written into the bundle. Pass `cache_dir=` to keep the export instead, named by a hash of the
bundle's headsteer.json (its file checksums included), the variant, the opset and the torch version,
and reused on the next load.

ONNX Runtime comes as `onnxruntime` (CPU; extra `onnx`) or `onnxruntime-gpu` (extra `gpu`), one
import name; install exactly one. Providers default to CUDA first (then CPU) when the device is
CUDA, and to the CPU provider on a CPU device.

Thread spinning: by default ONNX Runtime's intra-op threads keep spinning (busy-waiting) for a while
after each run, which gives back-to-back ORT runs the lowest latency but takes the cores from any
other thread pool of the process (torch's, say) that runs next. `allow_spinning=False` (an option
of `build_session`, `make_ort_callable` and `OnnxRunner`, hence `Engine.load(...,
allow_spinning=False)`) sets `session.intra_op.allow_spinning` and `session.inter_op.allow_spinning`
to "0": pass it in a process that runs torch (or other threaded work) between ORT calls. The
benchmarks (`headsteer bench`, `headsteer.export.bench_ort`) always do, since they time torch next.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from headsteer.export._common import MissingDependencyError, require
from headsteer.export.onnx_export import DEFAULT_OPSET, INPUT_NAMES, ONNX_FORMAT, read_metadata, to_onnx
from headsteer.runtime.bundle import WEIGHTS_FILE
from headsteer.runtime.errors import BundleError, InputError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def _onnxruntime():
    return require("onnxruntime", "the onnxruntime backend")


def default_providers(device: torch.device) -> list:
    """CUDA first (then CPU) for a CUDA device; CPU alone otherwise."""
    ort = _onnxruntime()
    available = ort.get_available_providers()
    if device.type == "cuda":
        if CUDA_PROVIDER not in available:
            raise MissingDependencyError(
                f"device {device} asks for ONNX Runtime's {CUDA_PROVIDER}, but this onnxruntime build offers only "
                f"{available}; install the GPU build: pip uninstall onnxruntime && pip install 'headsteer[gpu]'"
            )
        return [(CUDA_PROVIDER, {"device_id": device.index or 0}), CPU_PROVIDER]
    return [CPU_PROVIDER]


def _check_providers(providers: Sequence) -> list:
    ort = _onnxruntime()
    available = ort.get_available_providers()
    checked = []
    for provider in providers:
        name = provider[0] if isinstance(provider, (tuple, list)) else provider
        if not isinstance(name, str) or name not in available:
            raise InputError(f"ONNX Runtime provider {name!r} is not available in this build; available: {available}")
        checked.append(tuple(provider) if isinstance(provider, list) else provider)
    if not checked:
        raise InputError("providers must name at least one ONNX Runtime execution provider")
    return checked


# Session config entries that stop ORT's thread pools from busy-waiting after a run.
NO_SPINNING = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def build_session(onnx_path: Union[str, os.PathLike], providers: Sequence, intra_op_num_threads: Optional[int] = None,
                  allow_spinning: bool = True):
    """An ORT session over `onnx_path`; `allow_spinning=False` applies `NO_SPINNING` (module docstring)."""
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_num_threads:
        options.intra_op_num_threads = int(intra_op_num_threads)
    if not allow_spinning:
        for key, value in NO_SPINNING.items():
            options.add_session_config_entry(key, value)
    options.log_severity_level = 3  # errors only: ORT warns about unused initializers etc.
    try:
        return ort.InferenceSession(str(onnx_path), sess_options=options, providers=list(providers))
    except Exception as error:
        if "Load model from" in str(error):  # ORT could not load the file: corrupt, empty, not ONNX, too new
            raise InputError(f"ONNX Runtime cannot load {onnx_path} as a model: {str(error).splitlines()[0]}") from None
        # A 16-bit file may hold ops the providers have no kernel for in that type (ORT's CPU
        # provider has no bf16 Expand): say which file and precision, not only ORT's node name.
        precision = read_metadata(onnx_path).get("precision", "fp32") if "NOT_IMPLEMENTED" in str(error) else "fp32"
        if precision == "fp32":
            raise
        raise InputError(f"ONNX Runtime ({', '.join(map(str, providers))}) cannot run {onnx_path}, exported with "
                         f"precision {precision}: {str(error).splitlines()[0]}; export with --precision fp32 (or fp16) "
                         "for ONNX Runtime (bf16 files are meant for TensorRT)") from None


def check_steer_shape(name: str, vector: torch.Tensor, batch: int, steer_width: int) -> None:
    """Raise InputError unless steering vector `name` is [batch, steer_width] (the ONNX Runtime and
    TensorRT runners' check of a direct call; `Engine` checks its own)."""
    if tuple(vector.shape) != (batch, steer_width):
        raise InputError(f"{name} must be [B, S_total] = {[batch, steer_width]}, got {list(vector.shape)}")


class OrtCallable:
    """An ONNX Runtime session with the runner signature:
    `(pixel_values [B,C,H,W], steer_scale [B,S] | None, steer_shift [B,S] | None) -> (logits, head_mask)`,
    inputs as torch tensors, outputs as tensors (float32, bool). CPU inputs, or any inputs to a
    session whose first provider is not CUDA, are copied to host and the outputs come back on the
    CPU. CUDA inputs to a session whose first provider is CUDA on that GPU are bound in place
    (ORT I/O binding on device memory, no host round trip) and the outputs come back on that GPU
    (untested here: no GPU; see `device_binding`)."""

    def __init__(self, session, steer_width: int):
        self.session = session
        self.steer_width = int(steer_width)
        self.metadata = read_metadata(dict(session.get_modelmeta().custom_metadata_map))
        self.providers = session.get_providers()
        # Declared input shapes: ints are static dims, str/None symbolic ones (the batch).
        self.input_shapes = {value.name: list(value.shape) for value in session.get_inputs()}
        self.output_shapes = {value.name: list(value.shape) for value in session.get_outputs()}
        self.cuda_device_id = self._cuda_device_id()
        # (I/O binding allocates the outputs: their dims but the batch must be static.)
        self._static_outputs = all(all(isinstance(dim, int) for dim in shape[1:]) for shape in self.output_shapes.values())

    def _cuda_device_id(self) -> Optional[int]:
        """The GPU of the session's CUDA provider when it comes first, else None."""
        if not self.providers or self.providers[0] != CUDA_PROVIDER:
            return None
        options = self.session.get_provider_options().get(CUDA_PROVIDER, {})
        return int(options.get("device_id", 0))

    def device_binding(self, pixel_values: torch.Tensor) -> bool:
        """Whether a call with these pixels runs on device memory (I/O binding): CUDA pixels on
        the GPU of a session whose first provider is CUDA, and outputs of static shape but the batch."""
        if self.cuda_device_id is None or pixel_values.device.type != "cuda":
            return False
        if (pixel_values.device.index or 0) != self.cuda_device_id:
            return False
        return self._static_outputs

    def run_bound(self, feeds: dict, device: torch.device) -> tuple:
        """Run with inputs and outputs bound in place in `device` memory (ORT I/O binding):
        `feeds` maps input names to torch tensors on `device`; returns (logits, head_mask) as torch
        tensors there. Works for "cpu" too (what the tests check without a GPU)."""
        device_type, device_id = device.type, device.index or 0
        inputs = {name: tensor.to(device, torch.float32).contiguous() for name, tensor in feeds.items()}
        batch = inputs["pixel_values"].shape[0]
        outputs = {
            "logits": torch.empty(batch, *self.output_shapes["logits"][1:], dtype=torch.float32, device=device),
            "head_mask": torch.empty(batch, *self.output_shapes["head_mask"][1:], dtype=torch.bool, device=device),
        }
        binding = self.session.io_binding()
        for name, tensor in inputs.items():
            binding.bind_input(name, device_type, device_id, np.float32, tuple(tensor.shape), tensor.data_ptr())
        for name, tensor in outputs.items():
            element = np.float32 if tensor.dtype == torch.float32 else np.bool_
            binding.bind_output(name, device_type, device_id, element, tuple(tensor.shape), tensor.data_ptr())
        if device_type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # ORT runs on its own stream: inputs must be ready
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the outputs are on ORT's stream: done before torch reads them
        return outputs["logits"], outputs["head_mask"]

    @staticmethod
    def _host(tensor: torch.Tensor) -> np.ndarray:
        return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())

    def _check_input(self, name: str, tensor) -> None:
        """Raise InputError unless `tensor` is a finite floating tensor of the rank and static dims
        the graph declares, so ONNX Runtime never sees (or silently casts) a malformed input."""
        declared = self.input_shapes.get(name)
        if declared is None:
            return

        def expected() -> str:  # (formatted only for an error: this runs on every call)
            return "[" + ", ".join(str(dim) if isinstance(dim, int) else (dim or "B") for dim in declared) + "]"

        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"{name} must be a float torch tensor {expected()}, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise InputError(f"{name} must be floating point, got {tensor.dtype}")
        shape = list(tensor.shape)
        if len(shape) != len(declared) or any(isinstance(want, int) and got != want for got, want in zip(shape, declared)):
            raise InputError(f"{name} must be {expected()}, got shape {shape}")
        # (NaN/inf would run: NaN logits, heads pruned; checked as fed, in float32, where a float64
        # value past float32's range becomes inf)
        if not bool(torch.isfinite(tensor if tensor.dtype == torch.float32 else tensor.float()).all()):
            raise InputError(f"{name} holds NaN or infinite values")

    def __call__(self, pixel_values: torch.Tensor, steer_scale: Optional[torch.Tensor] = None, steer_shift: Optional[torch.Tensor] = None):
        self._check_input("pixel_values", pixel_values)
        batch = pixel_values.shape[0]
        feeds = {"pixel_values": pixel_values}
        for name, vector, fill in (("steer_scale", steer_scale, 1.0), ("steer_shift", steer_shift, 0.0)):
            if vector is None:
                vector = torch.full((batch, self.steer_width), fill, device=pixel_values.device)
            else:
                self._check_input(name, vector)
                check_steer_shape(name, vector, batch, self.steer_width)
            feeds[name] = vector
        if self.device_binding(pixel_values):
            return self.run_bound(feeds, pixel_values.device)
        logits, head_mask = self.session.run(["logits", "head_mask"], {name: self._host(t) for name, t in feeds.items()})
        return torch.from_numpy(logits).float(), torch.from_numpy(np.asarray(head_mask, dtype=bool))


def make_ort_callable(
    model,
    attention: str = "masked",
    providers: Optional[Sequence] = None,
    device: Union[str, torch.device] = "cpu",
    opset: int = DEFAULT_OPSET,
    intra_op_num_threads: Optional[int] = None,
    allow_spinning: bool = True,
) -> OrtCallable:
    """Export a GatedViT in memory to ONNX and return an `OrtCallable` over it (for the bench harness).

    Batch is dynamic, so one callable serves every batch size; gating is the threshold rule
    (`gate logit > 0`): a head budget is not part of the ONNX contract. Call it as
    `fn(pixel_values, steer_scale=None, steer_shift=None) -> (logits, head_mask)`. `allow_spinning`:
    see the module docstring (the bench harness passes False)."""
    device = torch.device(device)
    providers = _check_providers(providers) if providers is not None else default_providers(device)
    workdir = Path(tempfile.mkdtemp(prefix="headsteer-ort-"))
    try:
        path = to_onnx(model, workdir / "model.onnx", attention=attention, opset=opset, write_steering=False)
        session = build_session(path, providers, intra_op_num_threads, allow_spinning)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return OrtCallable(session, model.steer_width)


def _cache_key(info, attention: str, opset: int) -> str:
    from headsteer.export.onnx_export import ONNX_FORMAT_VERSION

    # The whole headsteer.json: its file checksums cover the weights, the rest settings that are no
    # tensor but shape the graph or its metadata (steer_mode, sae_k, class names, normalization).
    blob = json.dumps(
        dict(config=info.config, attention=attention, opset=opset, torch=torch.__version__, fmt=ONNX_FORMAT_VERSION),
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _require_same(found: dict, expected: dict, path) -> None:
    """Raise BundleError naming the first key whose value in `found` differs from `expected`."""
    for key, value in expected.items():
        if found.get(key) != value:
            raise BundleError(f"{path} was exported from another model: its {key} is {found.get(key)!r}, the bundle's is {value!r}")


def check_against_bundle(metadata: dict, info, path) -> None:
    """Raise BundleError when an ONNX file's headsteer metadata does not describe this bundle."""
    if metadata.get("format") != ONNX_FORMAT:
        raise BundleError(f"{path} carries no headsteer metadata; export it with `headsteer export --format onnx`")
    config = info.config
    expected = {
        "class_names": list(info.class_names),
        "steer_width": int(config["steer_width"]),
        "image_size": list(config["image_size"]),
        "gated_blocks": list(config.get("gated_blocks", [])),
    }
    _require_same(metadata, expected, path)
    # Same shapes, other weights (another training run of one recipe): the file records the
    # checksum of the bundle's weights it was exported from (files of a GatedViT, or of older
    # versions, record none).
    recorded = metadata.get("weights_sha256")
    weights = config.get("files", {}).get(WEIGHTS_FILE)
    if recorded and weights:
        _require_same(metadata, {"weights_sha256": f"sha256:{weights}"}, path)


def check_io_dims(dims: dict, info, path) -> None:
    """Raise BundleError when a model's I/O dims (batch left out, by tensor name) are not this
    bundle's: a TensorRT plan carries no metadata, so its tensor shapes are all there is to check.
    A tensor with a dim the engine leaves unknown (-1) is not compared (its run-time shape is)."""
    config = info.config
    steer = [int(config["steer_width"])]
    expected = {
        "pixel_values": [int(config.get("in_chans", 3)), *config["image_size"]],
        "steer_scale": steer,
        "steer_shift": steer,
        "logits": [len(info.class_names)],
        "head_mask": [len(config.get("gated_blocks", [])), int(config["num_heads"])],
    }
    key = "{} shape without the batch".format
    known = [name for name in expected if name in dims and all(int(d) >= 0 for d in dims[name])]
    _require_same({key(name): [int(d) for d in dims[name]] for name in known},
                  {key(name): expected[name] for name in known}, path)


class OnnxRunner(OrtCallable):
    """`Engine` runner for backend "onnxruntime"; see the module docstring for the options.
    `allow_spinning` keeps ORT's default (True: its threads busy-wait after each run, the lowest
    latency for back-to-back requests); pass False in a service that also runs torch or other
    threaded work between requests, so ORT's idle threads do not take its cores."""

    def __init__(
        self,
        info,
        device: Union[str, torch.device] = "cpu",
        onnx_path: Optional[Union[str, os.PathLike]] = None,
        providers: Optional[Sequence] = None,
        attention: str = "masked",
        opset: int = DEFAULT_OPSET,
        cache_dir: Optional[Union[str, os.PathLike]] = None,
        intra_op_num_threads: Optional[int] = None,
        allow_spinning: bool = True,
    ):
        device = torch.device(device)
        _onnxruntime()
        providers = _check_providers(providers) if providers is not None else default_providers(device)
        self.device = device
        self.attention = attention
        if onnx_path is not None:
            onnx_path = Path(onnx_path)
            if not onnx_path.is_file():
                raise InputError(f"onnx_path {onnx_path} does not exist (export one with `headsteer export BUNDLE --format onnx --out FILE`)")
            session = build_session(onnx_path, providers, intra_op_num_threads, allow_spinning)
            self.onnx_path: Optional[Path] = onnx_path
        elif cache_dir is not None:
            cache_dir = Path(cache_dir)
            path = cache_dir / f"{_cache_key(info, attention, opset)}-{attention}.onnx"
            if not path.is_file():
                to_onnx(info.path, path, attention=attention, opset=opset, write_steering=False)
            session = build_session(path, providers, intra_op_num_threads, allow_spinning)
            self.onnx_path = path
        else:
            workdir = Path(tempfile.mkdtemp(prefix="headsteer-ort-"))
            try:
                path = to_onnx(info.path, workdir / "model.onnx", attention=attention, opset=opset, write_steering=False)
                session = build_session(path, providers, intra_op_num_threads, allow_spinning)
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            self.onnx_path = None
        super().__init__(session, int(info.config["steer_width"]))
        check_against_bundle(self.metadata, info, onnx_path or "the exported model")
        # The metadata leaves out e.g. the head count and channels: the declared I/O shapes hold them.
        declared = {**self.input_shapes, **self.output_shapes}
        check_io_dims({name: [dim if isinstance(dim, int) else -1 for dim in shape[1:]] for name, shape in declared.items()},
                      info, onnx_path or "the exported model")
        self.attention = self.metadata.get("attention", attention)
        missing = set(INPUT_NAMES) - {i.name for i in session.get_inputs()}
        if missing:
            raise BundleError(f"the ONNX model lacks the inputs {sorted(missing)}")


__all__ = ["NO_SPINNING", "OnnxRunner", "OrtCallable", "build_session", "check_against_bundle", "check_io_dims", "check_steer_shape", "default_providers", "make_ort_callable"]

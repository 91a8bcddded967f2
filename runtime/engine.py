"""Engine: the object a service embeds. Loads a bundle once, validates every request before any
work, preprocesses raw images with the bundle's own settings, maps class names to steering rows,
and runs the chosen backend. Safe to call from several threads at once: a request touches no
shared mutable state (weights are read-only, caches are built at load).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from headsteer.runtime.bundle import BundleInfo, load_bundle
from headsteer.runtime.cuda_graph import CudaGraphForward
from headsteer.runtime.errors import InputError
from headsteer.runtime.gated_vit import GatedViT, HeadUsage, check_budget

TORCH_BACKENDS = ("reference", "compact", "triton")
# Backends that run an exported artifact; each maps to "module:function" building a runner
# `runner(pixel_values, steer_scale, steer_shift) -> (logits, head_mask)` from (info, **options).
EXTERNAL_BACKENDS = {
    "onnxruntime": "headsteer.export.onnx_runner:OnnxRunner",
    "tensorrt": "headsteer.export.tensorrt:TensorRTRunner",
}
# Every backend name Engine.load takes ("auto" picks one of TORCH_BACKENDS); commands list these in --help.
BACKEND_NAMES = ("auto", *TORCH_BACKENDS, *EXTERNAL_BACKENDS)

SteerTarget = Optional[Union[str, int]]


@dataclass
class Prediction(HeadUsage):
    """One batch's results: logits [B, C], labels [B], class names, head mask [B, L_gated, H]."""

    logits: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    head_mask: torch.Tensor


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# PIL modes with more than 8 bits per channel (16-bit PNGs, 32-bit int or float TIFFs): PIL's
# convert("RGB"/"L") clips them to 0..255 instead of scaling, so they would reach the model as
# near-white (16-bit) or near-black (float in [0, 1]) pictures. Such images are refused.
WIDE_PIL_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def wide_mode_problem(image, what: str, tensor_hint: bool = True) -> Optional[str]:
    """Why a PIL image cannot be read as 8-bit pixels (None if it can); `what` names it.
    `tensor_hint`: suggest a normalized tensor instead (the Python API takes one; the CLI does not)."""
    if image.mode not in WIDE_PIL_MODES:
        return None
    return (f"{what} is a PIL mode {image.mode!r} image (more than 8 bits per channel) that 8-bit "
            "conversion would clip; scale it to 8 bits first" + (", or pass a normalized tensor" if tensor_hint else ""))


def parse_device(device: Union[str, torch.device]) -> torch.device:
    """`device` as a torch.device if the Engine can run there (cpu, cuda, cuda:N of a GPU torch
    sees), else an InputError; shared by Engine.load and the command line, which checks it before
    it reads any input."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # e.g. meta or mps: failed later inside the forward
        raise InputError(f"unknown device {str(device)!r}; expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InputError(f"device {device} was asked for but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_backend_name(backend: str) -> None:
    """InputError unless `backend` is "auto" or one the Engine knows."""
    if backend not in BACKEND_NAMES:
        raise InputError(f"unknown backend {backend!r}; expected auto or one of {BACKEND_NAMES[1:]}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32) -> str:
    """"auto" means triton on CUDA in fp16/bf16 (when triton imports), compact elsewhere.

    fp32 on CUDA takes compact: the fp32 Triton kernels measured ~20x slower than cuBLAS on an
    H100 with exact FMA dots (which spilled registers by the kilobyte); their 3xTF32 successors
    are not measured yet (bench/RESULTS.md), so fp32 stays on cuBLAS until they are."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and dtype != torch.float32:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "compact"
        return "triton"
    return "compact"


def _runner_class(backend: str, options: dict):
    """Import the runner of an external backend and check `options` against the keyword arguments
    it takes (all but `info` and `device`, which `Engine.load` passes), so an option meant for
    another backend is a clear error, not a TypeError from inside the runner."""
    module_name, _, class_name = EXTERNAL_BACKENDS[backend].partition(":")
    runner_cls = getattr(importlib.import_module(module_name), class_name)
    parameters = inspect.signature(runner_cls).parameters
    if any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()):
        return runner_cls
    accepted = sorted(
        name for name, parameter in parameters.items()
        if name not in ("info", "device") and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise InputError(f"backend {backend!r} does not take the option(s) {unknown}; it takes {accepted}")
    return runner_cls


class Engine:
    """Inference over a bundle: `Engine.load(path).predict(images, steer="cat")`."""

    def __init__(
        self,
        model: Optional[GatedViT],
        info: BundleInfo,
        backend: str,
        device: torch.device,
        runner=None,
        dtype: torch.dtype = torch.float32,
        cuda_graphs: bool = False,
    ):
        self.model = model
        self.dtype = dtype
        # The triton backend never syncs with the host, so its forward can be captured and replayed.
        self._graphed = CudaGraphForward(self._forward) if cuda_graphs else None
        self.info = info
        self.backend = backend
        self.device = device
        self._runner: Optional[Callable] = runner
        config = info.config
        self.image_size = tuple(config["image_size"])
        self.in_chans = int(config.get("in_chans", 3))
        self.steer_width = int(config["steer_width"])
        self.num_gated = len(config.get("gated_blocks", []))
        self._mean = torch.tensor(info.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(info.std, dtype=torch.float32).view(1, -1, 1, 1)

    @classmethod
    def load(
        cls,
        path: Union[str, Path],
        backend: str = "auto",
        device: Union[str, torch.device] = "cpu",
        dtype: str = "float32",
        cuda_graphs: Optional[bool] = None,
        **options,
    ) -> "Engine":
        """Load a bundle for inference. backend: auto, reference, compact, triton, onnxruntime,
        tensorrt. dtype: float32, float16 or bfloat16 (torch backends; gates see the same
        dtype). cuda_graphs: replay a captured CUDA graph per batch size (default: on for triton
        on CUDA, the only backend that allows it). Options go to external runners (e.g.
        `onnx_path`, `providers`, `engine_path`)."""
        device = parse_device(device)
        check_backend_name(backend)
        if dtype not in DTYPES:
            raise InputError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        backend = resolve_backend(backend, device, DTYPES[dtype])
        if backend == "triton":
            from headsteer.kernels.dispatch import triton_available

            if not triton_available(device):
                raise InputError("backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); use compact")
        graphable = backend == "triton" and device.type == "cuda"
        if cuda_graphs and not graphable:
            raise InputError("cuda_graphs needs backend 'triton' on a CUDA device (other paths sync with the host)")
        cuda_graphs = graphable if cuda_graphs is None else cuda_graphs
        if backend in TORCH_BACKENDS and options:
            raise InputError(f"backend {backend!r} takes no options, got {sorted(options)}")
        if backend in EXTERNAL_BACKENDS and dtype != "float32":
            raise InputError(f"backend {backend!r} runs an exported model; choose its precision at export time")
        runner_cls = _runner_class(backend, options) if backend in EXTERNAL_BACKENDS else None
        model, info = load_bundle(path, map_location=device)
        if backend in TORCH_BACKENDS:
            engine = cls(model.to(DTYPES[dtype]), info, backend, device, dtype=DTYPES[dtype], cuda_graphs=cuda_graphs)
            engine._warm_up()
            return engine
        runner = runner_cls(info, device=device, **options)
        return cls(model, info, backend, device, runner=runner)

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def _warm_up(self) -> None:
        """One batch-1 forward at load: builds per-module caches before any request thread runs."""
        self.predict(torch.zeros(1, self.in_chans, *self.image_size))

    # -- input handling -----------------------------------------------------------------------
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] float images in [0, 1] -> the model's input, with the bundle's mean/std."""
        return (images - self._mean) / self._std

    def preprocess(self, images) -> torch.Tensor:
        """Normalized float32 [B, C, H, W] from a tensor (taken as already normalized), or from
        raw PIL images / uint8 HWC arrays (resized and normalized with the bundle's settings)."""
        if isinstance(images, torch.Tensor):
            return self._check_tensor(images)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("no images given")
        return self.normalize(torch.stack([self._raw_to_tensor(image, index) for index, image in enumerate(images)]))

    def _check_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        expected = f"[B, {self.in_chans}, {self.image_size[0]}, {self.image_size[1]}]"
        if pixels.dim() != 4:
            raise InputError(f"image tensor must be {expected}, got shape {list(pixels.shape)}")
        if not pixels.is_floating_point():
            raise InputError(f"image tensor must be floating point (normalized pixels), got {pixels.dtype}")
        if pixels.shape[1] != self.in_chans:
            raise InputError(f"image tensor has {pixels.shape[1]} channels; expected {expected}")
        if tuple(pixels.shape[2:]) != self.image_size:
            raise InputError(f"image tensor is {list(pixels.shape[2:])} pixels; expected {expected}")
        if pixels.shape[0] == 0:
            raise InputError("empty batch")
        pixels = pixels.float()  # (checked after the cast: float64 past float32's range turns infinite)
        if not bool(torch.isfinite(pixels).all()):
            raise InputError("image tensor holds NaN or infinite values (as float32)")
        if self.dtype != torch.float32 and not bool(torch.isfinite(pixels.to(self.dtype)).all()):
            # (the model runs in self.dtype: float16 turns anything past 65504 infinite, then NaN logits)
            limit = torch.finfo(self.dtype).max
            raise InputError(f"image tensor holds values beyond {str(self.dtype).removeprefix('torch.')}'s range "
                             f"(|x| > {limit:.6g}), the dtype this engine runs in; normalized pixels are small numbers")
        return pixels

    def _raw_to_tensor(self, image, index: int) -> torch.Tensor:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None
        if Image is not None and isinstance(image, Image.Image):
            problem = wide_mode_problem(image, f"image {index}")
            if problem:
                raise InputError(problem)
            image = np.asarray(image.convert("RGB" if self.in_chans == 3 else "L"))
        if not isinstance(image, np.ndarray):
            raise InputError(f"image {index} is a {type(image).__name__}; expected a PIL image or a uint8 HWC array")
        if image.dtype != np.uint8:
            raise InputError(f"image {index} array is {image.dtype}; raw images must be uint8 (HWC, 0-255)")
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, self.in_chans) or 0 in image.shape:
            raise InputError(f"image {index} has shape {list(image.shape)}; expected HxW, HxWx1 or HxWx{self.in_chans}")
        # (a negative stride, as in OpenCV's BGR -> RGB `image[..., ::-1]`, is copied first: torch refuses it)
        pixels = torch.tensor(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        if pixels.shape[0] != self.in_chans:
            pixels = pixels.expand(self.in_chans, -1, -1)
        if tuple(pixels.shape[1:]) != self.image_size:
            pixels = F.interpolate(pixels[None], size=self.image_size, mode="bilinear", antialias=True, align_corners=False)[0]
        return pixels

    def steering_vectors(self, steer, batch: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Map a steer request (None, a class name/index, or one per sample) to [B, S] vectors."""
        if steer is None:
            return None, None
        if isinstance(steer, (torch.Tensor, np.ndarray)):  # e.g. steer=labels; a 0-d one is its scalar
            if steer.ndim > 1:
                raise InputError(f"per-sample steering targets must be 1-D, got shape {list(steer.shape)}")
            steer = steer.tolist()
        targets: Sequence[SteerTarget] = list(steer) if isinstance(steer, (list, tuple)) else [steer] * batch
        if len(targets) != batch:
            raise InputError(f"{len(targets)} steering targets for a batch of {batch}")
        if all(target is None for target in targets):
            return None, None
        if self.info.steering is None:
            raise InputError("this bundle has no steering table; steer must be None")
        return self.info.steering.rows([self.info.steering_row(target) for target in targets])

    # -- inference ----------------------------------------------------------------------------
    def _explicit_steering(self, vector, name: str, batch: int) -> torch.Tensor:
        if not isinstance(vector, torch.Tensor) or not vector.is_floating_point():
            raise InputError(f"{name} must be a float tensor [B, {self.steer_width}] or [{self.steer_width}]")
        if vector.dim() == 1:
            vector = vector.expand(batch, -1)
        if tuple(vector.shape) != (batch, self.steer_width):
            raise InputError(f"{name} must be [{batch}, {self.steer_width}] (or [{self.steer_width}]), got {list(vector.shape)}")
        vector = vector.float()
        if not bool(torch.isfinite(vector).all()):
            raise InputError(f"{name} holds NaN or infinite values (as float32)")
        return vector

    def _forward(self, pixels, scale, shift, key=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's forward on device tensors; `key` is the head budget."""
        out = self.model(pixels, scale, shift, budget=key, backend=self.backend)
        return out.logits, out.head_mask

    def predict(
        self,
        images,
        steer=None,
        budget: Optional[float] = None,
        steer_scale: Optional[torch.Tensor] = None,
        steer_shift: Optional[torch.Tensor] = None,
    ) -> Prediction:
        """Classify a batch. `steer`: None, a class name or index (of the bundle's classes), or a
        per-sample list of them (None items = unsteered). Or give raw `steer_scale`/`steer_shift` vectors ([B, S_total]
        or [S_total]; the missing one is identity) instead of `steer`. `budget`: force
        round(budget*H) heads per gated block."""
        # (the checks that need no pixels come before preprocessing, which resizes and scans them)
        check_budget(budget)
        budget = None if budget is None else float(budget)  # (a numpy scalar as a Python float)
        if budget is not None and self._runner is not None:
            raise InputError(f"backend {self.backend!r} runs an exported model; a head budget is not an input there")
        if steer is not None and (steer_scale is not None or steer_shift is not None):
            raise InputError("give either steer (class names) or steer_scale/steer_shift vectors, not both")
        pixels = self.preprocess(images)
        batch = pixels.shape[0]
        if steer_scale is not None or steer_shift is not None:
            scale = None if steer_scale is None else self._explicit_steering(steer_scale, "steer_scale", batch)
            shift = None if steer_shift is None else self._explicit_steering(steer_shift, "steer_shift", batch)
            if self._runner is not None:  # exported models take both vectors
                scale = torch.ones(batch, self.steer_width) if scale is None else scale
                shift = torch.zeros(batch, self.steer_width) if shift is None else shift
        else:
            scale, shift = self.steering_vectors(steer, batch)
        if self._runner is not None:
            logits, head_mask = self._runner(pixels, scale, shift)
        else:
            with torch.inference_mode():
                pixels = pixels.to(device=self.device, dtype=self.dtype)
                scale = None if scale is None else scale.to(self.device)
                shift = None if shift is None else shift.to(self.device)
                if self._graphed is not None:  # one graph serves steered and unsteered requests
                    scale = torch.ones(len(pixels), self.steer_width, device=self.device) if scale is None else scale
                    shift = torch.zeros(len(pixels), self.steer_width, device=self.device) if shift is None else shift
                    logits, head_mask = self._graphed(pixels, scale, shift, key=budget)
                else:
                    logits, head_mask = self._forward(pixels, scale, shift, key=budget)
            logits, head_mask = logits.float().cpu(), head_mask.cpu()
        labels = logits.argmax(dim=-1)
        return Prediction(
            logits=logits,
            labels=labels,
            class_names=[self.class_names[i] for i in labels.tolist()],
            head_mask=head_mask,
        )

"""`headsteer bench`: latency and throughput of every backend against timm's dense forward.

For each image size and batch size, every cell of the grid (timm dense, then each gated backend
at each forced head usage, then optionally each gated backend with the gate deciding) is timed
round-robin: one repetition runs every cell once, in a freshly shuffled order, so machine noise
(other processes, frequency changes) lands on all cells alike and the speed-up over timm is a
ratio of numbers measured side by side in the same process on the same inputs.

Per cell: warm-up, `reps` timed forwards (CUDA events on a GPU), median/p90/p99 latency,
images/s, speed-up over timm dense, the ideal speed-up from the FLOPs the measured head mask
skips (see `flops.py`), and efficiency = measured / ideal.

API: `run_bench(BenchConfig(...)) -> dict` (the JSON report), `write_json/write_markdown/
write_plot`, `register_backend` to plug in more backends. CLI: `add_arguments(parser)` and
`run(args) -> int` (mounted as `headsteer bench`; also `python -m headsteer.bench`).
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import numbers
import os
import platform
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from headsteer.bench.flops import ideal_speedup, patch_size, vit_flops
from headsteer.kernels.aot import launch_device
from headsteer.runtime.engine import DTYPES
from headsteer.runtime.errors import InputError
from headsteer.runtime.files import atomic_path, check_can_create

ROW_KEYS = (
    "backend",
    "batch",
    "img_size",
    "usage",
    "median_ms",
    "p90_ms",
    "p99_ms",
    "images_per_s",
    "speedup_vs_timm",
    "ideal_speedup",
    "efficiency",
)
DEFAULT_USAGES = (1.0, 0.67, 0.5, 0.33, 0.17, 0.0)
RANDOM_WEIGHTS_NOTE = "random weights (latency does not depend on the weight values)"
GIVEN_WEIGHTS_NOTE = "the given module's weights"


class BackendUnavailable(Exception):
    """A backend cannot run here; the message says why (it is skipped and the reason reported)."""


# -- backends -------------------------------------------------------------------------------------
class Runner:
    """One benchmarked way of running the model. `__call__(x, steer_scale, steer_shift, budget)`
    runs a forward and returns the head mask [B, L_gated, H] it used (None for a dense baseline).

    dense: ignores head pruning (timm; timed once per batch at usage 1).
    supports_budget: can force a head budget (an exported ONNX graph only has the gate's threshold).
    """

    dense = False
    supports_budget = True

    def __init__(self, name: str, model, device: torch.device):
        self.name, self.model, self.device = name, model, device

    def for_model(self, model) -> "Runner":
        """This runner on another GatedViT sharing the backbone (gate-deciding copies)."""
        clone = copy.copy(self)
        clone.model = model
        return clone

    def environment(self) -> dict:
        """Settings of this backend the report's environment records (none by default)."""
        return {}

    def __call__(self, x, steer_scale, steer_shift, budget):
        raise NotImplementedError


class TimmRunner(Runner):
    """timm's own VisionTransformer forward (fused attention): the baseline."""

    dense = True

    def __call__(self, x, steer_scale, steer_shift, budget):
        self.model.vit(x)
        return None


class GatedRunner(Runner):
    """GatedViT.forward with one of its in-process backends (reference, compact, triton)."""

    def __call__(self, x, steer_scale, steer_shift, budget):
        return self.model(x, steer_scale, steer_shift, budget=budget, backend=self.name).head_mask


class GraphRunner(Runner):
    """A CUDA-graph replay of "timm" or "triton" (names "timm-graph", "triton-graph"): the same
    work as the eager runner without Python's per-kernel launch cost."""

    def __init__(self, name, model, device):
        super().__init__(name, model, device)
        if device.type != "cuda":
            raise BackendUnavailable(f"{name} needs a CUDA device")
        self.dense = name.startswith("timm")
        self._graphed = self._new_graph()

    def _new_graph(self):
        """A graph per (batch, usage), none ever dropped: the usages of a batch are timed
        round-robin, so dropping the oldest (CudaGraphForward's default past 16) would capture it
        again inside a timed call."""
        from headsteer.runtime.cuda_graph import CudaGraphForward

        if self.dense:
            return CudaGraphForward(lambda x, key=None: (self.model.vit(x),), max_graphs=sys.maxsize)
        return CudaGraphForward(
            lambda x, *steer, key=None: (self.model(x, *steer, budget=key, backend="triton").head_mask,),
            max_graphs=sys.maxsize,
        )

    def for_model(self, model):
        clone = super().for_model(model)
        clone._graphed = clone._new_graph()
        return clone

    def __call__(self, x, steer_scale, steer_shift, budget):
        if self.dense:
            self._graphed(x)
            return None
        # A graph replays tensors only: a model without SAEs has no steering vectors (None, None).
        steer = () if steer_scale is None and steer_shift is None else (steer_scale, steer_shift)
        return self._graphed(x, *steer, key=budget)[0]


def _timm_factory(name, model, device):
    return TimmRunner(name, model, device)


def _gated_factory(name, model, device):
    if name == "triton":
        if device.type != "cuda":
            raise BackendUnavailable("triton needs a CUDA device")
        try:
            import triton  # noqa: F401
        except ImportError:
            raise BackendUnavailable("triton is not installed (pip install headsteer[gpu])") from None
    return GatedRunner(name, model, device)


class OnnxRuntimeRunner(Runner):
    """The model exported to ONNX by `headsteer.export` and run by ONNX Runtime ("onnxruntime":
    the sparse attention variant; "onnxruntime-masked": the masked one), CPU provider on the CPU,
    CUDA first on a GPU, with torch's thread count and thread spinning off (ORT's threads would
    otherwise busy-wait after each run and take the cores from the torch cell timed next).

    The ONNX contract has no head-budget input, so this runner only appears in gate-deciding rows
    (`--gate`); each gate-deciding copy of the model is exported once, during its warm-up. The
    contract is float32: with another --dtype the backend is unavailable."""

    supports_budget = False

    def __init__(self, name, model, device):
        super().__init__(name, model, device)
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed (pip install headsteer[onnx])") from None
        try:
            from headsteer.export._common import MissingDependencyError
            from headsteer.export.onnx_runner import default_providers
        except ImportError as error:
            raise BackendUnavailable(f"the ONNX exporter is not available ({error})") from None
        dtype = next(model.parameters()).dtype
        if dtype != torch.float32:
            raise BackendUnavailable(f"the ONNX contract is float32; not run with --dtype {str(dtype).replace('torch.', '')}")
        try:
            default_providers(torch.device(device))  # a CPU-only build on a CUDA run: skip once, not per cell
        except MissingDependencyError as error:
            raise BackendUnavailable(str(error).splitlines()[0]) from None
        self.attention = "masked" if name.endswith("-masked") else "sparse"
        self._fn = None

    def environment(self) -> dict:
        import onnxruntime

        from headsteer.export.onnx_runner import NO_SPINNING

        return {"onnxruntime": dict(version=onnxruntime.__version__, session_config=dict(NO_SPINNING))}

    def for_model(self, model):
        clone = super().for_model(model)
        clone._fn = None
        return clone

    def __call__(self, x, steer_scale, steer_shift, budget):
        if budget is not None:
            raise BackendUnavailable("onnxruntime runs the gate's threshold only (no head-budget input)")
        if self._fn is None:
            from headsteer.export.onnx_runner import make_ort_callable

            with torch.inference_mode(False):
                self._fn = make_ort_callable(self.model, attention=self.attention, device=self.device,
                                             intra_op_num_threads=torch.get_num_threads(), allow_spinning=False)
        _, head_mask = self._fn(x, steer_scale, steer_shift)
        return head_mask


# name -> factory(name, model, device) -> Runner (raises BackendUnavailable)
BACKEND_FACTORIES: dict[str, Callable] = {
    "timm": _timm_factory,
    "reference": _gated_factory,
    "compact": _gated_factory,
    "triton": _gated_factory,
    "onnxruntime": OnnxRuntimeRunner,
    "onnxruntime-masked": OnnxRuntimeRunner,
    "timm-graph": GraphRunner,
    "triton-graph": GraphRunner,
}


def register_backend(name: str, factory: Callable) -> None:
    """Add a backend to `headsteer bench`: factory(name, model, device) returns a `Runner` or
    raises `BackendUnavailable("why")`."""
    BACKEND_FACTORIES[name] = factory


def default_backends(device: torch.device) -> list[str]:
    names = ["timm", "reference", "compact"]
    if device.type == "cuda":
        names.append("triton")
    return names


# -- configuration --------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What `run_bench` measures. Exactly one of `model` (a timm name, or a GatedViT/timm module)
    and `bundle` (a bundle directory)."""

    model: object = None
    bundle: Optional[str] = None
    backends: Optional[Sequence[str]] = None  # None: timm, reference, compact (+ triton on CUDA)
    batches: Sequence[int] = (1, 8)
    usages: Sequence[float] = DEFAULT_USAGES
    img_sizes: Optional[Sequence[int]] = None  # None: the model's own
    threads: Optional[int] = None
    device: str = "auto"
    reps: int = 20
    warmup: int = 3
    gate: bool = False  # also time the gate deciding (threshold mode), per target usage
    calibration_samples: int = 32
    seed: int = 0
    timm_kwargs: dict = field(default_factory=dict)
    gated_kwargs: dict = field(default_factory=dict)  # passed to GatedViT.from_timm
    progress: bool = True
    quick: bool = False
    clock: str = "wall"  # "wall" (latency) or "process" (this process's CPU time; see --clock)
    dtype: str = "float32"  # float32, float16 or bfloat16: weights, images and steering vectors

    @classmethod
    def quick_defaults(cls, **overrides) -> "BenchConfig":
        """`--quick`: few repetitions, small calibration; under 2 minutes for vit_small on 2 cores."""
        values = dict(reps=4, warmup=1, calibration_samples=8, quick=True)
        values.update(overrides)
        return cls(**values)


# -- environment ----------------------------------------------------------------------------------
def cpu_name() -> str:
    """The CPU model (Linux: /proc/cpuinfo), which host-side timings depend on."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, dtype: str = "float32") -> dict:
    """Where and with what the numbers were measured."""
    import timm

    env = dict(
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        host=socket.gethostname(),
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        timm=timm.__version__,
        device=str(device),
        cpu=cpu_name(),
        cpu_count=os.cpu_count(),
        threads=torch.get_num_threads(),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        dtype=dtype,
    )
    try:
        env["load_average_start"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return env


# -- model ----------------------------------------------------------------------------------------
def _load_model(config: BenchConfig, img_size: Optional[int], device: torch.device):
    """(GatedViT in eval mode, description, weights note). A module given as `config.model` is
    copied (the caller's stays on its device and dtype); `check_config` has refused what cannot
    apply to it (img_sizes, timm_kwargs)."""
    from headsteer.runtime.gated_vit import GatedViT

    dtype = DTYPES[config.dtype]
    if config.bundle is not None:
        try:
            from headsteer.runtime.bundle import load_bundle
        except ImportError:
            raise InputError("this installation cannot load bundles (headsteer.runtime.bundle is missing)") from None
        model, _info = load_bundle(config.bundle)
        return model.eval().to(device, dtype), f"bundle {config.bundle}", "the bundle's trained weights"
    torch.manual_seed(config.seed)
    if isinstance(config.model, GatedViT):
        model = copy.deepcopy(config.model)
        return model.eval().to(device, dtype), type(model.vit).__name__, GIVEN_WEIGHTS_NOTE
    if isinstance(config.model, torch.nn.Module):
        model = GatedViT.from_timm(copy.deepcopy(config.model), **config.gated_kwargs)
        return model.eval().to(device, dtype), type(config.model).__name__, GIVEN_WEIGHTS_NOTE
    kwargs = dict(config.timm_kwargs)
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = GatedViT.from_timm(config.model, timm_kwargs=kwargs, **config.gated_kwargs)
    return model.eval().to(device, dtype), config.model, RANDOM_WEIGHTS_NOTE


def _check_img_sizes(config: BenchConfig, model) -> None:
    """Refuse image sizes the loaded model cannot take: a bundle's only its own, a timm model's
    none smaller than its patch (InputError; before anything is timed)."""
    if not config.img_sizes:
        return
    if config.bundle is not None:
        wrong = [s for s in config.img_sizes if (s, s) != tuple(model.image_size)]
        if wrong:
            raise InputError(f"the bundle's model takes {tuple(model.image_size)} pixels; "
                             f"--img-size {','.join(map(str, wrong))} does not match")
        return
    patch = patch_size(model.vit)
    small = [s for s in config.img_sizes if s < max(patch)]
    if small:
        raise InputError(f"--img-size {','.join(map(str, small))} is smaller than the model's "
                         f"{'x'.join(map(str, patch))} patch")


def _gate_copy(model):
    """A GatedViT sharing every module with `model` except its gates (deep-copied), so a gate
    copy can be re-biased while the backbone, its caches and the SAEs stay shared."""
    clone = copy.copy(model)
    clone._modules = dict(model._modules)
    clone._modules["gates"] = copy.deepcopy(model.gates)
    return clone


@torch.inference_mode()
def calibrate_gate(model, target: float, pixels: torch.Tensor, steer, iterations: int = 2) -> None:
    """Re-bias each gate's output layer so that, with the threshold, each head is kept on about
    `target` of the calibration images (per-head quantile of the gate logits). Heads are kept
    independently, so samples keep different head counts. 1.0 and 0.0 keep/prune every head."""
    gates = [model.gates[str(i)] for i in model.gate_blocks]
    if target >= 1.0 or target <= 0.0:
        for gate in gates:
            gate.fc2.bias.fill_(1e4 if target >= 1.0 else -1e4)
        return
    for _ in range(iterations):
        out = model(pixels, *steer, budget=None, backend="compact")
        for index, gate in enumerate(gates):
            raw = (out.gate_logits[:, index, :] - gate.fc2.bias).float()  # [B, H] without the bias
            cut = torch.quantile(raw, 1.0 - target, dim=0)
            # A head whose logit is the same on every image (block 0's gate sees the class token
            # entering it, which no image changes) cannot be kept on a share of the images: keep
            # the round(target * n) highest of those n heads on every image and prune the others,
            # rather than leave it to the rounding of raw - cut (~0). "The same" allows rounding
            # noise (a logit computed at another row of a batched matmul); the +-1 margin below
            # dwarfs it.
            spread = raw.amax(dim=0) - raw.amin(dim=0)
            same = spread <= 1e-4 * raw.abs().amax(dim=0).clamp_min(1.0)
            if same.any():
                values = raw[:, same].mean(dim=0)
                keep = torch.zeros_like(values, dtype=torch.bool)
                keep[values.argsort(descending=True)[: round(target * len(values))]] = True
                cut[same] = torch.where(keep, values - 1.0, values + 1.0)
            gate.fc2.bias.copy_(-cut)


# -- timing ---------------------------------------------------------------------------------------
class _Timer:
    """Wall clock (CUDA events on a GPU), or with clock="process" the CPU time this process used:
    immune to being descheduled by other processes on a shared machine, and equal to the wall
    time on an idle one when running one thread. It sums over threads and never waits for a
    GPU, so `check_config` allows it only on the CPU with one thread."""

    def __init__(self, device: torch.device, clock: str = "wall"):
        self.cuda = device.type == "cuda" and clock == "wall"
        self.clock = time.process_time if clock == "process" else time.perf_counter

    def __call__(self, fn) -> tuple[float, object]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end), result
        begin = self.clock()
        result = fn()
        return (self.clock() - begin) * 1e3, result


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _progress(total: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency; this only guards odd installs
        tqdm = None
    if tqdm is None or not enabled:
        class _Null:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, unit="fwd", file=sys.stderr, leave=False, dynamic_ncols=True)


@dataclass
class _Cell:
    runner: Runner
    mode: str  # "dense" (timm), "budget" (forced head usage) or "gate" (threshold decides)
    target: Optional[float]
    budget: Optional[float]
    times: list = field(default_factory=list)
    head_mask: Optional[torch.Tensor] = None


def run_bench(config: BenchConfig) -> dict:
    """Time the grid described by `config`; returns `{"environment": {...}, "rows": [...]}`.
    Every setting is checked first (InputError); torch's thread count and global RNG state are as
    they were afterwards, and a module given as `config.model` is not changed."""
    device = check_config(config)
    names = list(config.backends) if config.backends else default_backends(device)
    if "timm" not in names:
        names.insert(0, "timm")  # the baseline every speed-up is measured against
    unknown = [n for n in names if n not in BACKEND_FACTORIES]
    if unknown:
        raise InputError(f"unknown backend(s) {unknown}; known: {sorted(BACKEND_FACTORIES)}")
    threads = torch.get_num_threads()
    if device.type == "cuda":  # (index 0 is a GPU too: not `device.index or ...`)
        rng_devices = [torch.cuda.current_device() if device.index is None else device.index]
    else:
        rng_devices = []
    try:
        # (the benchmarked GPU current: CUDA events record on the current device's stream, and
        # Triton launches there, so a model on cuda:1 timed with cuda:0 current would be timed on an
        # idle GPU)
        with torch.random.fork_rng(devices=rng_devices), launch_device(device):
            if config.threads:
                torch.set_num_threads(int(config.threads))
            return _run_grid(config, names, device)
    finally:
        torch.set_num_threads(threads)


def _run_grid(config: BenchConfig, names: list, device: torch.device) -> dict:
    env = environment(device, config.dtype)
    rows, skipped, failed = [], {}, {}
    img_sizes = list(config.img_sizes) if config.img_sizes else [None]
    loaded = _load_model(config, img_sizes[0], device)
    _check_img_sizes(config, loaded[0])
    for index, img_size in enumerate(img_sizes):
        model, description, weights = loaded if index == 0 else _load_model(config, img_size, device)
        size = tuple(model.image_size)
        counts = vit_flops(model.vit, size)
        runners = []
        for name in names:
            try:
                runners.append(BACKEND_FACTORIES[name](name, model, device))
            except BackendUnavailable as why:
                skipped[name] = _one_line(why)
        for runner in runners:
            env.update(runner.environment())
        env.update(model=description, weights=weights, gated_blocks=list(model.gate_blocks),
                   num_heads=model.num_heads, sae_blocks=list(model.sae_blocks),
                   steering=f"first {STEERED_LATENTS} latents of each SAE site amplified 2x (every SAE computed)"
                   if model.steer_width else "no SAE")
        for batch in config.batches:
            rows.extend(_bench_batch(config, model, runners, counts, size, int(batch), device, skipped, failed))
    env["backends_skipped"] = skipped
    if failed:
        env["backends_failed"] = {name: _failure_summary(cells) for name, cells in failed.items()}
    try:
        env["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    env.update(reps=config.reps, warmup=_warmup_runs(config), clock=config.clock,
               interleaved="round-robin, order shuffled per repetition",
               inference_mode=True, flops="matmul FLOPs (2 per multiply-add); gate/SAE not counted")
    return dict(environment=env, rows=rows)


def _warmup_runs(config: BenchConfig) -> int:
    """Untimed calls per cell: `config.warmup`, at least one (it records the head mask, and
    exports for onnxruntime)."""
    return max(int(config.warmup), 1)


def _one_line(error) -> str:
    """A reason on one line: an exception's type and first line (a BackendUnavailable's message alone)."""
    lines = str(error).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if not isinstance(error, BackendUnavailable):
        first = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return first if len(first) <= 300 else first[:297] + "..."


def _failure_summary(cells: list) -> str:
    """'failed at <first cell> (and N more cells): <its reason>'."""
    (first, reason), more = cells[0], len(cells) - 1
    return f"failed at {first}" + (f" (and {more} more cells)" if more else "") + f": {reason}"


# -- settings -------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    """torch.device for --device (auto, cpu, cuda, cuda:N), or InputError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"--device {name!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {name!r}: the bench runs on cpu or cuda only")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def _is_count(value, least: int = 1) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _check_counts(config: BenchConfig) -> None:
    for values, what in ((config.batches, "batch sizes (--batch)"), (config.img_sizes or [1], "image sizes (--img-size)")):
        if not values or not all(_is_count(v) for v in values):
            raise InputError(f"{what} must be positive integers, got {values!r}")
    for value, what, least in ((config.reps, "--reps", 1), (config.warmup, "--warmup", 0),
                               (config.calibration_samples, "calibration_samples", 1)):
        if not _is_count(value, least):
            raise InputError(f"{what} must be an integer of at least {least}, got {value!r}")
    if config.threads is not None and not _is_count(config.threads):
        raise InputError(f"--threads must be a positive integer, got {config.threads!r}")
    if not config.usages or any(not 0.0 <= float(u) <= 1.0 for u in config.usages):
        raise InputError(f"head usages must lie in [0, 1], got {list(config.usages)}")


def _check_source(config: BenchConfig) -> None:
    """Exactly one source, and no setting that cannot apply to it (a built model ignores them)."""
    if (config.model is None) == (config.bundle is None):
        raise InputError("bench needs exactly one of a timm model name (--model) or a bundle (--bundle)")
    if config.bundle is not None:
        what, fixed = "a bundle", dict(timm_kwargs=config.timm_kwargs, gated_kwargs=config.gated_kwargs)
    elif isinstance(config.model, torch.nn.Module):
        what, fixed = "a model given as a module", dict(img_sizes=config.img_sizes, timm_kwargs=config.timm_kwargs)
        if _is_gated(config.model):
            fixed["gated_kwargs"] = config.gated_kwargs
    elif isinstance(config.model, str):
        return
    else:
        raise InputError(f"model must be a timm model name or a module, got {type(config.model).__name__}")
    given = [name for name, value in fixed.items() if value]
    if given:
        raise InputError(f"{', '.join(given)} cannot apply to {what} (it is built already); give a timm model name instead")


def _is_gated(model) -> bool:
    from headsteer.runtime.gated_vit import GatedViT

    return isinstance(model, GatedViT)


def check_config(config: BenchConfig) -> torch.device:
    """Refuse settings that cannot run, before any work (InputError); returns the device."""
    _check_source(config)
    _check_counts(config)
    if config.dtype not in DTYPES:
        raise InputError(f"dtype {config.dtype!r} is not one of {sorted(DTYPES)}")
    device = _resolve_device(config.device)
    if config.clock not in ("wall", "process"):
        raise InputError(f"clock must be 'wall' or 'process', got {config.clock!r}")
    if config.clock == "process":
        threads = config.threads or torch.get_num_threads()
        if device.type != "cpu" or threads != 1:
            raise InputError(f"--clock process measures this process's CPU time, which is latency only on the CPU "
                             f"with one thread; got device {device} with {threads} threads (add --device cpu --threads 1, "
                             "or use --clock wall)")
    return device


STEERED_LATENTS = 8


def steering_vectors(model, batch: int, device) -> tuple:
    """(steer_scale, steer_shift) as a per-class steering row would give them: the first
    STEERED_LATENTS latents of each SAE site amplified 2x, the rest identity. Not the identity, so
    every SAE is computed in full (identity steering lets the compact path skip the SAE)."""
    if not model.steer_width:
        return None, None
    scale = torch.ones(batch, model.steer_width, device=device)
    for offset in model.sae_offsets:
        scale[:, offset : offset + STEERED_LATENTS] = 2.0
    return scale, torch.zeros(batch, model.steer_width, device=device)


def _bench_batch(config, model, runners, counts, size, batch, device, skipped, failed) -> list:
    generator = torch.Generator().manual_seed(config.seed + batch)
    dtype = DTYPES[config.dtype]
    pixels = torch.randn(batch, 3, *size, generator=generator).to(device, dtype)
    steer = tuple(v if v is None else v.to(dtype) for v in steering_vectors(model, batch, device))
    cells = _make_cells(config, model, runners, size, device, skipped)
    timer = _Timer(device, config.clock)
    bar = _progress(len(cells) * (_warmup_runs(config) + config.reps), config.progress, f"bench {size[0]}px batch {batch}")
    with torch.inference_mode():
        cells = _warm_up(config, cells, timer, pixels, steer, bar, failed, f"batch {batch}, {size[0]}px")
        _time_round_robin(config, cells, timer, pixels, steer, bar, random.Random(config.seed * 7919 + batch))
    bar.close()
    return _rows(cells, counts, model, size, batch)


def _make_cells(config, model, runners, size, device, skipped) -> list:
    """timm dense, then each gated backend per forced usage, then (--gate) per calibrated gate."""
    dtype = DTYPES[config.dtype]
    cells = [_Cell(runner, "dense", 1.0, None) for runner in runners if runner.dense]
    for runner in runners:
        if not runner.supports_budget and not config.gate:
            skipped[runner.name] = "runs the gate's threshold only: its rows appear with --gate"
    for usage in config.usages:
        for runner in runners:
            if not runner.dense and runner.supports_budget:
                cells.append(_Cell(runner, "budget", float(usage), float(usage)))
    if config.gate:
        calib = torch.randn(max(config.calibration_samples, 2), 3, *size,
                            generator=torch.Generator().manual_seed(config.seed + 10_000)).to(device, dtype)
        calib_steer = tuple(v if v is None else v.to(dtype) for v in steering_vectors(model, calib.shape[0], device))
        for usage in config.usages:
            gated = _gate_copy(model)
            calibrate_gate(gated, float(usage), calib, calib_steer, iterations=1 if config.quick else 2)
            for runner in runners:
                if not runner.dense:
                    cells.append(_Cell(runner.for_model(gated), "gate", float(usage), None))
    return cells


def _cell_label(cell, where: str) -> str:
    if cell.mode == "budget":
        return f"usage {cell.target:.2f}, {where}"
    return f"{cell.mode} {cell.target:.2f}, {where}" if cell.mode == "gate" else f"{cell.mode}, {where}"


def _is_baseline(cell) -> bool:
    """The cell every speed-up is measured against: timm's dense forward."""
    return cell.mode == "dense" and cell.runner.name == "timm"


def _warm_up(config, cells, timer, pixels, steer, bar, failed, where: str) -> list:
    """Run each cell's untimed calls; the last call's head mask is the one accounted. A cell that
    raises is dropped and recorded in `failed`, except the timm baseline, which must run (another
    dense backend, e.g. timm-graph, is reported like a gated one). Returns the cells that ran."""
    kept = []
    for cell in cells:
        try:
            for _ in range(_warmup_runs(config)):
                _, mask = timer(lambda: cell.runner(pixels, *steer, cell.budget))
                bar.update()
            cell.head_mask = None if mask is None else mask.detach().to("cpu")
            kept.append(cell)
        except Exception as why:  # a cell that cannot run here is reported, not fatal
            if _is_baseline(cell):
                raise
            reason = _one_line(why)
            failed.setdefault(cell.runner.name, []).append((_cell_label(cell, where), reason))
            print(f"headsteer bench: {cell.runner.name} failed at {_cell_label(cell, where)}: {reason}", file=sys.stderr)
    return kept


def _time_round_robin(config, cells, timer, pixels, steer, bar, shuffle: random.Random) -> None:
    """`config.reps` repetitions, each running every cell once in a freshly shuffled order."""
    order = list(range(len(cells)))
    for _ in range(config.reps):
        shuffle.shuffle(order)
        for index in order:
            cell = cells[index]
            elapsed, _ = timer(lambda: cell.runner(pixels, *steer, cell.budget))
            cell.times.append(elapsed)
            bar.update()


def _rows(cells, counts, model, size, batch) -> list:
    baseline = next(c for c in cells if _is_baseline(c))
    timm_ms = statistics.median(baseline.times)
    rows = []
    for cell in cells:
        median = statistics.median(cell.times)
        if cell.head_mask is None or cell.head_mask.numel() == 0:  # dense, or a model without gates
            usage, ideal, per_sample = 1.0, 1.0, None
        else:
            per_sample = cell.head_mask.float().mean(dim=(1, 2))
            usage = float(per_sample.mean())
            ideal = ideal_speedup(counts, cell.head_mask, model.gate_blocks, batch)
        speedup = timm_ms / median
        row = dict(
            backend=cell.runner.name,
            batch=batch,
            img_size=int(size[0]),
            usage=round(usage, 4),
            median_ms=round(median, 3),
            p90_ms=round(_percentile(cell.times, 90), 3),
            p99_ms=round(_percentile(cell.times, 99), 3),
            images_per_s=round(batch / (median / 1e3), 2),
            speedup_vs_timm=round(speedup, 4),
            ideal_speedup=round(ideal, 4),
            efficiency=round(speedup / ideal, 4),
            mode=cell.mode,
            target_usage=cell.target,
            reps=len(cell.times),
        )
        if cell.mode == "gate" and per_sample is not None:
            row["usage_min"] = round(float(per_sample.min()), 4)
            row["usage_max"] = round(float(per_sample.max()), 4)
        rows.append(row)
    return rows


# -- reports --------------------------------------------------------------------------------------
def check_output_path(path, option: str = "output") -> Path:
    """Refuse (InputError) a report path that cannot be written: a folder, or one whose nearest
    existing parent is not a writable folder (missing folders are created when writing)."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{option} {path} is a folder; expected a file name")
    check_can_create(target, option)
    return target


def _atomic_write(path, write: Callable[[str], None]) -> Path:
    """Write through `write(temp_path)` to a temporary name beside `path`, then rename."""
    check_output_path(path)
    with atomic_path(path, suffix=Path(path).suffix) as temp:
        write(str(temp))
    return Path(path)


def _finite(value):
    """`value` with every non-finite float (NaN, inf) replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def json_text(report: dict) -> str:
    """The report as strict JSON (non-finite numbers as null)."""
    return json.dumps(_finite(report), indent=2, allow_nan=False) + "\n"


def _write_bytes(path, payload: bytes) -> Path:
    """`payload` written atomically to `path` (checked first)."""
    return _atomic_write(path, lambda temp: Path(temp).write_bytes(payload))


def write_json(report: dict, path) -> Path:
    return _write_bytes(path, _render(report, "--json", path))


def _fmt_usage(row) -> str:
    if row["mode"] == "gate" and row.get("usage_min") is not None and row.get("usage_max") is not None:
        return f"{row['usage']:.2f} ({row['usage_min']:.2f}-{row['usage_max']:.2f})"
    return f"{row['usage']:.2f}"


def _environment_line(env: dict) -> str:
    ort = env.get("onnxruntime")
    spinning = ""
    if ort:
        entries = ", ".join(f"{k}={v}" for k, v in ort.get("session_config", {}).items())
        spinning = f"; onnxruntime {ort.get('version')} ({entries})"
    return (f"Measured {env['date']} on {env.get('gpu') or env['cpu']} ({env['device']}, {env['threads']} threads), "
            f"torch {env['torch']}, timm {env['timm']}; model {env.get('model')}, {env.get('weights')}; "
            f"load average {env.get('load_average_start')} -> {env.get('load_average_end')}; "
            f"{env['reps']} repetitions after {env['warmup']} warm-up, {env['interleaved']}; "
            f"clock: {env.get('clock', 'wall')}{spinning}.")


def markdown(report: dict) -> str:
    """The report as Markdown: an environment line and one table per mode, each with the dense
    baseline rows its speed-ups are measured against."""
    env = report["environment"]
    lines = [_environment_line(env), ""]
    for title, key in (("Skipped", "backends_skipped"), ("Failed", "backends_failed")):
        if env.get(key):
            lines += [f"{title}: " + "; ".join(f"{k}: {v}" for k, v in env[key].items()), ""]
    header = ("| backend | batch | img | usage | median ms | p90 ms | p99 ms | images/s | speed-up vs timm "
              "| ideal | efficiency |")
    rule = "|" + "---|" * 11
    sections = [
        ("Forced head usage (head budget)", "budget"),
        ("Gate deciding (threshold; usage = measured mean, per-sample range in brackets)", "gate"),
    ]
    rows = report["rows"]
    if not any(r["mode"] != "dense" for r in rows):
        sections = [("Dense baseline (no gated backend ran)", "dense")]
    for title, mode in sections:
        chosen = [r for r in rows if r["mode"] in ("dense", mode)]
        if all(r["mode"] == "dense" for r in chosen) and mode != "dense":
            continue
        lines += [f"**{title}**", "", header, rule]
        for r in chosen:
            lines.append(
                f"| {r['backend']} | {r['batch']} | {r['img_size']} | {_fmt_usage(r)} | {r['median_ms']:.2f} "
                f"| {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['images_per_s']:.1f} | {r['speedup_vs_timm']:.3f} "
                f"| {r['ideal_speedup']:.3f} | {r['efficiency']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_markdown(report: dict, path) -> Path:
    return _write_bytes(path, _render(report, "--md", path))


def plot_format(path) -> str:
    """The image format `path`'s suffix names (png without a suffix), or InputError when
    matplotlib cannot write it."""
    from matplotlib.backend_bases import FigureCanvasBase

    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return "png"
    supported = FigureCanvasBase.get_supported_filetypes()
    if suffix not in supported:
        raise InputError(f"--plot {path}: cannot write .{suffix} images; use one of "
                         + ", ".join("." + name for name in sorted(supported)))
    return suffix


def plot_bytes(report: dict, fmt: str = "png") -> bytes:
    """The plot as `fmt` image bytes: latency vs head usage per (image size, batch), one line per
    backend, timm dense as a dotted level and the ideal (timm / ideal speed-up) dashed;
    gate-deciding rows as markers."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    panels = sorted({(r["img_size"], r["batch"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    try:
        for ax, (img, batch) in zip(axes[0], panels):
            _plot_panel(ax, [r for r in rows if r["img_size"] == img and r["batch"] == batch], img, batch)
        env = report["environment"]
        fig.suptitle(f"{env.get('model')} - {env.get('gpu') or env['cpu']}, {env['threads']} threads", fontsize=10)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=110)
        return buffer.getvalue()
    finally:
        plt.close(fig)


def _plot_panel(ax, here: list, img: int, batch: int) -> None:
    timm = next((r for r in here if r["backend"] == "timm"), None)
    backends = sorted({r["backend"] for r in here if r["mode"] != "dense"})
    for name in backends:
        forced = sorted((r for r in here if r["backend"] == name and r["mode"] == "budget"), key=lambda r: r["usage"])
        if forced:
            line, = ax.plot([r["usage"] for r in forced], [r["median_ms"] for r in forced], "o-", label=name)
            color = line.get_color()
        else:
            color = None
        gated = [r for r in here if r["backend"] == name and r["mode"] == "gate"]
        if gated:
            ax.plot([r["usage"] for r in gated], [r["median_ms"] for r in gated], "x", color=color,
                    markersize=9, label=f"{name} (gate deciding)")
    if timm is not None:
        ideal = sorted({(r["usage"], timm["median_ms"] / r["ideal_speedup"]) for r in here if r["mode"] == "budget"})
        if ideal:
            ax.plot([u for u, _ in ideal], [ms for _, ms in ideal], "k--", label="ideal (FLOPs skipped)")
        ax.axhline(timm["median_ms"], color="gray", linestyle=":", label="timm dense")
    ax.set_title(f"{img}px, batch {batch}")
    ax.set_xlabel("head usage")
    ax.set_ylabel("median latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_plot(report: dict, path) -> Path:
    """`plot_bytes` in the format `path`'s suffix names (`plot_format`), written atomically."""
    return _write_bytes(path, _render(report, "--plot", path))


def _report_files(args: argparse.Namespace) -> list:
    """(option, path) of each report file asked for, every path checked first (InputError)."""
    return check_report_paths([(option, path) for option, path in (("--json", args.json_path), ("--md", args.md_path),
                                                                   ("--plot", args.plot_path)) if path])


def check_report_paths(asked: list) -> list:
    """Check report files (option, path) before any work: each can be written, a plot's suffix is
    a format matplotlib writes, no two name the same file (InputError). Returns `asked`."""
    seen = {}
    for option, path in asked:
        check_output_path(path, option)
        if option == "--plot":
            plot_format(path)
        key = os.path.abspath(path)
        if key in seen:
            raise InputError(f"{seen[key]} and {option} name the same file {path}")
        seen[key] = option
    return asked


def _render(report: dict, option: str, path) -> bytes:
    if option == "--json":
        return json_text(report).encode()
    if option == "--md":
        return (markdown(report) + "\n").encode()
    return plot_bytes(report, plot_format(path))


def _write_reports(report: dict, files: list) -> None:
    """Render every file first (an error there writes nothing), then write each atomically."""
    payloads = [(path, _render(report, option, path)) for option, path in files]
    for path, payload in payloads:
        _write_bytes(path, payload)
        print(f"wrote {path}")


# -- CLI --------------------------------------------------------------------------------------------
def _items(text: str, what: str) -> list[str]:
    """The comma-separated items of `text`; an empty one (`1,,2`, a trailing comma) is refused, not
    skipped: it is more likely a value left out than one too many commas."""
    items = [v.strip() for v in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty item; expected comma-separated {what}")
    return items


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in _items(text, "positive integers")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _usage_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in _items(text, "numbers in [0, 1]")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"head usages must lie in [0, 1], got {text!r}")
    return values


def _name_list(text: str) -> list[str]:
    return _items(text, "backend names")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `headsteer bench` options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--bundle", help="bundle directory to benchmark")
    source.add_argument("--model", help="timm model name, built with random weights (e.g. vit_small_patch16_224)")
    parser.add_argument("--backends", type=_name_list, default=None,
                        help="comma-separated; default timm,reference,compact (+triton on CUDA). Known: "
                        + ",".join(BACKEND_FACTORIES))
    parser.add_argument("--batch", type=_int_list, default=[1, 8], help="batch sizes (default 1,8)")
    parser.add_argument("--usage", type=_usage_list, default=list(DEFAULT_USAGES),
                        help="forced head usages (default 1,0.67,0.5,0.33,0.17,0)")
    parser.add_argument("--img-size", type=_int_list, default=None, help="image size(s) (default: the model's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per cell (default 20, --quick 4)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed forwards per cell (default 3, --quick 1); at least one runs, since it "
                        "records the head mask (the report says how many ran)")
    parser.add_argument("--gate", action="store_true",
                        help="also time the gate deciding (threshold), re-biased to keep each usage on average")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall: latency (default); process: this process's CPU time, robust to other "
                        "processes on a shared machine (CPU with --threads 1 only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights and inputs (default float32; use bfloat16 on CUDA for the triton backend)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the report as JSON")
    parser.add_argument("--md", dest="md_path", default=None, help="write the tables as Markdown")
    parser.add_argument("--plot", dest="plot_path", default=None,
                        help="write a plot, in the format its suffix names (.png, .svg, .pdf, ...)")
    parser.add_argument("--quick", action="store_true", help="few repetitions (under 2 minutes on 2 CPU cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = dict(
        model=args.model,
        bundle=args.bundle,
        backends=args.backends,
        batches=args.batch,
        usages=args.usage,
        img_sizes=args.img_size,
        threads=args.threads,
        device=args.device,
        gate=args.gate,
        seed=args.seed,
        clock=args.clock,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    if args.reps is not None:
        values["reps"] = args.reps
    if args.warmup is not None:
        values["warmup"] = args.warmup
    return BenchConfig.quick_defaults(**values) if args.quick else BenchConfig(**values)


def run(args: argparse.Namespace) -> int:
    """Run `headsteer bench` from parsed arguments; prints the tables, writes the files asked for.
    Settings and report paths are checked before anything is timed (InputError)."""
    config = config_from_args(args)
    files = _report_files(args)
    report = run_bench(config)  # (checks the settings first)
    print(markdown(report))
    _write_reports(report, files)
    return 0


main_from_args = run


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="headsteer bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Exception as error:  # headsteer's own errors become one line
        from headsteer.runtime.errors import HeadsteerError

        if isinstance(error, HeadsteerError):
            print(f"headsteer bench: error: {error}", file=sys.stderr)
            return 2
        raise


__all__ = [
    "BenchConfig",
    "BackendUnavailable",
    "Runner",
    "BACKEND_FACTORIES",
    "ROW_KEYS",
    "register_backend",
    "run_bench",
    "markdown",
    "write_json",
    "write_markdown",
    "write_plot",
    "plot_format",
    "check_config",
    "check_output_path",
    "check_report_paths",
    "add_arguments",
    "config_from_args",
    "run",
    "main_from_args",
    "main",
]

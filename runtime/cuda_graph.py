"""CUDA-graph replay of a forward pass, one captured graph per input signature.

On a GPU a ViT forward at serving batch sizes is bound by kernel launches from Python, not by
the kernels: the head-sparse Triton path launches four kernels per gated block plus timm's own.
Capturing the whole forward once per (batch size, budget) and replaying it removes that cost.
This only works because the triton backend never synchronizes with the host (no data-dependent
shapes), so the pruned model is a fixed sequence of launches whatever the gates decide.
"""
from __future__ import annotations

import threading
from typing import Callable, Hashable

import torch

from headsteer.runtime.errors import InputError


class CudaGraphForward:
    """Wraps `forward(*tensors) -> tuple of tensors`; calls with CUDA tensors of a signature seen
    before replay its captured graph. `key` adds non-tensor settings (e.g. a head budget) to the
    signature; past `max_graphs` signatures the one used longest ago is dropped. Every call
    returns new tensors (copies of the graph's static outputs), so results a caller holds are
    never overwritten by a later call.

    Inputs must be CUDA tensors on one device; capture and replay run with that device current (a
    graph captured on another device would hold none of the forward's launches). Safe to call from
    several threads, also on different CUDA streams: a lock serializes capture and replay on the
    host, and each replay first waits (on the GPU) for the previous call on the same graph to finish
    with the shared buffers. Captures use the thread-local capture mode, so other threads' CUDA work
    (e.g. copying their requests to the GPU) neither fails nor invalidates a capture."""

    def __init__(self, forward: Callable[..., tuple], warmup: int = 2, max_graphs: int = 16):
        for name, value, least in (("warmup", warmup, 0), ("max_graphs", max_graphs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{name} must be an int >= {least}, got {value!r}")
        self.forward = forward
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict = {}
        self._lock = threading.Lock()

    @staticmethod
    def _device(inputs: tuple) -> torch.device:
        devices = {tensor.device for tensor in inputs if isinstance(tensor, torch.Tensor)}
        if not inputs or len(devices) != 1 or not all(isinstance(tensor, torch.Tensor) for tensor in inputs) \
                or next(iter(devices)).type != "cuda":
            found = [str(tensor.device) if isinstance(tensor, torch.Tensor) else type(tensor).__name__ for tensor in inputs]
            raise ValueError(f"CUDA-graph replay takes tensors on one CUDA device, got {found}")
        return next(iter(devices))

    def _capture(self, inputs: tuple, key: Hashable):
        static_inputs = tuple(tensor.clone() for tensor in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile kernels and settle the allocator first
            for _ in range(self.warmup):
                self.forward(*static_inputs, key=key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_outputs = self.forward(*static_inputs, key=key)
        # Recorded after each replay's output copies: the next call waits on it before it writes
        # the static inputs, wherever (on whichever stream) that call runs.
        return graph, static_inputs, static_outputs, torch.cuda.Event()

    def __call__(self, *inputs: torch.Tensor, key: Hashable = None) -> tuple:
        device = self._device(inputs)
        signature = (key,) + tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        with self._lock, torch.cuda.device(device):
            # (the dict keeps signatures in order of last use: a hit moves its entry to the end)
            entry = self._graphs.pop(signature, None)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    self._graphs.pop(next(iter(self._graphs)))  # drop the signature used longest ago
                entry = self._capture(inputs, key)
            self._graphs[signature] = entry
            graph, static_inputs, static_outputs, done = entry
            stream = torch.cuda.current_stream()
            stream.wait_event(done)  # the previous replay (maybe on another stream) is done with the buffers
            for static, tensor in zip(static_inputs, inputs):
                static.copy_(tensor)
            graph.replay()
            outputs = tuple(output.clone() for output in static_outputs)
            done.record(stream)
            return outputs

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


class CudaGraphForward:
    """Wraps `forward(*tensors) -> tuple of tensors`; calls with CUDA tensors of a signature seen
    before replay its captured graph. `key` adds non-tensor settings (e.g. a head budget) to the
    signature. Replays are serialized by a lock since a graph's buffers are shared."""

    def __init__(self, forward: Callable[..., tuple], warmup: int = 2, max_graphs: int = 16):
        self.forward = forward
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict = {}
        self._lock = threading.Lock()

    def _capture(self, inputs: tuple, key: Hashable):
        static_inputs = tuple(tensor.clone() for tensor in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile kernels and settle the allocator first
            for _ in range(self.warmup):
                self.forward(*static_inputs, key=key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_outputs = self.forward(*static_inputs, key=key)
        return graph, static_inputs, static_outputs

    def __call__(self, *inputs: torch.Tensor, key: Hashable = None) -> tuple:
        signature = (key,) + tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        with self._lock:
            entry = self._graphs.get(signature)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    self._graphs.pop(next(iter(self._graphs)))  # drop the oldest signature
                entry = self._graphs[signature] = self._capture(inputs, key)
            graph, static_inputs, static_outputs = entry
            for static, tensor in zip(static_inputs, inputs):
                static.copy_(tensor)
            graph.replay()
            return tuple(output.clone() for output in static_outputs)

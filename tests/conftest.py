"""Shared test fixtures: small timm ViTs built locally (nothing is downloaded)."""
import os
import zlib

import pytest
import torch

# Without CUDA, Triton kernels run under Triton's CPU interpreter. `triton.jit` reads this when a
# kernel module is imported, so it is set here, before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reported seed per test so random inputs vary across tests but stay reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


def tiny_vit_kwargs(**overrides) -> dict:
    """A small VisionTransformer config that runs in milliseconds on the CPU."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7)
    kwargs.update(overrides)
    return kwargs

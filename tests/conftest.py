"""Shared test fixtures: small timm ViTs built locally (nothing is downloaded)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reported seed per test so random inputs vary across tests but stay reproducible."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    return seed


def tiny_vit_kwargs(**overrides) -> dict:
    """A small VisionTransformer config that runs in milliseconds on the CPU."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7)
    kwargs.update(overrides)
    return kwargs

"""Shared test fixtures: small timm ViTs built locally (nothing is downloaded)."""
import importlib.util
import os
import sys
import zlib

import pytest
import torch

# Without CUDA, Triton kernels run under Triton's CPU interpreter. `triton.jit` reads this when a
# kernel module is imported, so it is set here, before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# ... and the kernel modules are imported now, in that mode, for the whole session: a test that
# unsets TRITON_INTERPRET to call a compile-only tool in-process would otherwise leave them
# imported compiled-only when it happened to be their first importer, and every interpreted
# kernel test after it would fail for want of a GPU driver. (Only with Triton installed: it is an
# extra, and without it the kernel tests skip while the rest run.)
if importlib.util.find_spec("triton") is not None:
    import headsteer.kernels.triton_head_attention  # noqa: E402,F401
    import headsteer.kernels.triton_sae_gate  # noqa: E402,F401

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reported seed per test so random inputs vary across tests but stay reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


@pytest.fixture(autouse=True)
def _stop_on_a_broken_cuda_context(request):
    """After a test on CUDA, fail loudly if a kernel faulted (e.g. an illegal memory access).

    A faulted CUDA context stays broken for the rest of the process, so every later test in it
    would error at its first CUDA call and hide what ran. Under pytest-xdist the worker exits
    (xdist reports the test as crashed and starts a fresh worker for the rest); without xdist
    the run stops, naming the test."""
    yield
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:
        message = f"CUDA context broken after {request.node.nodeid}: {error}"
        if os.environ.get("PYTEST_XDIST_WORKER"):
            sys.stderr.write(message + "\n")
            sys.stderr.flush()
            os._exit(3)
        pytest.exit(message, returncode=3)


def tiny_vit_kwargs(**overrides) -> dict:
    """A small VisionTransformer config that runs in milliseconds on the CPU."""
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=7)
    kwargs.update(overrides)
    return kwargs


def save_cli_bundle(path):
    """A 3-class (red, green, blue) tiny gated ViT with a 16-latent SAE and a steering table, saved
    at `path`: the bundle the command-line tests drive."""
    from headsteer.runtime import GatedViT
    from headsteer.runtime.bundle import SteeringTable, save_bundle

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=3), gate_init_bias=0.0,
                               sae_width=16, sae_k=2)
    names = ["red", "green", "blue"]
    steering = SteeringTable(names, torch.rand(3, 16) * 3, torch.zeros(3, 16))
    return save_bundle(model, path, class_names=names, steering=steering)

"""Fixtures for the export tests: one small bundle with a steering table, exported once per
attention variant for the whole session (exports take seconds; everything else reuses them)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from headsteer.runtime.bundle import SteeringTable, load_bundle, save_bundle  # noqa: E402
from headsteer.runtime.gated_vit import GatedViT  # noqa: E402

CLASS_NAMES = ["apple", "bowl", "cat", "dog", "egg"]
# Three blocks: block 0 ungated, blocks 1 and 2 gated, each with its own SAE (two steering sites).
MODEL_KWARGS = dict(
    timm_kwargs=dict(img_size=32, patch_size=8, depth=3, num_classes=len(CLASS_NAMES)),
    gate_blocks=(1, 2),
    sae_blocks=(1, 2),
    gate_init_bias=0.0,
    sae_width=64,
    sae_k=8,
)


def make_model(seed: int = 0, **overrides) -> GatedViT:
    torch.manual_seed(seed)
    kwargs = dict(MODEL_KWARGS)
    kwargs.update(overrides)
    model = GatedViT.from_timm("vit_tiny_patch16_224", **kwargs).eval()
    with torch.no_grad():
        # Spread the gate logits so that masks are mixed, and decisions sit well away from 0.
        for gate in model.gates.values():
            gate.fc2.weight.mul_(4.0)
    return model


def make_steering(model: GatedViT, seed: int = 1) -> SteeringTable:
    generator = torch.Generator().manual_seed(seed)
    rows = len(CLASS_NAMES)
    scale = torch.ones(rows, model.steer_width)
    shift = torch.zeros(rows, model.steer_width)
    for row in range(rows):
        latents = torch.randperm(model.steer_width, generator=generator)[:6]
        scale[row, latents] = 1.0 + 4.0 * torch.rand(6, generator=generator)
        shift[row, latents[:2]] = 2.0 * torch.randn(2, generator=generator)
    info = [dict(latents=[], alpha=None) for _ in range(rows)]
    return SteeringTable(list(CLASS_NAMES), scale, shift, info)


@dataclass
class Exported:
    bundle: Path
    model: GatedViT
    steering: SteeringTable
    onnx: dict  # attention variant -> path


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Exported:
    from headsteer.export import to_onnx

    root = tmp_path_factory.mktemp("export")
    model = make_model()
    steering = make_steering(model)
    bundle = save_bundle(model, root / "tiny_bundle", class_names=CLASS_NAMES, steering=steering)
    from headsteer.runtime.cli import main

    # The masked file through the API, the sparse one through the CLI (both paths, one export each).
    paths = {"masked": to_onnx(bundle, root / "tiny_masked.onnx", attention="masked")}
    paths["sparse"] = root / "tiny_sparse.onnx"
    argv = ["export", str(bundle), "--format", "onnx", "--out", str(paths["sparse"]), "--attention", "sparse"]
    assert main(argv) == 0
    loaded, _ = load_bundle(bundle)
    return Exported(bundle=bundle, model=loaded, steering=steering, onnx=paths)

"""The whole GatedViT on the triton backend against the reference backend (compiled on CUDA,
under TRITON_INTERPRET=1 on the CPU), and the Engine's backend choice."""

import pytest
import torch

from headsteer.runtime import GatedViT
from tests.conftest import DEVICE, tiny_vit_kwargs

pytest.importorskip("triton")


def _model(**kwargs):
    # head_dim 32: a size the Triton attention kernel tiles; N = 17 tokens is not a tile multiple.
    vit_kwargs = tiny_vit_kwargs(embed_dim=96, num_heads=3, depth=2, qk_norm=kwargs.pop("qk_norm", False),
                                 init_values=kwargs.pop("init_values", None))
    kwargs.setdefault("sae_width", 64)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=vit_kwargs, gate_init_bias=0.0, sae_k=4, **kwargs)
    with torch.no_grad():  # spread gate logits to O(1) so none sits within rounding of the threshold
        for gate in model.gates.values():
            gate.fc2.weight.mul_(20)
    return model.eval().to(DEVICE)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("budget", [None, 0.0, 0.67, 1.0])
@pytest.mark.parametrize(
    "config",
    [dict(), dict(sae_blocks="all", sae_activation="relu", qk_norm=True), dict(init_values=0.5)],
    ids=["topk", "relu_all_qknorm", "layer_scale"],  # (LayerScale: fused into the output projection)
)
def test_triton_backend_matches_reference(batch, budget, config):
    model = _model(**config)
    pixels = torch.randn(batch, 3, 32, 32, device=DEVICE)
    scale = torch.rand(batch, model.steer_width, device=DEVICE) * 3
    shift = torch.randn(batch, model.steer_width, device=DEVICE) * 0.1
    with torch.no_grad():
        expected = model(pixels, scale, shift, budget=budget, backend="reference")
        got = model(pixels, scale, shift, budget=budget, backend="triton")
    # A gate logit within rounding of 0 could legitimately flip; the seeded inputs keep clear of it.
    assert expected.gate_logits.abs().min() > 1e-4
    torch.testing.assert_close(got.gate_logits, expected.gate_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.head_mask, expected.head_mask)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)


def test_triton_backend_with_several_latent_and_batch_tiles():
    """An SAE of 300 latents (three latent tiles of the fused gate) and 19 images (two batch
    tiles): the split gate inside the whole model, against the reference backend."""
    model = _model(sae_width=300)
    pixels = torch.randn(19, 3, 32, 32, device=DEVICE)
    scale = torch.rand(19, model.steer_width, device=DEVICE) * 3
    shift = torch.randn(19, model.steer_width, device=DEVICE) * 0.1
    with torch.no_grad():
        expected = model(pixels, scale, shift, backend="reference")
        got = model(pixels, scale, shift, backend="triton")
    assert expected.gate_logits.abs().min() > 1e-4
    torch.testing.assert_close(got.gate_logits, expected.gate_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.head_mask, expected.head_mask)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_engine_auto_picks_triton_for_16_bit_on_cuda(tmp_path):
    from headsteer.runtime.bundle import save_bundle
    from headsteer.runtime.engine import Engine

    model = _model().cpu()
    path = save_bundle(model, tmp_path / "bundle")
    # fp32 Triton is not faster than cuBLAS (bench/RESULTS.md): auto keeps fp32 on compact.
    assert Engine.load(path, backend="auto", device="cuda").backend == "compact"
    engine = Engine.load(path, backend="auto", device="cuda", dtype="bfloat16")
    assert engine.backend == "triton"
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixels, backend="reference")
    got = engine.predict(pixels)
    torch.testing.assert_close(got.logits, expected.logits, atol=0.1, rtol=0.1)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_bf16_triton_model_close_to_fp32_reference():
    model = _model()
    pixels = torch.randn(5, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        expected = model(pixels, budget=0.67, backend="reference")
        got = model.to(torch.bfloat16)(pixels.bfloat16(), budget=0.67, backend="triton")
    torch.testing.assert_close(got.logits.float(), expected.logits, atol=0.1, rtol=0.1)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_engine_cuda_graph_replay_equals_eager(tmp_path):
    from headsteer.runtime.bundle import SteeringTable, save_bundle
    from headsteer.runtime.engine import Engine

    model = _model().cpu()
    table = SteeringTable([str(c) for c in range(7)], torch.rand(7, model.steer_width) * 3, torch.randn(7, model.steer_width) * 0.1)
    path = save_bundle(model, tmp_path / "bundle", steering=table)
    graphed = Engine.load(path, backend="triton", device="cuda")
    eager = Engine.load(path, backend="triton", device="cuda", cuda_graphs=False)
    assert graphed._graphed is not None and eager._graphed is None
    for batch, steer, budget in [(3, None, None), (3, "2", None), (5, None, 0.67), (3, "4", None), (5, "1", 0.67)]:
        pixels = torch.randn(batch, 3, 32, 32)  # new inputs into the same captured graph
        got, want = graphed.predict(pixels, steer=steer, budget=budget), eager.predict(pixels, steer=steer, budget=budget)
        assert torch.equal(got.head_mask, want.head_mask)
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)

"""GatedViT's forward against ../shared/DESIGN.md "The model", recomputed block by block by hand:
the decision vector (class token, or the mean over patch tokens with registers excluded), where
the gate reads it (the residual stream entering the block), SAE -> steer -> gate at the SAE
sites only, the keep rule, head masking of the attention branch only, and head usage.

Everything but the gate/SAE/attention math is timm's own modules, as the spec says. The hand
computations come from tests/kernels/test_spec_conformance.py (nothing from `reference`)."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from headsteer.runtime import GatedViT
from tests.conftest import tiny_vit_kwargs
from tests.kernels.test_spec_conformance import hand_attention, hand_gate_logits, hand_keep, hand_sae_encode

VARIANTS = {
    "cls_token": tiny_vit_kwargs(depth=3),
    "cls_registers": tiny_vit_kwargs(depth=3, reg_tokens=2),
    "gap_registers": tiny_vit_kwargs(depth=3, class_token=False, reg_tokens=3, global_pool="avg"),
    "gap_no_embed_class_layer_scale": tiny_vit_kwargs(depth=3, class_token=False, global_pool="avg",
                                                      no_embed_class=True, init_values=0.3),
}


def hand_forward(model: GatedViT, pixels, scale, shift, budget):
    """(logits, gate logits [B, L, H], head mask [B, L, H]) by the spec, block by block."""
    vit = model.vit
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
    all_logits, masks = [], []
    for index, block in enumerate(vit.blocks):
        if index not in model.gate_blocks:
            x = block(x)
            continue
        # 1. the decision vector: residual entering block `index`
        if vit.cls_token is not None:
            e = x[:, 0]
        else:
            e = x[:, vit.num_prefix_tokens:].mean(dim=1)
        # 3./4. SAE and steering at SAE sites only
        g = e
        if index in model.sae_blocks:
            sae = model.saes[str(index)]
            start = model.sae_offsets[model.sae_blocks.index(index)]
            s = slice(start, start + sae.width)
            z = hand_sae_encode(e, sae.encoder_weight, sae.encoder_bias, sae.decoder_bias, sae.activation,
                                k=sae.k, threshold=sae.threshold)
            steered = z * scale[:, s] + shift[:, s]
            if model.steer_mode == "preserve-error":
                g = e + (steered - z) @ sae.decoder_weight
            else:
                g = steered @ sae.decoder_weight + sae.decoder_bias
        # 2. the gate and keep rule
        gate = model.gates[str(index)]
        logits = hand_gate_logits(g, gate.norm.weight, gate.norm.bias, gate.norm.eps, gate.fc1.weight, gate.fc1.bias,
                                  gate.fc2.weight, gate.fc2.bias)
        keep = hand_keep(logits, budget)
        all_logits.append(logits)
        masks.append(keep)
        # 5. the attention branch over kept heads only; the rest of the block is timm's
        attn = block.attn
        branch = hand_attention(block.norm1(x), keep, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                                attn.num_heads)
        x = x + block.ls1(branch)
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return vit.forward_head(vit.norm(x)), torch.stack(all_logits, 1), torch.stack(masks, 1)


def make_model(kwargs, mode, activation):
    vit = VisionTransformer(**kwargs).eval()
    model = GatedViT.from_timm(vit, gate_blocks=[0, 2], sae_blocks=[0, 2], sae_width=16, sae_activation=activation,
                               sae_k=4, steer_mode=mode, gate_init_bias=0.0).double().eval()
    with torch.no_grad():
        for gate in model.gates.values():  # spread the logits: mixed masks, far from 0
            gate.fc2.weight.mul_(6.0)
        for sae in model.saes.values():
            sae.threshold.uniform_(-0.2, 0.4)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode,activation", [("preserve-error", "topk"), ("reconstruct", "jumprelu"), ("preserve-error", "relu")])
def test_forward_is_the_spec_block_by_block(variant, mode, activation):
    model = make_model(VARIANTS[variant], mode, activation)
    batch = 3
    pixels = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    scale = 3 * torch.rand(batch, model.steer_width, dtype=torch.float64)
    shift = torch.randn(batch, model.steer_width, dtype=torch.float64)
    for budget in (None, 0.34):
        with torch.no_grad():
            want_logits, want_gate, want_mask = hand_forward(model, pixels, scale, shift, budget)
        for backend in ("reference", "compact"):
            with torch.no_grad():
                out = model(pixels, scale, shift, budget=budget, backend=backend)
            assert out.head_mask.dtype == torch.bool and out.head_mask.shape == (batch, 2, model.num_heads)
            assert torch.equal(out.head_mask, want_mask), (budget, backend)
            torch.testing.assert_close(out.gate_logits, want_gate, rtol=0, atol=1e-9)
            torch.testing.assert_close(out.logits, want_logits, rtol=0, atol=1e-9)
            # 6. head usage: the mean of keep over gated blocks and heads (per sample), and per block
            torch.testing.assert_close(out.head_usage, want_mask.double().mean(dim=(1, 2)).to(out.head_usage.dtype))
            torch.testing.assert_close(out.block_usage, want_mask.double().mean(dim=2).to(out.block_usage.dtype))


@pytest.mark.parametrize("variant", ["cls_registers", "gap_registers"])
def test_decision_vector_is_the_class_token_or_the_patch_mean(variant):
    """The gate at block 0 sees the embedded tokens: the class token at position 0 (not a register),
    or, without one, the mean over patch tokens only (registers excluded). A patch-only mean and a
    class token each give other logits than any other pooling would."""
    model = make_model(VARIANTS[variant], "preserve-error", "topk")
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vit = model.vit
    with torch.no_grad():
        out = model(pixels, budget=None)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
        patches = vit.patch_embed(pixels)  # [B, num_patches, D] before any prefix token
        gate = model.gates["0"]
        if vit.cls_token is not None:
            e = x[:, 0]
            assert torch.equal(e, (vit.cls_token[:, 0] + (0 if vit.no_embed_class else vit.pos_embed[:, 0])).expand(2, -1))
        else:
            e = x[:, -patches.shape[1]:].mean(dim=1)
            assert x.shape[1] == patches.shape[1] + vit.num_prefix_tokens
        torch.testing.assert_close(out.gate_logits[:, 0], gate(e), rtol=0, atol=1e-12)
        if vit.num_prefix_tokens:
            wrong = x.mean(dim=1)  # registers included
            assert not torch.allclose(gate(wrong), out.gate_logits[:, 0])


def test_training_mask_is_a_straight_through_gumbel_sigmoid_at_temperature_5():
    """DESIGN.md 2 (AdaViT's defaults): hard mask = sigmoid((logits + logistic noise) / 5) > 0.5,
    gradient that of the soft sigmoid. Without noise the hard mask is `logits > 0`, the inference
    rule, and d(mask)/d(logit) = s (1 - s) / 5."""
    from headsteer.runtime.gated_vit import HeadGate

    gate = HeadGate(8, 4, 6)
    assert gate.temperature == 5.0 and gate.noise_scale == 1.0  # the noise is on until annealed
    logits = (4 * torch.randn(6, 4, dtype=torch.float64)).requires_grad_()
    gate.noise_scale = 0.0
    weight = gate.straight_through(logits)
    torch.testing.assert_close(weight.detach(), (logits > 0).double(), rtol=0, atol=1e-12)  # hard + soft - soft
    weight.sum().backward()
    soft = torch.sigmoid(logits.detach() / 5)
    torch.testing.assert_close(logits.grad, soft * (1 - soft) / 5)
    # With noise: a logistic sample u -> log(u) - log(1 - u) added before the temperature.
    gate.noise_scale = 1.0
    torch.manual_seed(7)
    weight = gate.straight_through(logits.detach())
    torch.manual_seed(7)
    u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
    torch.testing.assert_close(weight, (logits.detach() + torch.log(u) - torch.log1p(-u) > 0).double(), rtol=0, atol=1e-12)


def test_training_hard_mask_prunes_a_head_at_logit_zero_like_inference():
    """DESIGN.md 2: the hard threshold is sigmoid > 0.5, i.e. `logits > 0` without noise, as at
    inference: a logit of exactly 0 (sigmoid exactly 0.5) prunes its head."""
    from headsteer.kernels.reference import keep_from_logits
    from headsteer.runtime.gated_vit import HeadGate

    gate = HeadGate(8, 4, 6)
    gate.noise_scale = 0.0
    logits = torch.tensor([[0.0, 1e-6, -1e-6, 0.0], [-0.0, 3.0, 0.0, -3.0]], dtype=torch.float64)
    weight = gate.straight_through(logits)
    assert weight.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    assert torch.equal(weight > 0.5, keep_from_logits(logits))


def test_jumprelu_drops_a_latent_exactly_at_its_threshold():
    """DESIGN.md 3: JumpReLU keeps pre-activations strictly above the per-latent threshold. With a zero
    encoder the pre-activation is exactly b_enc: a latent whose b_enc equals its threshold is 0."""
    vit = VisionTransformer(**tiny_vit_kwargs(depth=2))
    model = GatedViT.from_timm(vit, sae_blocks=[1], sae_width=4, sae_activation="jumprelu").double().eval()
    sae = model.saes["1"]
    with torch.no_grad():
        sae.encoder_weight.zero_()
        sae.encoder_bias.copy_(torch.tensor([0.5, 0.5, 0.75, 0.25], dtype=torch.float64))
        sae.threshold.copy_(torch.tensor([0.5, 0.25, 0.75, 0.0], dtype=torch.float64))
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.float64), return_latents=True)
    assert out.latents[1].tolist() == [[0.0, 0.5, 0.0, 0.25]] * 2

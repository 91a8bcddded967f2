"""GatedViT against timm itself: parity with every head kept, gate/SAE/steering semantics."""
import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import ResPostBlock, VisionTransformer

from headsteer.kernels import reference
from headsteer.runtime import GatedViT, InputError, UnsupportedModelError, identity_steering
from tests.conftest import tiny_vit_kwargs

# (id, VisionTransformer kwargs, input size) — every variant the wrapper claims to support.
TIMM_VARIANTS = [
    ("cls_token", tiny_vit_kwargs(), (32, 32)),
    ("gap_no_cls", tiny_vit_kwargs(class_token=False, global_pool="avg"), (32, 32)),
    ("registers_cls", tiny_vit_kwargs(reg_tokens=4), (32, 32)),
    ("registers_gap", tiny_vit_kwargs(class_token=False, reg_tokens=2, global_pool="avg"), (32, 32)),
    ("qk_norm", tiny_vit_kwargs(qk_norm=True), (32, 32)),
    ("layer_scale", tiny_vit_kwargs(init_values=0.1), (32, 32)),
    ("no_qkv_bias", tiny_vit_kwargs(qkv_bias=False), (32, 32)),
    ("no_embed_class_pre_norm", tiny_vit_kwargs(no_embed_class=True, pre_norm=True), (32, 32)),
    ("fc_norm_avg", tiny_vit_kwargs(global_pool="avg", fc_norm=True), (32, 32)),
    ("avgmax_pool", tiny_vit_kwargs(class_token=False, global_pool="avgmax"), (32, 32)),
    ("map_pool", tiny_vit_kwargs(global_pool="map", class_token=False), (32, 32)),
    ("one_head_deep", tiny_vit_kwargs(num_heads=1, depth=5), (32, 32)),
    ("eight_heads", tiny_vit_kwargs(embed_dim=64, num_heads=8, depth=3), (32, 32)),
    ("head_dim_32", tiny_vit_kwargs(embed_dim=128, num_heads=4, depth=1), (32, 32)),
    ("non_square_odd_tokens", tiny_vit_kwargs(img_size=(40, 24), patch_size=8), (40, 24)),
    ("patch4_many_tokens", tiny_vit_kwargs(img_size=28, patch_size=4), (28, 28)),
    ("dynamic_img_size", tiny_vit_kwargs(dynamic_img_size=True), (48, 40)),
]

# timm's registered architectures, shrunk through kwargs so they build in a fraction of a second.
TIMM_NAMES = [
    ("vit_tiny_patch16_224", dict(img_size=48, depth=2)),
    ("vit_small_patch16_224", dict(img_size=32, depth=2)),
    ("vit_base_patch16_reg4_gap_256", dict(img_size=32, depth=1)),
    ("vit_medium_patch16_gap_256", dict(img_size=32, depth=1)),
]


def _parity_error(vit: nn.Module, size, backend: str, batch: int = 3) -> float:
    model = GatedViT.from_timm(vit.eval(), sae_blocks="all").eval()
    pixels = torch.randn(batch, 3, *size)
    with torch.no_grad():
        expected = vit(pixels)
        scale, shift = identity_steering(batch, model.steer_width)
        got = model(pixels, scale, shift, budget=1.0, backend=backend)
    assert got.head_mask.all()
    return (got.logits - expected).abs().max().item()


@pytest.mark.parametrize("backend", ["reference", "compact"])
@pytest.mark.parametrize("variant,kwargs,size", TIMM_VARIANTS, ids=[v[0] for v in TIMM_VARIANTS])
def test_all_heads_kept_matches_timm(variant, kwargs, size, backend):
    assert _parity_error(VisionTransformer(**kwargs), size, backend) <= 1e-5


# More configurations a timm user brings, for the bit-exact check below.
MORE_VARIANTS = [
    ("no_proj_bias", tiny_vit_kwargs(proj_bias=False), (32, 32)),
    ("quick_gelu", tiny_vit_kwargs(act_layer="quick_gelu"), (32, 32)),
    ("swiglu", tiny_vit_kwargs(mlp_layer=__import__("timm").layers.SwiGLUPacked, act_layer="silu"), (32, 32)),
    ("rmsnorm", tiny_vit_kwargs(norm_layer="rmsnorm", qk_norm=True), (32, 32)),
    ("prr_pool", tiny_vit_kwargs(global_pool="prr"), (32, 32)),
    ("avg_with_prefix", tiny_vit_kwargs(global_pool="avg", pool_include_prefix=True, fc_norm=False), (32, 32)),
    ("no_final_norm_no_pos_embed", tiny_vit_kwargs(final_norm=False, pos_embed="none"), (32, 32)),
    ("dropouts_in_eval", tiny_vit_kwargs(attn_drop_rate=0.3, proj_drop_rate=0.3, drop_path_rate=0.3,
                                         patch_drop_rate=0.5, drop_rate=0.3), (32, 32)),
    ("dynamic_img_pad", tiny_vit_kwargs(dynamic_img_size=True, dynamic_img_pad=True), (37, 29)),
    ("headless", tiny_vit_kwargs(num_classes=0), (32, 32)),
]


def _set_fused_attn(vit: nn.Module, fused: bool) -> None:
    for module in vit.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


@pytest.mark.parametrize(
    "variant,make,size",
    [(v, lambda k=k: VisionTransformer(**k), s) for v, k, s in TIMM_VARIANTS + MORE_VARIANTS]
    + [("deit_distilled", lambda: __import__("timm").create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2), (32, 32))],
    ids=[v[0] for v in TIMM_VARIANTS + MORE_VARIANTS] + ["deit_distilled"],
)
def test_every_head_kept_is_timm_to_the_bit(variant, make, size):
    """Identity steering, every head kept: compact computes timm's fused-attention forward and
    reference timm's non-fused one, bit for bit (forward_features and logits) in fp32."""
    vit = make().eval()
    model = GatedViT.from_timm(vit, sae_blocks="all").eval()
    pixels = torch.randn(3, 3, *size)
    scale, shift = identity_steering(3, model.steer_width)
    with torch.no_grad():
        for backend, fused in (("compact", True), ("reference", False)):
            _set_fused_attn(vit, fused)
            features = vit.forward_features(pixels)
            got, _, _ = model.forward_features(pixels, scale, shift, budget=1.0, backend=backend)
            assert torch.equal(got, features), backend
            out = model(pixels, scale, shift, budget=1.0, backend=backend)
            assert out.head_mask.all() and torch.equal(out.logits, vit.forward_head(features)), backend


@pytest.mark.parametrize("dropouts", [dict(attn_drop_rate=0.5, proj_drop_rate=0.5),
                                      dict(drop_path_rate=0.5, patch_drop_rate=0.5)], ids=["attention", "drop_path_patch_drop"])
@pytest.mark.parametrize("backend", ["reference", "compact"])
def test_training_applies_timms_attention_dropouts(backend, dropouts):
    """In training every backend takes the differentiable reference path with timm's attention
    dropout (on the probabilities) and projection dropout, and the forward keeps timm's patch
    dropout and stochastic depth: with every head kept and the same seed the output is timm's
    non-fused training forward, to the bit."""
    vit = VisionTransformer(**tiny_vit_kwargs(**dropouts))
    _set_fused_attn(vit, False)
    model = GatedViT.from_timm(vit, sae_blocks="all").train()
    pixels = torch.randn(3, 3, 32, 32)
    torch.manual_seed(5)
    expected = vit(pixels)
    torch.manual_seed(5)
    got = model(pixels, budget=1.0, backend=backend).logits
    assert torch.equal(got, expected)
    torch.manual_seed(6)
    assert not torch.equal(model(pixels, budget=1.0, backend=backend).logits, got)  # the dropouts ran


@pytest.mark.parametrize("layout", ["channels_last", "strided", "permuted"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_input_layouts_and_grad_modes_match_timm(layout, grad_mode):
    """An odd batch in any memory layout, under no_grad or inference_mode, is timm's to the bit."""
    vit = VisionTransformer(**tiny_vit_kwargs()).eval()
    model = GatedViT.from_timm(vit, sae_blocks="all").eval()
    pixels = {
        "channels_last": torch.randn(5, 3, 32, 32).to(memory_format=torch.channels_last),
        "strided": torch.randn(5, 3, 64, 32)[:, :, ::2],
        "permuted": torch.randn(5, 32, 32, 3).permute(0, 3, 1, 2),
    }[layout]
    with grad_mode():
        expected = vit(pixels)
        assert torch.equal(model(pixels, budget=1.0, backend="compact").logits, expected)


@pytest.mark.parametrize("name,kwargs", TIMM_NAMES, ids=[n for n, _ in TIMM_NAMES])
def test_named_timm_models_match(name, kwargs):
    model = GatedViT.from_timm(name, timm_kwargs=dict(kwargs, num_classes=5)).eval()
    pixels = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        expected = model.vit(pixels)
        got = model(pixels, budget=1.0, backend="compact")
    assert (got.logits - expected).abs().max().item() <= 1e-5
    assert model.timm_name == name


def test_batch_one_and_ungated_blocks_match_timm():
    vit = VisionTransformer(**tiny_vit_kwargs(depth=4)).eval()
    model = GatedViT.from_timm(vit, gate_blocks=[1, 3], sae_blocks=[3]).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        out = model(pixels, budget=1.0)
        assert (out.logits - vit(pixels)).abs().max() <= 1e-5
    assert out.head_mask.shape == (1, 2, 3)


def test_a_fresh_model_keeps_every_head_and_is_timm():
    """Fresh gates start at logit 3 (sigmoid ~0.95, as when fine-tuning from a dense model): before
    any training the threshold rule keeps every head and the model is the dense one."""
    vit = VisionTransformer(**tiny_vit_kwargs()).eval()
    model = GatedViT.from_timm(vit).eval()
    assert all(torch.equal(gate.fc2.bias, torch.full((3,), 3.0)) for gate in model.gates.values())
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(pixels)
        assert out.head_mask.all() and (out.logits - vit(pixels)).abs().max() <= 1e-5


def test_no_head_kept_leaves_only_projection_bias():
    """budget=0: every gated attention branch is exactly its output-projection bias."""
    vit = VisionTransformer(**tiny_vit_kwargs(init_values=0.5)).eval()
    model = GatedViT.from_timm(vit).eval()
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for backend in ("reference", "compact"):
            out = model(pixels, budget=0.0, backend=backend)
            assert not out.head_mask.any()
            assert torch.equal(out.head_usage, torch.zeros(4))
        for block in vit.blocks:
            bias = block.attn.proj.bias
            block.attn.forward = lambda x, bias=bias, **_: bias.expand_as(x)
        expected = vit(pixels)
    assert (out.logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("budget,heads", [(0.0, 0), (0.17, 1), (0.25, 2), (0.34, 2), (0.5, 3), (0.67, 4), (0.92, 6), (1.0, 6)])
def test_budget_keeps_exactly_round_b_times_h_largest_logits(budget, heads):
    vit = VisionTransformer(**tiny_vit_kwargs(embed_dim=48, num_heads=6)).eval()
    model = GatedViT.from_timm(vit, gate_init_bias=0.0).eval()
    with torch.no_grad():
        out = model(torch.randn(5, 3, 32, 32), budget=budget)
    assert (out.head_mask.sum(-1) == heads).all()
    # Every kept head's logit is at least every pruned head's logit, per sample and block.
    kept_min = out.gate_logits.masked_fill(~out.head_mask, float("inf")).amin(-1)
    pruned_max = out.gate_logits.masked_fill(out.head_mask, float("-inf")).amax(-1)
    assert (kept_min >= pruned_max).all()


def test_budget_may_be_a_numpy_scalar():
    """A budget read from a float32 array (np.float32) keeps the heads its float value does."""
    import numpy as np

    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs(embed_dim=48, num_heads=6)), gate_init_bias=0.0).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        for backend in ("reference", "compact"):
            out = model(pixels, budget=np.float32(0.5), backend=backend)
            assert torch.equal(out.head_mask, model(pixels, budget=0.5, backend=backend).head_mask)
            assert (out.head_mask.sum(-1) == 3).all()


def test_threshold_mode_keeps_positive_logits():
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), gate_init_bias=0.0).eval()
    with torch.no_grad():
        out = model(torch.randn(6, 3, 32, 32))
    assert torch.equal(out.head_mask, out.gate_logits > 0)


def test_topk_mask_breaks_ties_toward_lower_index():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.5, 2.0]])
    assert reference.topk_mask(scores, 2).tolist() == [[False, True, True, False, False]]
    assert reference.heads_for_budget(0.5, 3) == 2 and reference.heads_for_budget(0.25, 6) == 2


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_preserve_error_identity_equals_model_without_sae(activation):
    """Unsteered, preserve-error SAEs are invisible: same gates, same logits as no SAE at all."""
    vit = VisionTransformer(**tiny_vit_kwargs()).eval()
    with_sae = GatedViT.from_timm(vit, sae_blocks="all", sae_activation=activation, sae_width=40, sae_k=5, gate_init_bias=0.0)
    without = GatedViT.from_timm(vit, sae_blocks="none", gate_init_bias=0.0)
    without.gates.load_state_dict(with_sae.gates.state_dict())
    pixels = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = with_sae.eval()(pixels), without.eval()(pixels)
    assert torch.equal(a.gate_logits, b.gate_logits) and torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("mode", ["preserve-error", "reconstruct"])
@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
def test_steering_reaches_gate_as_specified(mode, activation):
    vit = VisionTransformer(**tiny_vit_kwargs()).eval()
    model = GatedViT.from_timm(vit, sae_activation=activation, sae_width=32, sae_k=4, steer_mode=mode, gate_init_bias=0.0).eval()
    sae = model.saes["1"]
    if activation == "jumprelu":
        nn.init.uniform_(sae.threshold, -0.1, 0.1)
    pixels = torch.randn(3, 3, 32, 32)
    scale = torch.rand(3, model.steer_width) * 4
    shift = torch.randn(3, model.steer_width)
    with torch.no_grad():
        out = model(pixels, scale, shift, return_latents=True)
        # Recompute the last gate's input by hand from the residual stream entering block 1.
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pixels))))
        keep0 = out.head_mask[:, 0].float()
        block0 = vit.blocks[0]
        attn = block0.attn
        branch = reference.head_attention(block0.norm1(tokens), keep0, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, 3)
        tokens = tokens + branch
        tokens = tokens + block0.mlp(block0.norm2(tokens))
        e = tokens[:, 0]
        z = sae.encode(e)
        steered = z * scale + shift
        g = e + (steered - z) @ sae.decoder_weight if mode == "preserve-error" else steered @ sae.decoder_weight + sae.decoder_bias
        expected_logits = model.gates["1"](g)
    assert torch.allclose(out.latents[1], z, atol=1e-6)
    assert torch.allclose(out.gate_logits[:, 1], expected_logits, atol=1e-5)
    if activation == "topk":
        assert ((z > 0).sum(-1) <= 4).all()
    if activation == "jumprelu":
        pre = (e - sae.decoder_bias) @ sae.encoder_weight.t() + sae.encoder_bias
        assert torch.equal(z != 0, pre > sae.threshold)


def test_steering_changes_the_gate_only_through_sae_sites():
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs(depth=3)), sae_blocks=[2], gate_init_bias=0.0).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(pixels)
        steered = model(pixels, torch.full((2, model.steer_width), 5.0), torch.randn(2, model.steer_width))
    assert torch.equal(base.gate_logits[:, :2], steered.gate_logits[:, :2])
    assert not torch.equal(base.gate_logits[:, 2], steered.gate_logits[:, 2])


def test_config_names_every_option_and_rebuilds_the_model():
    """config() is what a bundle stores to rebuild the model: every constructor option, and a model
    built from it takes the weights and gives the same outputs."""
    options = dict(gate_blocks="1:", sae_blocks=[2], sae_width=24, sae_activation="topk", sae_k=5, gate_hidden=20,
                   gate_init_bias=1.5, steer_mode="reconstruct")
    kwargs = tiny_vit_kwargs(depth=3)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=kwargs, **options).eval()
    config = model.config()
    assert config == dict(options, timm_name="vit_tiny_patch16_224", timm_kwargs=kwargs, gate_blocks=[1, 2])
    rebuilt = GatedViT.from_timm(config.pop("timm_name"), timm_kwargs=config.pop("timm_kwargs"), **config).eval()
    rebuilt.load_state_dict(model.state_dict())
    pixels, scale = torch.randn(2, 3, 32, 32), 3 * torch.rand(2, 24)
    with torch.no_grad():
        assert torch.equal(rebuilt(pixels, scale).logits, model(pixels, scale).logits)


def test_steer_width_and_offsets_follow_site_order():
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs(depth=3)), sae_blocks=[2, 0], sae_width=10)
    assert model.sae_blocks == [0, 2] and model.sae_widths == [10, 10]
    assert model.sae_offsets == [0, 10] and model.steer_width == 20


def test_training_mask_is_straight_through_and_differentiable():
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), gate_init_bias=0.0).train()
    out = model(torch.randn(4, 3, 32, 32))
    assert torch.equal(out.head_weight.detach() > 0.5, out.head_mask)
    (out.head_weight.mean() + out.logits.square().mean()).backward()
    assert model.gates["0"].fc2.weight.grad is not None and model.gates["0"].fc2.weight.grad.abs().sum() > 0


def _with_block_1_attention(cls=None, **kwargs) -> VisionTransformer:
    """A ViT whose block 1 attention is timm's Attention (or `cls`) built with other options."""
    from timm.layers import Attention

    vit = VisionTransformer(**tiny_vit_kwargs())
    vit.blocks[1].attn = (cls or Attention)(48, **dict(dict(num_heads=3, qkv_bias=True), **kwargs))
    return vit


def _with_subclassed_block_1() -> VisionTransformer:
    """(a subclass may override forward, which the wrapper would silently bypass)"""
    from timm.models.vision_transformer import Block

    vit = VisionTransformer(**tiny_vit_kwargs())
    vit.blocks[1] = type("CustomBlock", (Block,), {})(48, 3, qkv_bias=True)
    return vit


def test_training_usage_loss_alone_reaches_the_gates():
    """The usage loss reads only head_weight: in training it is the straight-through mask, whose
    gradient reaches every gate (on the CPU too, where inference buffers the decisions)."""
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), gate_init_bias=0.0).train()
    out = model(torch.randn(4, 3, 32, 32))
    assert out.head_weight.requires_grad
    out.head_weight.mean().backward()
    for gate in model.gates.values():
        assert gate.fc2.weight.grad is not None and gate.fc2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: __import__("timm").create_model("resnet10t", num_classes=3), "not a timm VisionTransformer"),
        (lambda: VisionTransformer(**tiny_vit_kwargs(block_fn=ResPostBlock)), r"blocks\.0 is a ResPostBlock"),
        (lambda: __import__("timm").create_model("eva02_tiny_patch14_224", img_size=28, depth=1), "not a timm VisionTransformer"),
        (lambda: VisionTransformer(**tiny_vit_kwargs(scale_attn_norm=True)), r"blocks\.0\.attn\.norm"),
        (lambda: __import__("timm").create_model("vit_tiny_r_s16_p8_224", img_size=32, depth=1), "patch_embed is a HybridEmbed"),
        (lambda: VisionTransformer(**tiny_vit_kwargs(global_pool="")), r"global_pool='' .*per-token logits"),
        (lambda: _with_block_1_attention(gated=True), r"blocks\.1\.attn\.gate \(gated attention output\) is not supported"),
        (lambda: _with_block_1_attention(num_heads=4), r"blocks have different head counts \[3, 4\]"),
        (lambda: _with_block_1_attention(type("CustomAttention", (__import__("timm").layers.Attention,), {})),
         r"blocks\.1\.attn is a CustomAttention"),
        (_with_subclassed_block_1, r"blocks\.1 is a CustomBlock"),
    ],
    ids=["resnet", "res_post_block", "eva_rope", "scale_norm", "hybrid_cnn_stem", "no_pooling", "gated_attention",
         "mixed_head_counts", "attention_subclass", "block_subclass"],
)
def test_unsupported_models_are_named(make, match):
    with pytest.raises(UnsupportedModelError, match=match):
        GatedViT.from_timm(make())


def test_pretrained_file_with_a_model_instance_is_an_input_error(tmp_path):
    """(timm builds and loads only by name: the file would be ignored)"""
    with pytest.raises(InputError, match="pretrained_file only applies when from_timm is given a model name"):
        GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), pretrained_file=str(tmp_path / "weights.pth"))


def test_unknown_timm_name_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="no model named"):
        GatedViT.from_timm("vit_does_not_exist")


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("resnet18", dict(img_size=16, num_classes=3), r"timm model 'resnet18' cannot be built with .*'img_size'"),
        ("vit_tiny_patch16_224", dict(tiny_vit_kwargs(), no_such_option=1), r"cannot be built with .*'no_such_option'"),
    ],
    ids=["non_vit_with_vit_options", "unknown_option"],
)
def test_timm_kwargs_the_model_does_not_take_are_a_clear_error(name, kwargs, match):
    """(were timm's TypeError: `headsteer train backbone --timm-name resnet18` ended in a traceback)"""
    with pytest.raises(UnsupportedModelError, match=match):
        GatedViT.from_timm(name, timm_kwargs=kwargs)


def test_other_type_errors_from_timm_are_not_reported_as_bad_options(monkeypatch):
    """Only an unexpected keyword is the caller's option; any other TypeError is a bug to see whole."""
    import timm

    def broken(name, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    monkeypatch.setattr(timm, "create_model", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs())


def test_timm_names_with_a_pretrained_tag_build():
    """timm.create_model takes "arch.tag" (the tag picks the pretrained config a weights file
    matches); from_timm takes the same names, and refuses an unknown tag clearly."""
    name = "vit_tiny_patch16_224.augreg_in21k"
    model = GatedViT.from_timm(name, timm_kwargs=dict(img_size=32, depth=1, num_classes=5)).eval()
    assert model.timm_name == name and model.vit.num_classes == 5
    with pytest.raises(UnsupportedModelError, match=r"vit_tiny_patch16_224\.no_such_tag.*Invalid pretrained tag"):
        GatedViT.from_timm("vit_tiny_patch16_224.no_such_tag", timm_kwargs=dict(img_size=32, depth=1))


# A small registered ViT for pretrained_file checks: its pretrained config has 1000 classes, so timm
# drops a checkpoint's head (and loads non-strictly) for num_classes=5, and loads strictly for 1000.
PRETRAINED = ("vit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=5))


def _timm_state(seed: int = 0, **kwargs) -> dict:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(PRETRAINED[0], **dict(PRETRAINED[1], **kwargs)).state_dict()


def _assert_backbone_is(model: GatedViT, state: dict, head: bool = False):
    """Every weight of `state` (head aside, unless `head`) is the model's, bit for bit."""
    got = model.vit.state_dict()
    compared = [key for key in state if head or not key.startswith("head.")]
    assert len(compared) >= 30
    for key in compared:
        assert torch.equal(got[key], state[key]), key


def test_pretrained_file_loads_every_checkpoint_timm_takes(tmp_path):
    """A checkpoint of the same timm model loads, bare, under 'state_dict' or 'model', saved through
    DataParallel ('module.'), as .safetensors, with a head of another class count (timm drops it) or
    none, and in layouts timm's vision_transformer filter remaps (OpenCLIP's 'visual.trunk.' prefix, a
    flat patch embedding and pre_logits of older checkpoints)."""
    from safetensors.torch import save_file

    name, kwargs = PRETRAINED
    state, head_1000 = _timm_state(1), _timm_state(2, num_classes=1000)
    old_layout = dict(state, **{"pre_logits.fc.weight": torch.zeros(3, 3)})
    old_layout["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].flatten(1)
    files = {
        "same.pth": (state, state),
        "wrapped_state_dict.pth": ({"state_dict": state}, state),
        "wrapped_model.pth": ({"model": state}, state),
        "data_parallel.pth": ({f"module.{k}": v for k, v in state.items()}, state),
        "open_clip.pth": ({f"visual.trunk.{k}": v for k, v in state.items()}, state),
        "old_layout.pth": (old_layout, state),
        "head_1000.pth": (head_1000, head_1000),
        "no_head.pth": ({k: v for k, v in state.items() if not k.startswith("head.")}, state),
    }
    for file, (saved, expected) in files.items():
        torch.save(saved, tmp_path / file)
        model = GatedViT.from_timm(name, timm_kwargs=kwargs, pretrained_file=str(tmp_path / file))
        _assert_backbone_is(model, expected)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "same.safetensors")
    _assert_backbone_is(GatedViT.from_timm(name, timm_kwargs=kwargs, pretrained_file=str(tmp_path / "same.safetensors")),
                        state)
    # the pretrained config's own class count: timm loads strictly, the head too
    torch.save(head_1000, tmp_path / "head_1000.pth")
    model = GatedViT.from_timm(name, timm_kwargs=dict(kwargs, num_classes=1000),
                               pretrained_file=str(tmp_path / "head_1000.pth"))
    _assert_backbone_is(model, head_1000, head=True)


def test_pretrained_file_whose_keys_do_not_match_is_an_input_error(tmp_path):
    """timm loads a checkpoint non-strictly when it drops the head, so a file of anything else (a dict
    of other keys, another architecture, a deeper or partial ViT) left the weights it lacks random
    and only logged it. It is an InputError naming the file and the missing and unexpected keys
    (a few of each, with counts), the classifier head aside."""
    import timm
    from timm.models import _builder

    loader = _builder.load_pretrained
    name, kwargs = PRETRAINED
    model_keys = len(_timm_state()) - 2  # head.weight, head.bias aside
    state = _timm_state(1)
    torch.manual_seed(0)
    files = {
        "other_keys.pth": ({"a": torch.zeros(1)}, [f"{model_keys} missing (cls_token, pos_embed, ", "1 unexpected (a)"]),
        "resnet.pth": (timm.create_model("test_resnet").state_dict(), [f"{model_keys} missing (", " unexpected (conv1"]),
        "deeper.pth": (_timm_state(depth=3), ["0 missing", "12 unexpected (blocks.2.norm1.weight, ", ", ... 7 more)"]),
        "partial.pth": ({k: v for k, v in state.items() if not k.startswith("blocks.1.")},
                        ["12 missing (blocks.1.norm1.weight, ", "0 unexpected"]),
    }
    for file, (saved, parts) in files.items():
        path = tmp_path / file
        torch.save(saved, path)
        for num_classes in (5, 1000):  # head dropped (non-strict) or kept (strict: was torch's RuntimeError)
            with pytest.raises(InputError) as caught:
                GatedViT.from_timm(name, timm_kwargs=dict(kwargs, num_classes=num_classes), pretrained_file=str(path))
            message = str(caught.value)
            assert f"cannot load {path} into timm {name} with {{'img_size': 32, 'depth': 2}}: " in message, message
            assert all(part in message for part in parts), message
            assert "head." not in message and len(message) < 700, message
    assert _builder.load_pretrained is loader  # timm's loader is restored after each (failed) load


def test_pretrained_file_timm_loads_leniently_loads(tmp_path):
    """timm loads a SigLIP checkpoint non-strictly into another pooling (its attention-pool weights
    have no place there): those unexpected keys are timm's choice, not an error; missing ones would be."""
    name, kwargs = "vit_base_patch16_siglip_224", dict(img_size=32, patch_size=16, embed_dim=48, num_heads=3, depth=1)
    state = __import__("timm").create_model(name, **kwargs).state_dict()  # global_pool="map"
    assert any(key.startswith("attn_pool.") for key in state)
    torch.save(state, tmp_path / "siglip.pth")
    model = GatedViT.from_timm(name, timm_kwargs=dict(kwargs, global_pool="avg", fc_norm=False, num_classes=5),
                               pretrained_file=str(tmp_path / "siglip.pth"))
    assert torch.equal(model.vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize(
    "pixels,kwargs,match",
    [
        (torch.randn(2, 1, 32, 32), {}, "1 channels; the model expects 3"),
        (torch.randn(2, 3, 30, 32), {}, r"\(30, 32\) pixels; the model expects \(32, 32\)"),
        (torch.randn(3, 32, 32), {}, r"\[B, C, H, W\]"),
        (torch.randn(2, 3, 32, 32), dict(steer_scale=torch.ones(2, 5)), "steer_scale must be"),
        (torch.randn(2, 3, 32, 32, dtype=torch.float64), {}, "pixel_values is torch.float64; the model's weights are torch.float32"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), {}, "pixel_values is torch.uint8"),
        (torch.randn(2, 3, 32, 32), dict(budget=1.5), "budget must be"),
        (torch.randn(2, 3, 32, 32), dict(budget=True), "budget must be a number in"),
        (torch.randn(2, 3, 32, 32), dict(steer_shift=torch.zeros(1, 192)), r"steer_shift must be \[B, S_total\] = \[2, 192\], got \(1, 192\)"),
        (torch.randn(2, 3, 32, 32), dict(backend="cuda-magic"), "unknown backend"),
        # (another device: a torch RuntimeError from inside the forward, for steering after the blocks before it ran)
        (torch.randn(2, 3, 32, 32, device="meta"), {}, "pixel_values is on meta; the model is on cpu"),
        (torch.randn(2, 3, 32, 32), dict(steer_shift=torch.zeros(2, 192, device="meta")), "steer_shift is on meta; the model is on cpu"),
    ],
)
def test_bad_inputs_are_clear_errors(pixels, kwargs, match):
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs())).eval()
    with pytest.raises(InputError, match=match):
        model(pixels, **kwargs)


@pytest.mark.parametrize(
    "pad,size,match",
    [
        (False, (37, 32), r"\(37, 32\) pixels; this dynamic-size model takes positive multiples of its patch size \(8, 8\)"),
        (False, (4, 8), r"\(4, 8\) pixels; this dynamic-size model takes positive multiples"),
        (False, (0, 16), r"\(0, 16\) pixels; this dynamic-size model takes positive multiples"),
        (True, (0, 8), r"\(0, 8\) pixels; the model needs at least one pixel per side"),
    ],
    ids=["not_a_multiple", "under_one_patch", "empty", "padded_empty"],
)
def test_dynamic_img_size_refuses_sizes_timm_cannot_embed(pad, size, match):
    """dynamic_img_size lifts the fixed size, not the patch grid: without dynamic_img_pad timm
    asserts deep in its patch embedding on sizes that are not multiples of the patch."""
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs(dynamic_img_size=True, dynamic_img_pad=pad))).eval()
    with pytest.raises(InputError, match=match):
        model(torch.randn(2, 3, *size))
    pixels = torch.randn(2, 3, *((37, 29) if pad else (40, 16)))  # sizes timm takes still run
    with torch.no_grad():
        assert (model(pixels, budget=1.0).logits - model.vit(pixels)).abs().max() <= 1e-5


def test_a_bfloat16_model_takes_fp32_steering_rows():
    """Steering tables are stored in fp32: a bf16 model takes such rows (steering in fp32, z' rounded
    once to bf16). A scale of 4 is exact in both dtypes, so bf16 rows steer the same."""
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), sae_width=16, sae_k=4,
                               gate_init_bias=0.0).eval().bfloat16()
    pixels = torch.randn(2, 3, 32, 32).bfloat16()
    scale = torch.full((2, 16), 4.0)
    with torch.no_grad():
        for backend in ("reference", "compact"):
            base = model(pixels, backend=backend)
            steered = model(pixels, scale, backend=backend)
            assert steered.gate_logits.dtype == torch.bfloat16
            assert torch.equal(steered.gate_logits, model(pixels, scale.bfloat16(), backend=backend).gate_logits)
            assert not torch.equal(steered.gate_logits[:, 1], base.gate_logits[:, 1])


def test_integer_steering_vectors_are_refused():
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), sae_blocks=(-1,)).eval()
    scale = torch.ones(2, model.steer_width, dtype=torch.long)
    with pytest.raises(InputError, match="steer_scale must be floating point, got torch.int64"):
        model(torch.randn(2, 3, 32, 32), steer_scale=scale)


def test_head_usage_without_gated_blocks_is_one():
    """Every head runs in a model without gates: usage 1 (not the NaN of a mean over nothing)."""
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), gate_blocks="none", sae_blocks="none").eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.head_mask.shape == (2, 0, model.num_heads)
    assert out.head_usage.tolist() == [1.0, 1.0] and out.block_usage.shape == (2, 0)


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(InputError, match="not gated"):
        GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs(depth=3)), gate_blocks=[0], sae_blocks=[2])
    with pytest.raises(InputError, match="out of range"):
        GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), gate_blocks=[5])


def test_block_indices_at_both_ends_of_the_range():
    vit = VisionTransformer(**tiny_vit_kwargs(depth=3))
    assert GatedViT.from_timm(vit, gate_blocks=[-3, 2], sae_blocks=[-1]).gate_blocks == [0, 2]
    for index in (3, -4):
        with pytest.raises(InputError, match=f"gate_blocks index {index} is out of range for a model with 3 blocks"):
            GatedViT.from_timm(vit, gate_blocks=[index])


@pytest.mark.parametrize("kwargs,match", [
    (dict(sae_activation="gelu"), r"sae_activation must be one of \('topk', 'relu', 'jumprelu'\), got 'gelu'"),
    (dict(sae_width=8, sae_k=0), "a topk SAE needs 1 <= sae_k <= sae_width=8, got 0"),
    (dict(sae_width=8, sae_k=9), "a topk SAE needs 1 <= sae_k <= sae_width=8, got 9"),
], ids=["activation", "k_zero", "k_over_width"])
def test_bad_sae_configuration_is_a_clear_error(kwargs, match):
    with pytest.raises(InputError, match=match):
        GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), **kwargs)


def test_default_sizes_follow_the_model_width():
    """SAE width 4 D, TopK k = min(16, width), gate hidden width max(16, D / 4); only a JumpReLU
    SAE trains its threshold (the others keep it, unused, for one bundle layout)."""
    narrow = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()))  # D = 48
    assert (narrow.sae_width, narrow.sae_k, narrow.gate_hidden) == (192, 16, 16)
    assert narrow.gates["0"].fc1.out_features == 16 and narrow.saes["1"].encoder_weight.shape == (192, 48)
    wide = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs(embed_dim=128, num_heads=4, depth=1)), sae_width=8)
    assert (wide.sae_k, wide.gate_hidden, wide.gates["0"].fc1.out_features) == (8, 32, 32)
    for activation in ("topk", "relu", "jumprelu"):
        sae = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), sae_activation=activation, sae_width=8).saes["1"]
        assert sae.threshold.requires_grad == (activation == "jumprelu"), activation


def test_a_single_int_selects_one_block():
    vit = VisionTransformer(**tiny_vit_kwargs(depth=3))
    model = GatedViT.from_timm(vit, gate_blocks=-2, sae_blocks=1)
    assert model.gate_blocks == [1] and model.sae_blocks == [1]


def test_block_strings_list_indices_and_refuse_anything_else():
    """The command line's forms: "0, 2," lists indices (spaces and a trailing comma allowed); a
    word or a slice of four parts is an InputError, not Python's ValueError/TypeError."""
    vit = VisionTransformer(**tiny_vit_kwargs(depth=4))
    assert GatedViT.from_timm(vit, gate_blocks="0, 2,", sae_blocks=" -2").gate_blocks == [0, 2]
    with pytest.raises(InputError, match=r"gate_blocks must be 'all', 'none', a slice like '1:' or indices like '0,3,-1', got '0,x'"):
        GatedViT.from_timm(vit, gate_blocks="0,x")
    with pytest.raises(InputError, match=r"gate_blocks slice must look like '1:' or '2:-1', got '1:2:3:4'"):
        GatedViT.from_timm(vit, gate_blocks="1:2:3:4")


def test_block_slices_select_gated_blocks():
    vit = VisionTransformer(**tiny_vit_kwargs(depth=4))
    assert GatedViT.from_timm(vit, gate_blocks="1:").gate_blocks == [1, 2, 3]
    assert GatedViT.from_timm(vit, gate_blocks="1:-1", sae_blocks="2").gate_blocks == [1, 2]
    # a slice with a negative step selects the same blocks, still in model order (head_mask's
    # order and the steering layout's): "::-1" gave [3, 2, 1, 0]
    reversed_slices = GatedViT.from_timm(vit, gate_blocks="::-1", sae_blocks="3:0:-2")
    assert reversed_slices.gate_blocks == [0, 1, 2, 3] and reversed_slices.sae_blocks == [1, 3]
    with pytest.raises(InputError, match="slice"):
        GatedViT.from_timm(vit, gate_blocks="a:b")


def test_training_with_a_budget_runs_on_every_backend():
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), gate_init_bias=0.0).train()
    for backend in ("reference", "compact"):
        out = model(torch.randn(2, 3, 32, 32), budget=0.67, backend=backend)
        assert (out.head_mask.sum(-1) == 2).all()
        out.logits.sum().backward()


def test_latents_returned_in_training_carry_the_gradients_the_gate_reads():
    """In training, return_latents gives the z the steered gate read, with its graph: a loss on the
    latents (the SAE's own) and the gate's steered input both reach the encoder."""
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), sae_activation="relu", sae_width=16,
                               gate_init_bias=0.0).train()
    encoder = model.saes["1"].encoder_weight
    out = model(torch.randn(2, 3, 32, 32), torch.full((2, 16), 3.0), return_latents=True)
    out.latents[1].sum().backward(retain_graph=True)
    assert encoder.grad is not None and encoder.grad.abs().sum() > 0
    encoder.grad = None
    out.gate_logits[:, 1].square().sum().backward()
    assert encoder.grad is not None and encoder.grad.abs().sum() > 0


@pytest.mark.parametrize("batch, blocks", [(1, 1), (5, 4), (3, 0)])
def test_buffered_gate_decisions_equal_the_stacked_lists(batch, blocks):
    """At inference on the CPU each block's gate outputs are copied into preallocated buffers;
    elsewhere they are stacked from lists. Both give the same [B, L_gated, H] tensors."""
    from headsteer.runtime.gated_vit import _GateDecisions

    heads = 6
    like = torch.randn(batch, 7, 16, dtype=torch.bfloat16)
    per_block = [(torch.randn(batch, heads), torch.rand(batch, heads) > 0.5) for _ in range(blocks)]
    results = []
    for buffered in (True, False):
        decisions = _GateDecisions(blocks, buffered=buffered)
        for logits, keep in per_block:
            decisions.add(logits.clone(), keep.clone(), None)
        results.append(decisions.stacked(batch, heads, like))
    for buffered, listed in zip(*results):
        assert buffered.shape == (batch, blocks, heads) and buffered.is_contiguous()
        assert buffered.dtype == listed.dtype and torch.equal(buffered, listed)
    gate_logits, head_mask, head_weight = results[0]
    assert head_weight.dtype == torch.bfloat16 and torch.equal(head_weight, head_mask.to(torch.bfloat16))
    if blocks:
        assert torch.equal(gate_logits[:, -1], per_block[-1][0]) and torch.equal(head_mask[:, 0], per_block[0][1])


@pytest.mark.parametrize("mode", ["preserve-error", "reconstruct"])
def test_training_gates_read_the_steered_input_inference_reads(mode):
    """DESIGN.md 2-4: training changes only how keep is drawn (straight-through Gumbel-sigmoid), not
    what the gate reads: SAE -> steer -> gate in the model's steer_mode. With the noise off, a
    training forward gives the gate logits and head mask of an eval forward under the same steering."""
    vit = VisionTransformer(**tiny_vit_kwargs(depth=3))
    model = GatedViT.from_timm(vit, sae_blocks="all", sae_width=16, sae_k=4, steer_mode=mode,
                               gate_init_bias=0.0).double()
    with torch.no_grad():
        for sae in model.saes.values():
            sae.decoder_bias.normal_(0.0, 0.3)  # (reconstruct reads b_dec)
        for gate in model.gates.values():
            gate.fc2.weight.mul_(6.0)  # mixed masks, logits far from 0
            gate.noise_scale = 0.0
    pixels = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    scale = 3 * torch.rand(3, model.steer_width, dtype=torch.float64)
    shift = torch.randn(3, model.steer_width, dtype=torch.float64)
    with torch.no_grad():
        want = model.eval()(pixels, scale, shift)
        got = model.train()(pixels, scale, shift)
        unsteered = model.train()(pixels)
    torch.testing.assert_close(got.gate_logits, want.gate_logits, rtol=0, atol=1e-9)
    assert torch.equal(got.head_mask, want.head_mask)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-9)
    assert not torch.allclose(unsteered.gate_logits, got.gate_logits)  # the steering reached the gates


def test_identity_steering_is_ones_and_zeros_and_changes_nothing():
    """DESIGN.md 4: identity steering is scale = ones, shift = zeros; passed explicitly it gives the
    unsteered model's gates and logits."""
    scale, shift = identity_steering(2, 5, dtype=torch.float64)
    assert scale.dtype == shift.dtype == torch.float64
    assert torch.equal(scale, torch.ones(2, 5, dtype=torch.float64)) and torch.equal(shift, torch.zeros(2, 5, dtype=torch.float64))
    model = GatedViT.from_timm(VisionTransformer(**tiny_vit_kwargs()), sae_blocks="all", sae_width=12, sae_k=3,
                               gate_init_bias=0.0).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        base = model(pixels)
        same = model(pixels, *identity_steering(2, model.steer_width))
    assert torch.equal(base.gate_logits, same.gate_logits) and torch.equal(base.logits, same.logits)

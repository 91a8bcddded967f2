"""kernels/compact.py against kernels/reference.py on random inputs and masks."""
import pytest
import torch
import torch.nn as nn

from headsteer.kernels import compact, reference


def _weights(dim, heads, head_dim, out_dim, qkv_bias=True, proj_bias=True, dtype=torch.float32):
    qkv_weight = torch.randn(3 * heads * head_dim, dim, dtype=dtype) / dim**0.5
    proj_weight = torch.randn(out_dim, heads * head_dim, dtype=dtype) / (heads * head_dim) ** 0.5
    return (
        qkv_weight,
        torch.randn(3 * heads * head_dim, dtype=dtype) if qkv_bias else None,
        proj_weight,
        torch.randn(out_dim, dtype=dtype) if proj_bias else None,
        heads,
    )


def _masks(kind: str, batch: int, heads: int) -> torch.Tensor:
    if kind == "none":
        return torch.zeros(batch, heads, dtype=torch.bool)
    if kind == "all":
        return torch.ones(batch, heads, dtype=torch.bool)
    if kind == "random":
        return torch.rand(batch, heads) > 0.5
    if kind == "same_count":  # every sample keeps the same number of heads, different sets
        return reference.topk_mask(torch.randn(batch, heads), max(1, heads // 2))
    if kind == "shared":  # every sample keeps the same head set
        return (torch.rand(1, heads) > 0.5).expand(batch, heads).clone()
    if kind == "every_count":  # sample b keeps b % (H+1) heads: all groups at once
        return torch.stack([reference.topk_mask(torch.randn(heads), b % (heads + 1)) for b in range(batch)])
    raise ValueError(kind)


@pytest.mark.parametrize("mask_kind", ["none", "all", "random", "same_count", "shared", "every_count"])
@pytest.mark.parametrize("batch,tokens", [(1, 5), (3, 17), (8, 50)])
@pytest.mark.parametrize("heads,head_dim", [(1, 8), (3, 16), (6, 32)])
def test_compact_matches_reference(mask_kind, batch, tokens, heads, head_dim):
    dim = 40
    weights = _weights(dim, heads, head_dim, dim)
    x = torch.randn(batch, tokens, dim)
    keep = _masks(mask_kind, batch, heads)
    expected = reference.head_attention(x, keep.float(), *weights)
    out = compact.compact_head_attention(x, keep, *weights)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv_bias,proj_bias", [(False, True), (True, False), (False, False)])
def test_compact_without_biases(qkv_bias, proj_bias):
    weights = _weights(24, 4, 8, 24, qkv_bias, proj_bias)
    x = torch.randn(5, 9, 24)
    for kind in ("none", "random", "every_count", "shared"):
        keep = _masks(kind, 5, 4)
        expected = reference.head_attention(x, keep.float(), *weights)
        torch.testing.assert_close(compact.compact_head_attention(x, keep, *weights), expected, atol=1e-5, rtol=1e-5)


def test_compact_with_qk_norm_and_wider_output():
    heads, head_dim = 3, 16
    weights = _weights(48, heads, head_dim, 20)
    q_norm, k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
    nn.init.normal_(q_norm.weight), nn.init.normal_(k_norm.bias)
    x = torch.randn(6, 11, 48)
    keep = _masks("every_count", 6, heads)
    with torch.no_grad():
        expected = reference.head_attention(x, keep.float(), *weights, q_norm=q_norm, k_norm=k_norm)
        out = compact.compact_head_attention(x, keep, *weights, q_norm=q_norm, k_norm=k_norm)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_compact_bfloat16_close_to_fp32_reference():
    weights = _weights(32, 4, 8, 32)
    x = torch.randn(4, 13, 32)
    keep = _masks("random", 4, 4)
    expected = reference.head_attention(x, keep.float(), *weights)
    low = tuple(w.bfloat16() if isinstance(w, torch.Tensor) else w for w in weights)
    out = compact.compact_head_attention(x.bfloat16(), keep, *low)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)
    # the reference itself in bf16, weighted by an fp32 mask (a straight-through mask's dtype may differ)
    masked = reference.head_attention(x.bfloat16(), keep.float(), *low)
    assert masked.dtype == torch.bfloat16
    torch.testing.assert_close(masked.float(), expected, atol=0.1, rtol=0.05)


def test_compact_backend_sees_in_place_updates_of_the_qkv_bias():
    """The compact backend caches head-major weight copies per module; an in-place update of the
    qkv bias alone (a bias-only training step) must rebuild them like a weight update does."""
    from timm.models.vision_transformer import Attention

    from headsteer.kernels import dispatch

    torch.manual_seed(5)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x, keep = torch.randn(3, 9, 32), torch.rand(3, 4) > 0.4
    with torch.no_grad():  # (as Engine runs: with grad, weights that require it are never cached)
        dispatch.head_attention("compact", x, keep, None, attn)  # (fills the cache)
        assert attn in dispatch._HEAD_MAJOR_CACHE
        attn.qkv.bias.add_(torch.randn_like(attn.qkv.bias))
        torch.testing.assert_close(dispatch.head_attention("compact", x, keep, None, attn),
                                   dispatch.head_attention("reference", x, keep, None, attn), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layer", ["qkv", "proj"])
def test_compact_backend_sees_in_place_updates_of_the_weights(layer):
    """An in-place weight update (an optimizer step, load_state_dict) between no-grad calls must
    rebuild the cached head-major copies: its version count changes, its storage does not."""
    from headsteer.kernels import dispatch

    attn, x, keep = _attention_and_inputs()
    with torch.no_grad():
        dispatch.head_attention("compact", x, keep, None, attn)  # (fills the cache)
        getattr(attn, layer).weight.mul_(-0.5)
        torch.testing.assert_close(dispatch.head_attention("compact", x, keep, None, attn),
                                   dispatch.head_attention("reference", x, keep, None, attn), atol=1e-5, rtol=1e-5)


def test_head_major_weights_slices_one_head():
    qkv_weight, qkv_bias, proj_weight, _, heads = _weights(12, 3, 4, 12)
    qkv_heads, bias_heads, proj_heads = compact.head_major_weights(qkv_weight, qkv_bias, proj_weight, heads)
    head = 1
    rows = torch.cat([qkv_weight[part * 12 + head * 4 : part * 12 + head * 4 + 4] for part in range(3)])
    assert torch.equal(qkv_heads[head], rows)
    assert torch.equal(proj_heads[head], proj_weight[:, head * 4 : head * 4 + 4].t())
    assert torch.equal(bias_heads[head], torch.cat([qkv_bias[p * 12 + 4 : p * 12 + 8] for p in range(3)]))


def test_runs_split_sorted_heads_into_stretches_of_consecutive_heads():
    """(a shared head set of at most two runs is computed from views of the weights, no gather)"""
    assert compact._runs([4]) == [(4, 5)]
    assert compact._runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]
    assert compact._runs([1, 3, 4, 5]) == [(1, 2), (3, 6)]


def _attention_and_inputs(batch=5, heads=4, dim=32):
    from timm.models.vision_transformer import Attention

    attn = Attention(dim, num_heads=heads, qkv_bias=True).eval()
    keep = torch.rand(batch, heads) > 0.5
    keep[0], keep[1] = False, True  # a sample keeping no head, one keeping all, the rest mixed
    return attn, torch.randn(batch, 9, dim), keep


def test_compact_backend_gradients_reach_the_weights():
    """Grad mode in eval (no training fallback): the compact path must give the reference's
    gradients for the attention weights, not silently drop them through cached weight copies."""
    from headsteer.kernels import dispatch

    attn, x, keep = _attention_and_inputs()
    grads = {}
    for backend in ("compact", "reference", "compact"):  # the second compact call finds a filled cache
        attn.zero_grad(set_to_none=True)
        dispatch.head_attention(backend, x, keep, None, attn).square().sum().backward()
        grads[backend] = [p.grad for p in (attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias)]
    for got, want in zip(grads["compact"], grads["reference"]):
        assert got is not None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_compact_backend_input_gradients_after_an_inference_mode_call():
    """Engine warms up under torch.inference_mode; the weight copies it caches must still serve a
    later grad-mode call on frozen weights whose input requires grad (a saliency map)."""
    from headsteer.kernels import dispatch

    attn, x, _ = _attention_and_inputs()
    attn.requires_grad_(False)
    keep = torch.tensor([True, True, False, False]).expand(5, 4).clone()  # one shared run of heads
    with torch.inference_mode():
        dispatch.head_attention("compact", x, keep, None, attn)
    grads = []
    for backend in ("compact", "reference"):
        pixels = x.clone().requires_grad_()
        dispatch.head_attention(backend, pixels, keep, None, attn).square().sum().backward()
        grads.append(pixels.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_compact_backend_weights_converted_in_inference_mode():
    """Weights moved with .to() inside torch.inference_mode are inference tensors, whose in-place
    updates no version counter records: the compact path must not serve stale copies of them."""
    from headsteer.kernels import dispatch

    attn, x, keep = _attention_and_inputs()
    with torch.inference_mode():
        attn.to(torch.float64)
        x = x.double()
        dispatch.head_attention("compact", x, keep, None, attn)
        attn.qkv.weight.mul_(0.5)
        got = dispatch.head_attention("compact", x, keep, None, attn)
        want = dispatch.head_attention("reference", x, keep, None, attn)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_compact_backend_weights_built_in_inference_mode():
    from headsteer.kernels import dispatch

    with torch.inference_mode():
        attn, x, keep = _attention_and_inputs()
        got = dispatch.head_attention("compact", x, keep, None, attn)
        want = dispatch.head_attention("reference", x, keep, None, attn)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,dtype", [((3, 4), torch.bool), ((4, 3), torch.bool), ((4, 5), torch.bool),
                                         ((4, 4), torch.float32)])
def test_compact_refuses_a_keep_mask_of_another_shape_or_dtype(shape, dtype):
    """A mask with fewer rows left those samples' output uninitialized, one with fewer columns
    silently dropped heads, and a float (soft) mask was read as kept wherever nonzero."""
    weights = _weights(32, 4, 8, 32)
    keep = (torch.arange(shape[0] * shape[1]).view(shape) % 3 == 0).to(dtype)
    with pytest.raises(ValueError, match=r"keep must be a bool \[B, H\] = \[4, 4\]"):
        compact.compact_head_attention(torch.randn(4, 5, 32), keep, *weights)


def test_compact_backend_sees_new_weights_at_the_old_address():
    """Weights replaced by new Parameters over storage at the old address (a reused load buffer;
    also what the CUDA caching allocator gives `.half().float()`), with the same version count:
    the cache must not serve head-major copies of the old weights."""
    from headsteer.kernels import dispatch

    attn, x, keep = _attention_and_inputs()
    layers = ((attn.qkv, "weight"), (attn.qkv, "bias"), (attn.proj, "weight"))
    originals = [getattr(layer, name).detach().numpy().copy() for layer, name in layers]
    buffers = [array.copy() for array in originals]
    with torch.no_grad():
        for scale in (1.0, 0.5):
            for (layer, name), array, buffer in zip(layers, originals, buffers):
                buffer[...] = array * scale
                setattr(layer, name, nn.Parameter(torch.from_numpy(buffer)))
            torch.testing.assert_close(dispatch.head_attention("compact", x, keep, None, attn),
                                       dispatch.head_attention("reference", x, keep, None, attn), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["all", "shared", "random"])
def test_compact_with_qk_norm_on_every_path(mask_kind):
    """q/k norms apply on every path, not only the mixed-count one: a batch that keeps every head
    (the one-group dense path), one shared head set (the head-run path) and per-sample sets."""
    heads, head_dim, batch = 4, 8, 5
    weights = _weights(32, heads, head_dim, 32)
    q_norm, k_norm = nn.LayerNorm(head_dim), nn.LayerNorm(head_dim)
    nn.init.normal_(q_norm.weight), nn.init.normal_(k_norm.bias)
    x = torch.randn(batch, 7, 32)
    keep = {"all": torch.ones(batch, heads, dtype=torch.bool),
            "shared": torch.tensor([True, False, True, True]).expand(batch, heads).clone(),
            "random": _masks("same_count", batch, heads)}[mask_kind]
    with torch.no_grad():
        expected = reference.head_attention(x, keep.float(), *weights, q_norm=q_norm, k_norm=k_norm)
        plain = reference.head_attention(x, keep.float(), *weights)
        out = compact.compact_head_attention(x, keep, *weights, q_norm=q_norm, k_norm=k_norm)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the norms matter at these weights
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch,tokens", [(1, 1), (1, 2), (3, 5)])
def test_compact_all_pruned_batch_is_a_fresh_contiguous_tensor(batch, tokens):
    """A batch that keeps no head gives the projection bias on every token, as a contiguous tensor
    of its own: not a broadcast view of proj_bias, which an in-place update of the branch (an
    in-place LayerScale) could not write, nor, at B * N = 1, proj_bias itself (what `.contiguous()`
    of the [1, 1, D] view returned: writing the branch wrote the weights)."""
    qkv_weight, qkv_bias, proj_weight, proj_bias, heads = _weights(16, 2, 8, 16)
    saved = proj_bias.clone()
    keep = torch.zeros(batch, heads, dtype=torch.bool)
    out = compact.compact_head_attention(torch.randn(batch, tokens, 16), keep, qkv_weight, qkv_bias, proj_weight,
                                         proj_bias, heads)
    assert out.shape == (batch, tokens, 16) and out.is_contiguous()
    assert torch.equal(out, saved.expand(batch, tokens, 16))
    out.mul_(2.0)
    assert torch.equal(proj_bias, saved)

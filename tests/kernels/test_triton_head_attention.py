"""The head-sparse Triton attention branch against `reference.head_attention`.

Runs compiled on CUDA and under TRITON_INTERPRET=1 on the CPU (set by conftest.py)."""
import dataclasses
import zlib

import pytest
import torch
from torch import nn

from headsteer.kernels import reference
from headsteer.kernels import triton_head_attention as attention_module
from headsteer.kernels.triton_head_attention import TileConfig, triton_head_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    """q/k/v and head-output scratch start as NaN: a slot a kernel reads but no kernel wrote (a
    work item skipped, a pruned pair read) turns the output NaN and fails the comparison."""

    def nan_scratch(shape, like):
        return torch.full(shape, float("nan"), device=like.device, dtype=like.dtype)

    monkeypatch.setattr(attention_module, "new_scratch", nan_scratch)


def make_branch(batch, tokens, heads, head_dim, seed, dtype=torch.float32, bias=True):
    """Random block input and attention weights scaled like a trained ViT (outputs O(1))."""
    g = torch.Generator().manual_seed(seed)
    dim = heads * head_dim
    tensors = dict(
        x=torch.randn(batch, tokens, dim, generator=g),
        qkv_weight=torch.randn(3 * dim, dim, generator=g) / dim**0.5,
        qkv_bias=0.2 * torch.randn(3 * dim, generator=g) if bias else None,
        proj_weight=torch.randn(dim, dim, generator=g) / dim**0.5,
        proj_bias=0.2 * torch.randn(dim, generator=g) if bias else None,
    )
    return {k: v.to(DEVICE, dtype) if v is not None else None for k, v in tensors.items()}


def make_mask(kind, batch, heads, seed):
    if kind == "none":
        return torch.zeros(batch, heads, dtype=torch.bool, device=DEVICE)
    if kind == "all":
        return torch.ones(batch, heads, dtype=torch.bool, device=DEVICE)
    if kind == "distinct":  # every sample a different subset (binary codes 1, 2, 3, ...)
        codes = torch.arange(1, batch + 1).remainder(2**heads)
        return ((codes[:, None] >> torch.arange(heads)) & 1).bool().to(DEVICE)
    return (torch.rand(batch, heads, generator=torch.Generator().manual_seed(seed)) < 0.5).to(DEVICE)


def reference_branch(branch, keep, heads, q_norm=None, k_norm=None):
    """The fp32 reference on the (possibly half-precision) values the kernel sees."""
    up = {k: v.float() if v is not None else None for k, v in branch.items()}
    norms = [None if n is None or isinstance(n, nn.Identity) else nn.LayerNorm(0).float() for n in (q_norm, k_norm)]
    for mine, theirs in zip(norms, (q_norm, k_norm)):
        if mine is not None:
            mine.normalized_shape, mine.eps = theirs.normalized_shape, theirs.eps
            mine.weight = None if theirs.weight is None else nn.Parameter(theirs.weight.detach().float())
            mine.bias = None if theirs.bias is None else nn.Parameter(theirs.bias.detach().float())
    with torch.no_grad():
        return reference.head_attention(up["x"], keep, up["qkv_weight"], up["qkv_bias"], up["proj_weight"],
                                        up["proj_bias"], heads, norms[0], norms[1])


def run_and_check(branch, keep, heads, q_norm=None, k_norm=None, out=None):
    expected = reference_branch(branch, keep, heads, q_norm, k_norm)
    if out is None:
        out = torch.empty_like(branch["x"], memory_format=torch.contiguous_format)
    out.fill_(float("nan"))  # poison: an element the kernels forget to write fails the comparison
    got = triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                                branch["proj_bias"], heads, q_norm, k_norm, out=out)
    assert got is out
    tol = TOLERANCE[branch["x"].dtype]
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    return got


@pytest.mark.parametrize(
    "batch,tokens,heads,head_dim",
    # N = 70 and 131: whole 64-key blocks, then a ragged tail of one or more narrow key blocks.
    [(1, 5, 2, 32), (3, 17, 3, 64), (5, 50, 6, 32), (3, 70, 2, 64), (2, 131, 2, 32), (1, 17, 2, 128), (2, 9, 3, 80)],
)
@pytest.mark.parametrize("mask", ["none", "all", "distinct", "random"])
def test_matches_reference_fp32(batch, tokens, heads, head_dim, mask):
    seed = zlib.crc32(repr((batch, tokens, heads, head_dim, mask)).encode())
    branch = make_branch(batch, tokens, heads, head_dim, seed)
    run_and_check(branch, make_mask(mask, batch, heads, seed), heads)


# Alternative tilings the benchmark sweep may pick, small and large, the output projection that
# tests each head in its loop (instead of the kept-head list the defaults take up to 8 heads), the
# list at every head count finding its rows by bits (in two tile sizes), q and k as one MMA, and
# narrow passes over ragged query and key ends, so every configuration is correct.
# Each overrides both the 16-bit and the fp32 defaults; launches then shrink what would not fit
# (`fit_tiles`).
TILE_VARIANTS = {
    "small": dict(qkv_block_n=16, qkv_block_k=16, attn_block_m=16, attn_block_n=16, proj_block_t=16, proj_block_o=32),
    "large": dict(qkv_block_n=128, qkv_block_k=32, attn_block_m=64, attn_block_n=128, attn_block_tail=32,
                  proj_block_t=128, proj_block_o=64),
    "head-branch": dict(proj_kept_list_max_heads=0),
    "row-bits": dict(proj_kept_list_max_heads=64, proj_list_row_bits=True),
    "row-bits-wide": dict(proj_kept_list_max_heads=64, proj_list_row_bits=True, proj_block_t=128, proj_block_o=256,
                          proj_warps=8),
    "fused-qk": dict(qkv_fuse_qk=True),
    "query-tail": dict(attn_block_m=32, attn_block_m_tail=16, attn_block_n=32),
    "narrow-tails": attention_module.NARROW_TAIL_TILES,  # (fp32 keeps whole key steps)
    "programmatic-launch": dict(programmatic_launch=True),  # (on sm_90 and later; the interpreter runs it plain)
    "qkv-narrow": dict(qkv_block_n=32, qkv_narrow_n=16),  # (QKV tiles narrowed to their kept rows)
}


@pytest.fixture(params=sorted(TILE_VARIANTS))
def tiles(request, monkeypatch):
    overrides = TILE_VARIANTS[request.param]
    monkeypatch.setattr(attention_module, "TILES", dataclasses.replace(attention_module.TILES, **overrides))
    monkeypatch.setattr(attention_module, "TILES_FP32", dataclasses.replace(attention_module.TILES_FP32, **overrides))
    return request.param


@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(1, 5, 1, 32), (3, 17, 3, 64), (5, 50, 6, 32), (2, 9, 5, 80)])
@pytest.mark.parametrize("mask", ["none", "all", "distinct", "random"])
def test_tile_variants_match_reference(tiles, batch, tokens, heads, head_dim, mask):
    seed = zlib.crc32(repr((tiles, batch, tokens, heads, head_dim, mask)).encode())
    branch = make_branch(batch, tokens, heads, head_dim, seed)
    run_and_check(branch, make_mask(mask, batch, heads, seed), heads)


def test_tile_variants_with_qk_norm(tiles):
    branch = make_branch(3, 17, 3, 32, 13)
    run_and_check(branch, make_mask("distinct", 3, 3, 13), 3, layer_norm(32, True, True, 14), layer_norm(32, True, False, 15))


@pytest.mark.parametrize("tokens", [33, 40, 47, 48, 49, 70])
@pytest.mark.parametrize("keep_rows", [((1, 0), (0, 1)), ((0, 1), (1, 0)), ((1, 1), (0, 1))])
def test_qkv_narrow_passes_at_their_bounds(monkeypatch, tokens, keep_rows):
    """32-token QKV tiles narrowed to 16 rows (`qkv_narrow_n`), two samples keeping different
    heads: the tile over rows 32-63 holds 15 of sample 0's rows and 17 of sample 1's at N=47, 16
    and 16 at N=48, 17 and 15 at N=49 (and 8 / 24 at N=40, 1 / 31 at N=33), so each head's kept
    span there is one row, just under, at or just over the narrow pass's 16 rows; at N=70 a narrow pass starting at row
    70 reaches past its tile (rows 96-101 of sample 1, kept by the next tile's program)."""
    tiles = dataclasses.replace(attention_module.TILES_FP32, qkv_block_n=32, qkv_narrow_n=16)
    monkeypatch.setattr(attention_module, "TILES_FP32", tiles)
    assert attention_module.tiles_for(32, torch.float32).qkv_narrow_n == 16
    branch = make_branch(2, tokens, 2, 32, zlib.crc32(repr((tokens, keep_rows)).encode()))
    run_and_check(branch, torch.tensor(keep_rows, dtype=torch.bool, device=DEVICE), 2)


def test_fit_tiles_keeps_narrow_qkv_passes_narrower_than_the_tile():
    fit = attention_module.fit_tiles
    assert fit(TileConfig(qkv_block_n=128, qkv_warps=8, qkv_narrow_n=64), 64, 2).qkv_narrow_n == 64
    assert fit(TileConfig(qkv_block_n=64, qkv_narrow_n=64), 64, 2).qkv_narrow_n == 0  # (as wide as the tile)
    assert fit(TileConfig(qkv_block_n=128, qkv_warps=8, qkv_narrow_n=8), 64, 2).qkv_narrow_n == 0  # (under 16)
    # a tile shrunk for wide fp32 heads takes the narrow pass with it
    shrunk = fit(TileConfig(qkv_block_n=128, qkv_narrow_n=64, qkv_warps=4), 128, 4)
    assert shrunk.qkv_block_n <= 64 and shrunk.qkv_narrow_n == 0
    with pytest.raises(ValueError, match="qkv_narrow_n must be 0 or a power of two, got 24"):
        fit(TileConfig(qkv_block_n=32, qkv_narrow_n=24), 64, 2)  # (Triton's arange would refuse it mid-launch)


def dtypes_here():
    """bf16 runs compiled only: Triton's CPU interpreter miscomputes bf16 tl.dot (see the launcher)."""
    return [torch.float16, torch.bfloat16] if torch.cuda.is_available() else [torch.float16]


@pytest.mark.parametrize("dtype", dtypes_here())
# (head dim 16: the narrowest head tile tl.dot takes)
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(3, 17, 3, 64), (5, 50, 6, 32), (5, 17, 3, 16)])
def test_matches_reference_half(dtype, batch, tokens, heads, head_dim):
    seed = zlib.crc32(repr((dtype, batch, tokens, heads, head_dim)).encode())
    branch = make_branch(batch, tokens, heads, head_dim, seed, dtype)
    run_and_check(branch, make_mask("random", batch, heads, seed), heads)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter's refusal")
def test_bf16_under_interpreter_is_a_clear_error():
    branch = make_branch(1, 5, 2, 32, 0, torch.bfloat16)
    with pytest.raises(NotImplementedError, match="bf16"):
        run_and_check(branch, make_mask("all", 1, 2, 0), 2)


def uneven_mask(batch, heads, seed):
    """Heads kept by very different numbers of samples, so QKV token tiles mix samples that keep
    a head with samples that prune it: head 0 by one sample mid-batch, head 1 by all but one,
    head 2 by none, the rest at random."""
    keep = make_mask("random", batch, heads, seed)
    keep[:, 0] = False
    keep[batch // 2, 0] = True
    keep[:, 1] = True
    keep[batch - 1, 1] = False
    if heads > 2:
        keep[:, 2] = False
    return keep


# (batch, tokens): N=23 puts up to 4 samples in a 64-token QKV tile, N=70 two, N=3 the whole
# batch in one tile; batch 1; a batch of 33.
@pytest.mark.parametrize("batch,tokens", [(1, 23), (7, 23), (33, 23), (5, 70), (6, 3)])
def test_uneven_heads(batch, tokens):
    seed = zlib.crc32(repr(("uneven heads", batch, tokens)).encode())
    branch = make_branch(batch, tokens, 4, 32, seed)
    run_and_check(branch, uneven_mask(batch, 4, seed), 4)


@pytest.mark.parametrize("heads,kept_list", [(6, True), (8, True), (9, False), (12, False)])
def test_projection_walks_a_kept_head_list_up_to_8_heads(monkeypatch, heads, kept_list):
    """The output projection walks a list of kept heads for models of up to
    proj_kept_list_max_heads (8) heads and tests each head in its loop above; both exact."""
    launched = []
    projection = attention_module._proj_kernel

    class RecordingKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["KEPT_LIST"])
                return projection[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attention_module, "_proj_kernel", RecordingKernel())
    seed = zlib.crc32(repr(("kept list", heads)).encode())
    branch = make_branch(3, 17, heads, 16, seed)
    run_and_check(branch, make_mask("random", 3, heads, seed), heads)
    assert launched == [kept_list]


@pytest.mark.parametrize("heads", [40, 64])
def test_row_bits_past_32_heads(monkeypatch, heads):
    """The kept-head list's per-row bits are 64 wide: heads 32-63 must land in the high word."""
    tiles = dataclasses.replace(attention_module.TILES_FP32, proj_kept_list_max_heads=64, proj_list_row_bits=True)
    monkeypatch.setattr(attention_module, "TILES_FP32", tiles)
    seed = zlib.crc32(repr(("row bits", heads)).encode())
    branch = make_branch(3, 7, heads, 16, seed)
    keep = make_mask("random", 3, heads, seed)
    keep[0, 33:] = False  # sample 0 keeps no high head, sample 1 only high ones
    keep[1, :32] = False
    keep[1, heads - 1] = True
    run_and_check(branch, keep, heads)


@pytest.mark.parametrize("bias", [True, False])
def test_no_head_kept_gives_exactly_the_bias(bias):
    branch = make_branch(3, 17, 3, 32, 1, bias=bias)
    got = run_and_check(branch, make_mask("none", 3, 3, 0), 3)
    expected = branch["proj_bias"].expand_as(got) if bias else torch.zeros_like(got)
    assert torch.equal(got, expected)


def test_without_biases():
    branch = make_branch(3, 17, 3, 32, 2, bias=False)
    run_and_check(branch, make_mask("random", 3, 3, 2), 3)


@pytest.mark.parametrize("kept_list_max_heads", [8, 0])  # (the projection's kept-head list, its per-head branch)
def test_pruned_heads_are_never_read(monkeypatch, kept_list_max_heads):
    """NaN weights of a head pruned in every sample (its Q/K/V rows and W_o columns) must not
    reach the output: a kernel that touched them, even to multiply by zero, would yield NaN."""
    monkeypatch.setattr(attention_module, "TILES_FP32", dataclasses.replace(
        attention_module.TILES_FP32, proj_kept_list_max_heads=kept_list_max_heads))
    heads, head_dim = 3, 32
    branch = make_branch(3, 17, heads, head_dim, 3)
    keep = make_mask("all", 3, heads, 0)
    keep[:, 1] = False
    expected = reference_branch(branch, keep, heads)
    for part in range(3):
        rows = slice((part * heads + 1) * head_dim, (part * heads + 2) * head_dim)
        branch["qkv_weight"][rows] = float("nan")
        branch["qkv_bias"][rows] = float("nan")
    branch["proj_weight"][:, head_dim : 2 * head_dim] = float("nan")
    got = triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                                branch["proj_bias"], heads)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def layer_norm(head_dim, affine, bias, seed, dtype=torch.float32):
    norm = nn.LayerNorm(head_dim, eps=1e-5, elementwise_affine=affine, bias=bias)
    if affine:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            norm.weight.copy_(1 + 0.3 * torch.randn(head_dim, generator=g))
            if bias:
                norm.bias.copy_(0.3 * torch.randn(head_dim, generator=g))
    return norm.to(DEVICE, dtype)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_qk_layer_norm(affine, bias):
    branch = make_branch(3, 17, 3, 64, 4)
    run_and_check(branch, make_mask("distinct", 3, 3, 4), 3, layer_norm(64, affine, bias, 5), layer_norm(64, affine, bias, 6))


def test_q_norm_only_and_identity_norms():
    branch = make_branch(2, 9, 2, 32, 7)
    keep = make_mask("all", 2, 2, 0)
    run_and_check(branch, keep, 2, layer_norm(32, True, True, 8), nn.Identity())


def test_qk_layer_norm_with_strided_parameters():
    """q/k norm weights and biases that are strided views (every other element of a longer
    vector) are read through their values, not as if contiguous."""
    branch = make_branch(2, 9, 2, 32, 45)
    g = torch.Generator().manual_seed(45)
    norms = [layer_norm(32, True, True, 46), layer_norm(32, True, True, 47)]
    for norm in norms:
        norm.weight = nn.Parameter((1 + 0.3 * torch.randn(64, generator=g)).to(DEVICE)[::2])
        norm.bias = nn.Parameter((0.3 * torch.randn(64, generator=g)).to(DEVICE)[::2])
        assert not norm.weight.is_contiguous()
    run_and_check(branch, make_mask("random", 2, 2, 45), 2, *norms)


def test_unsupported_norm_is_refused():
    branch = make_branch(1, 5, 2, 32, 9)
    keep = make_mask("all", 1, 2, 0)
    for bad in (nn.RMSNorm(32), nn.LayerNorm(64)):
        with pytest.raises(NotImplementedError, match="LayerNorm"):
            triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"],
                                  branch["proj_weight"], branch["proj_bias"], 2, bad, None)


def test_strided_input_and_output():
    """x and out as non-contiguous views (e.g. a slice of a larger buffer) are read and written
    through their strides."""
    branch = make_branch(3, 17, 2, 32, 10)
    wide = torch.empty(3, 17, 128, device=DEVICE)
    branch["x"] = wide.narrow(-1, 0, 64).copy_(branch["x"])  # row stride 128, not 64
    out = torch.empty(17, 3, 64, device=DEVICE).transpose(0, 1)
    run_and_check(branch, make_mask("random", 3, 2, 10), 2, out=out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", ["none", "all", "random"])
@pytest.mark.parametrize("with_layer_scale", [True, False])
def test_residual_and_layer_scale_in_the_epilogue(dtype, mask, with_layer_scale):
    """residual + layer_scale * branch (a pre-norm block's update) against the reference branch."""
    seed = zlib.crc32(repr((dtype, mask, with_layer_scale)).encode())
    branch = make_branch(3, 17, 3, 32, seed, dtype)
    keep = make_mask(mask, 3, 3, seed)
    g = torch.Generator().manual_seed(seed)
    residual = torch.randn(17, 3, 96, generator=g).to(DEVICE, dtype).transpose(0, 1)  # strided, as a view may be
    gamma = (0.1 + torch.rand(96, generator=g)).to(DEVICE, dtype) if with_layer_scale else None
    update = reference_branch(branch, keep, 3) * (1.0 if gamma is None else gamma.float())
    expected = residual.float() + update
    got = triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                                branch["proj_bias"], 3, residual=residual, layer_scale=gamma)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), expected, atol=tol, rtol=tol)
    # In place: out is the residual itself (every element is read before its own program writes it).
    in_place = residual.clone()
    triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                          branch["proj_bias"], 3, residual=in_place, layer_scale=gamma, out=in_place)
    torch.testing.assert_close(in_place, got, atol=0, rtol=0)


def test_residual_and_layer_scale_shapes_are_checked():
    branch = make_branch(2, 5, 2, 32, 11)
    args = (branch["x"], make_mask("all", 2, 2, 0), branch["qkv_weight"], None, branch["proj_weight"], None, 2)
    with pytest.raises(ValueError, match="residual"):
        triton_head_attention(*args, residual=torch.zeros(2, 5, 32, device=DEVICE))
    with pytest.raises(ValueError, match="layer_scale"):
        triton_head_attention(*args, residual=torch.zeros(2, 5, 64, device=DEVICE), layer_scale=torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match="residual too"):
        triton_head_attention(*args, layer_scale=torch.ones(64, device=DEVICE))
    shared = torch.zeros(2, 6, 64, device=DEVICE)  # out one token ahead of residual in one buffer
    with pytest.raises(ValueError, match="shares memory"):
        triton_head_attention(*args, residual=shared[:, :5], out=shared[:, 1:])


def test_empty_batch_or_sequence_launches_nothing():
    """B=0 or N=0: the output is the empty [B, N, D_out] tensor and there is no launch (a grid
    of zero programs is an invalid CUDA launch)."""
    branch = make_branch(2, 5, 2, 32, 48)
    keep = make_mask("all", 2, 2, 0)
    for x, mask in ((branch["x"][:0], keep[:0]), (branch["x"][:, :0], keep)):
        out, launches = attention_module.head_attention_launches(x, mask, branch["qkv_weight"], branch["qkv_bias"],
                                                                 branch["proj_weight"], branch["proj_bias"], 2)
        assert launches == [] and out.shape == (*x.shape[:2], 64)


def test_out_over_residual_memory_in_another_layout_is_refused():
    """out starting at the residual's first element but laid out differently (its transpose in
    the same buffer) would overwrite residual elements before other programs read them."""
    branch = make_branch(2, 5, 2, 32, 49)
    buffer = torch.zeros(2 * 5 * 64, device=DEVICE)
    residual, out = buffer.view(2, 5, 64), buffer.view(2, 64, 5).transpose(1, 2)
    assert out.data_ptr() == residual.data_ptr() and out.stride() != residual.stride()
    with pytest.raises(ValueError, match="shares memory"):
        triton_head_attention(branch["x"], make_mask("all", 2, 2, 0), branch["qkv_weight"], None,
                              branch["proj_weight"], None, 2, residual=residual, out=out)


def test_strided_bias_and_layer_scale_vectors():
    """Biases and the layer scale as strided views (every other element of a longer vector)."""
    branch = make_branch(3, 17, 3, 32, 23)
    g = torch.Generator().manual_seed(23)
    branch["qkv_bias"] = torch.randn(2 * 288, generator=g).to(DEVICE)[::2]
    branch["proj_bias"] = torch.randn(2 * 96, generator=g).to(DEVICE)[::2]
    gamma = torch.rand(2 * 96, generator=g).to(DEVICE)[::2]
    residual = torch.randn(3, 17, 96, generator=g).to(DEVICE)
    keep = make_mask("random", 3, 3, 23)
    expected = residual + reference_branch(branch, keep, 3) * gamma
    got = triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                                branch["proj_bias"], 3, residual=residual, layer_scale=gamma)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_shape_errors():
    branch = make_branch(2, 5, 2, 32, 11)
    with pytest.raises(ValueError, match="keep"):
        triton_head_attention(branch["x"], make_mask("all", 3, 2, 0), branch["qkv_weight"], None,
                              branch["proj_weight"], None, 2)
    with pytest.raises(ValueError, match="qkv_weight"):
        triton_head_attention(branch["x"], make_mask("all", 2, 5, 0), branch["qkv_weight"], None,
                              branch["proj_weight"], None, 5)


def test_weights_must_share_the_input_dtype():
    branch = make_branch(2, 5, 2, 32, 12)
    with pytest.raises(TypeError, match="dtype"):
        triton_head_attention(branch["x"].half(), make_mask("all", 2, 2, 0), branch["qkv_weight"], None,
                              branch["proj_weight"], None, 2)


def test_malformed_inputs_are_refused_naming_the_argument(monkeypatch):
    """Each malformed input is refused before any launch, naming it: x not [B, N, D], qkv_weight
    with the wrong number of inputs, keep with one head too many, qkv_weight alone in another
    dtype."""
    monkeypatch.setattr(attention_module, "_qkv_kernel", None)  # any launch would fail differently
    branch = make_branch(2, 5, 2, 32, 44)
    x, qkv_weight, proj_weight = branch["x"], branch["qkv_weight"], branch["proj_weight"]
    keep = make_mask("all", 2, 2, 0)
    with pytest.raises(ValueError, match=r"x must be \[B, N, D\], got \(5, 64\)"):
        triton_head_attention(x[0], keep, qkv_weight, None, proj_weight, None, 2)
    with pytest.raises(ValueError, match=r"qkv_weight \(192, 32\) does not fit D=64"):
        triton_head_attention(x, keep, qkv_weight[:, :32], None, proj_weight, None, 2)
    with pytest.raises(ValueError, match=r"keep must be \[2, 2\], got \(2, 3\)"):
        triton_head_attention(x, make_mask("all", 2, 3, 0), qkv_weight, None, proj_weight, None, 2)
    with pytest.raises(TypeError, match="qkv_weight .* must have x's dtype"):
        triton_head_attention(x, keep, qkv_weight.half(), None, proj_weight, None, 2)


@pytest.mark.parametrize("length", [1, 5, 16, 17, 50, 64, 131, 197, 240, 577])
@pytest.mark.parametrize("block,narrowest", [(64, 16), (32, 16), (128, 32), (16, 16)])
def test_ragged_step_covers_the_ragged_end_in_one_pass(length, block, narrowest):
    step = attention_module.ragged_step(length, block, narrowest)
    assert step & (step - 1) == 0 and narrowest <= step <= block  # a power of two tl.arange accepts
    ragged = length % block
    if ragged:  # one pass covers what the whole tiles leave over, and is no wider than it needs
        assert ragged <= step < 2 * max(narrowest, ragged)
    else:  # no ragged end: the kernel never takes the tail path
        assert step == block


def test_ragged_step_is_never_wider_than_the_tile():
    assert attention_module.ragged_step(17, 16, 64) == 16  # (`narrowest` past the tile gives way)


def test_fit_tiles_keeps_the_tuned_defaults_and_shrinks_wide_rows():
    fit = attention_module.fit_tiles
    # The tuned configurations (d=64) run as they are.
    assert fit(attention_module.TILES, 64, 2) == attention_module.TILES
    assert fit(attention_module.TILES_FP32, 64, 4) == attention_module.TILES_FP32
    # fp32 rows of a 128-wide head: smaller key tiles and token tiles, never below 16.
    wide = fit(attention_module.TILES_FP32, 128, 4)
    assert 16 <= wide.attn_block_n < attention_module.TILES_FP32.attn_block_n
    assert 16 <= wide.qkv_block_n < attention_module.TILES_FP32.qkv_block_n
    assert 16 <= wide.attn_block_m < attention_module.TILES_FP32.attn_block_m
    assert wide.attn_block_tail <= wide.attn_block_n
    huge = fit(TileConfig(qkv_block_n=256, qkv_block_k=256, attn_block_n=256, proj_block_o=256), 1024, 4)
    assert min(huge.qkv_block_n, huge.qkv_block_k, huge.attn_block_n, huge.proj_block_o) == 16


def test_fit_tiles_rules_at_their_bounds():
    """Each shrinking rule of `fit_tiles` as its docstring states it, on 16-bit rows of a 128-wide
    head: the ragged query and key passes never wider than the tiles they end, the QKV weight tiles
    counted in the shared-memory budget (3 x BLOCK_D rows per step), the projection's token tile
    beside its column tile."""
    fit = attention_module.fit_tiles
    attention = fit(TileConfig(attn_block_m=128, attn_block_m_tail=128, attn_block_n=256, attn_block_tail=256), 128, 2)
    assert (attention.attn_block_m, attention.attn_block_m_tail) == (64, 64)  # 2 x 128 x 128 > 128 x 32 x 4
    assert (attention.attn_block_n, attention.attn_block_tail) == (64, 64)  # 8 x 128 x 128 x 2 > 200 KiB
    # QKV: 3 x (32 + 3 x 128) x 128 x 2 bytes > 200 KiB, at 64-wide reduction steps 156 KiB
    assert fit(TileConfig(qkv_block_k=256), 128, 2).qkv_block_k == 64
    # projection: 3 x (64 + 256) x 128 x 2 bytes > 200 KiB, at 128 columns 144 KiB
    assert fit(TileConfig(proj_block_t=64, proj_block_o=256), 128, 2).proj_block_o == 128


def test_tiles_for_fits_the_dtypes_tiles_to_the_padded_head():
    """fp32 launches fit TILES_FP32 to 4-byte rows, 16-bit ones TILES to 2-byte rows, both
    at the head dim padded to a power of two (at least 16: tl.dot's narrowest tile)."""
    fit = attention_module.fit_tiles
    assert [attention_module.head_block(d) for d in (1, 8, 16, 17, 64, 80)] == [16, 16, 16, 32, 64, 128]
    assert attention_module.tiles_for(80, torch.float32) == fit(attention_module.TILES_FP32, 128, 4)
    assert attention_module.tiles_for(80, torch.float16) == fit(attention_module.TILES, 128, 2)
    assert attention_module.tiles_for(128, torch.float32) != attention_module.tiles_for(128, torch.float16)


def test_tile_config_swaps_the_defaults_inside_the_block_only():
    """`tile_config` (tile sweeps, compile reports) launches with the given tiles inside its
    block, keeps the fp32 defaults unless fp32 tiles are given, and restores both after, even
    when the block raises."""
    tiles, fp32_tiles = TileConfig(attn_block_m=32), TileConfig(attn_block_m=16)
    defaults = attention_module.TILES, attention_module.TILES_FP32
    with attention_module.tile_config(tiles):
        assert (attention_module.TILES, attention_module.TILES_FP32) == (tiles, defaults[1])
    assert (attention_module.TILES, attention_module.TILES_FP32) == defaults
    with pytest.raises(RuntimeError, match="inside"):
        with attention_module.tile_config(tiles, fp32_tiles):
            assert (attention_module.TILES, attention_module.TILES_FP32) == (tiles, fp32_tiles)
            raise RuntimeError("inside")
    assert (attention_module.TILES, attention_module.TILES_FP32) == defaults


@pytest.mark.parametrize("block_d", [32, 64, 128])
def test_fp32_takes_its_ragged_keys_in_a_whole_key_step(block_d):
    """A 16-key 3xTF32 step under 64-query tiles in 8 warps faulted on an H100 (see fit_tiles):
    fp32 tiles never get a key tail narrower than their key step; 16-bit ones keep theirs."""
    narrow = TileConfig(**attention_module.NARROW_TAIL_TILES, attn_warps=8)
    fp32 = attention_module.fit_tiles(narrow, block_d, 4)
    assert fp32.attn_block_tail == fp32.attn_block_n
    assert fp32.attn_block_m_tail == 16  # (narrow query passes ran exact on the H100)
    assert attention_module.fit_tiles(narrow, block_d, 2).attn_block_tail == 16
    assert attention_module.tiles_for(block_d, torch.float32).attn_block_tail == attention_module.tiles_for(
        block_d, torch.float32).attn_block_n


# The default launches, and programmatic dependent launches (captured as programmatic edges),
# which a graph must capture as well.
GRAPH_LAUNCHES = {"defaults": {}, "programmatic-launch": dict(programmatic_launch=True)}


@cuda_only
@pytest.mark.parametrize("launches", sorted(GRAPH_LAUNCHES))
def test_no_host_sync_and_graph_replay_with_new_mask(monkeypatch, launches):
    """The branch makes no host synchronization, and a CUDA graph of it replays correctly after
    the keep mask changes in place."""
    monkeypatch.setattr(attention_module, "TILES", dataclasses.replace(attention_module.TILES,
                                                                       **GRAPH_LAUNCHES[launches]))
    heads = 6
    branch = make_branch(5, 50, heads, 64, 12, torch.bfloat16)
    args = (branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"], branch["proj_bias"], heads)
    keep = make_mask("random", 5, heads, 12)
    triton_head_attention(branch["x"], keep, *args)  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_head_attention(branch["x"], keep, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_head_attention(branch["x"], keep, *args)
    for mask in ("distinct", "none", "all"):
        keep.copy_(make_mask(mask, 5, heads, 0))
        out.fill_(float("nan"))
        graph.replay()
        expected = reference_branch(branch, keep, heads)
        torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("where", ["keep", "proj_weight", "k_norm", "out"])
def test_a_tensor_on_another_device_is_refused_before_any_launch(monkeypatch, where):
    """Kernels read raw pointers: a tensor elsewhere (here on `meta`) would fault a GPU."""
    monkeypatch.setattr(attention_module, "_qkv_kernel", None)  # any launch would fail differently
    branch = make_branch(2, 5, 2, 16, 3)
    keep = make_mask("all", 2, 2, 3)
    k_norm = layer_norm(16, True, True, 4)
    out = torch.empty_like(branch["x"])
    if where == "keep":
        keep = keep.to("meta")
    elif where == "proj_weight":
        branch["proj_weight"] = branch["proj_weight"].to("meta")
    elif where == "k_norm":
        k_norm = k_norm.to("meta")
    else:
        out = out.to("meta")
    with pytest.raises(ValueError, match=f"{where}[.a-z]* on meta"):
        triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                              branch["proj_bias"], 2, None, k_norm, out=out)


def test_launches_run_with_the_inputs_device_current(monkeypatch):
    """Triton launches on the current CUDA device: the three launches run inside
    launch_device(x.device), none before or after it."""
    import contextlib

    events = []

    @contextlib.contextmanager
    def recording_launch_device(device):
        events.append(("enter", device))
        yield
        events.append(("exit", device))

    for name in ("_qkv_kernel", "_attention_kernel", "_proj_kernel"):
        kernel = getattr(attention_module, name)

        class Recording:
            def __getitem__(self, grid, kernel=kernel, name=name):
                def launch(*args, **kwargs):
                    events.append(name)
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(attention_module, name, Recording())
    monkeypatch.setattr(attention_module, "launch_device", recording_launch_device)
    branch = make_branch(2, 5, 2, 16, 5)
    run_and_check(branch, make_mask("random", 2, 2, 5), 2)
    device = branch["x"].device
    assert events == [("enter", device), "_qkv_kernel", "_attention_kernel", "_proj_kernel", ("exit", device)]


def test_launch_device_makes_another_gpu_current(monkeypatch):
    import contextlib

    from headsteer.kernels import aot

    made_current = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: made_current.append(device) or "guard")
    assert aot.launch_device(torch.device("cuda", 1)) == "guard" and made_current == [torch.device("cuda", 1)]
    for device in (torch.device("cuda", 0), torch.device("cpu")):
        assert isinstance(aot.launch_device(device), contextlib.nullcontext)
    assert made_current == [torch.device("cuda", 1)]


# Inputs the launcher accepts but the cases above never vary: one bias without the other, q/k
# norms' own eps and a padded head dim under them, fused q|k with one norm, innermost strides
# and a transposed keep, a projection to another width, one-token ragged ends; and refusals.
@pytest.mark.parametrize("qkv_bias,proj_bias", [(True, False), (False, True)])
def test_qkv_bias_and_proj_bias_each_alone(qkv_bias, proj_bias):
    """timm blocks built with qkv_bias=False keep the projection's bias (and a bias may be dropped
    from either): each bias is added exactly when it is given."""
    branch = make_branch(3, 17, 3, 32, 31)
    if not qkv_bias:
        branch["qkv_bias"] = None
    if not proj_bias:
        branch["proj_bias"] = None
    run_and_check(branch, make_mask("random", 3, 3, 31), 3)


def test_qk_layer_norms_use_their_own_eps():
    """q_norm and k_norm each normalize with their own eps (here far from the 1e-5 default, so a
    dropped or swapped eps changes the scores well past the tolerance)."""
    branch = make_branch(3, 17, 3, 32, 32)
    q_norm, k_norm = layer_norm(32, True, True, 33), layer_norm(32, True, True, 34)
    q_norm.eps, k_norm.eps = 0.5, 4.0
    run_and_check(branch, make_mask("distinct", 3, 3, 32), 3, q_norm, k_norm)


def test_qk_layer_norm_of_a_padded_head_dim():
    """d=80 runs in 128-column tiles: the q/k LayerNorm's statistics are over the 80 real
    columns only."""
    branch = make_branch(2, 9, 2, 80, 35)
    run_and_check(branch, make_mask("all", 2, 2, 35), 2, layer_norm(80, True, True, 36), layer_norm(80, False, False, 37))


@pytest.mark.parametrize("which", ["q", "k"])
def test_fused_qk_tiles_with_one_norm(monkeypatch, which):
    """qkv_fuse_qk tiles with only a q or only a k LayerNorm project q and k apart (the norm
    applies to one of them)."""
    for name in ("TILES", "TILES_FP32"):
        monkeypatch.setattr(attention_module, name, dataclasses.replace(getattr(attention_module, name), qkv_fuse_qk=True))
    branch = make_branch(3, 17, 3, 32, 38)
    norm = layer_norm(32, True, True, 39)
    run_and_check(branch, make_mask("random", 3, 3, 38), 3, *((norm, None) if which == "q" else (None, norm)))


def test_launches_take_the_fused_qk_and_ragged_end_widths_they_are_given(monkeypatch):
    """Choices that only change speed, so no comparison of outputs sees them, reach the kernels:
    q|k as one MMA when the tiles ask for it and no q/k norm keeps them apart, and passes over
    the ragged query and key ends as wide as `ragged_step` makes them (N=40: 8 queries past
    32-query tiles take a 16-row pass, 40 keys under one 64-key step a whole 64-key one)."""
    monkeypatch.setattr(attention_module, "TILES", dataclasses.replace(
        attention_module.TILES, qkv_fuse_qk=True, attn_block_m=32, attn_block_m_tail=16, attn_block_n=64,
        attn_block_tail=16))
    launched = {}
    for name in ("_qkv_kernel", "_attention_kernel"):
        kernel = getattr(attention_module, name)

        class Recording:
            def __getitem__(self, grid, kernel=kernel, name=name):
                def launch(*args, **kwargs):
                    launched[name] = kwargs
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(attention_module, name, Recording())
    branch = make_branch(1, 40, 1, 32, 50, torch.float16)
    run_and_check(branch, make_mask("all", 1, 1, 50), 1)
    assert launched["_qkv_kernel"]["FUSE_QK"]
    assert (launched["_attention_kernel"]["BLOCK_M_TAIL"], launched["_attention_kernel"]["BLOCK_TAIL"]) == (16, 64)
    run_and_check(branch, make_mask("all", 1, 1, 51), 1, None, layer_norm(32, True, True, 52, torch.float16))
    assert not launched["_qkv_kernel"]["FUSE_QK"]


def test_strided_last_dims_weights_and_keep():
    """Every tensor through its own strides, the innermost included: x, out and the residual with
    every other element of their last dim, both weight matrices column-major, keep transposed."""
    batch, tokens, heads, head_dim = 3, 17, 3, 32
    dim = heads * head_dim
    branch = make_branch(batch, tokens, heads, head_dim, 40)
    g = torch.Generator().manual_seed(40)
    keep = make_mask("random", batch, heads, 40)
    keep[0, 0], keep[0, 1] = True, False  # (keep[b, h] != keep[h, b] somewhere)
    keep[1, 0] = True
    expected_branch = reference_branch(branch, keep, heads)
    keep = keep.t().contiguous().t()
    assert keep.stride() == (1, batch)
    branch["x"] = torch.zeros(batch, tokens, 2 * dim, device=DEVICE)[..., ::2].copy_(branch["x"])
    for name in ("qkv_weight", "proj_weight"):
        branch[name] = branch[name].t().contiguous().t()
        assert branch[name].stride(1) != 1
    out = torch.zeros(batch, tokens, 2 * dim, device=DEVICE)[..., ::2]
    run_and_check(branch, keep, heads, out=out)
    residual = torch.zeros(batch, tokens, 2 * dim, device=DEVICE)[..., ::2].copy_(torch.randn(batch, tokens, dim, generator=g))
    gamma = (0.1 + torch.rand(dim, generator=g)).to(DEVICE)
    out = torch.zeros(batch, tokens, 2 * dim, device=DEVICE)[..., 1::2]
    got = triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                                branch["proj_bias"], heads, residual=residual, layer_scale=gamma, out=out)
    torch.testing.assert_close(got, residual + gamma * expected_branch, atol=1e-4, rtol=1e-4)


def test_projection_to_another_width():
    """proj_weight [D_out, H*d] with D_out != H*d (160 and 48 columns from 96): out, bias,
    residual and layer scale are D_out wide."""
    batch, tokens, heads, head_dim = 3, 17, 3, 32
    for d_out in (160, 48):
        branch = make_branch(batch, tokens, heads, head_dim, d_out)
        g = torch.Generator().manual_seed(d_out)
        branch["proj_weight"] = (torch.randn(d_out, heads * head_dim, generator=g) / 10).to(DEVICE)
        branch["proj_bias"] = (0.2 * torch.randn(d_out, generator=g)).to(DEVICE)
        keep = make_mask("random", batch, heads, d_out)
        run_and_check(branch, keep, heads, out=torch.empty(batch, tokens, d_out, device=DEVICE))
        residual = torch.randn(batch, tokens, d_out, generator=g).to(DEVICE)
        gamma = (0.1 + torch.rand(d_out, generator=g)).to(DEVICE)
        got = triton_head_attention(branch["x"], keep, branch["qkv_weight"], branch["qkv_bias"], branch["proj_weight"],
                                    branch["proj_bias"], heads, residual=residual, layer_scale=gamma)
        expected = residual + gamma * reference_branch(branch, keep, heads)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_launcher_refuses_mismatched_proj_weight_and_out():
    branch = make_branch(2, 5, 2, 32, 41)
    keep = make_mask("all", 2, 2, 0)
    x, qkv_weight, proj_weight = branch["x"], branch["qkv_weight"], branch["proj_weight"]
    with pytest.raises(TypeError, match="dtype"):  # (proj_weight alone in another dtype)
        triton_head_attention(x, keep, qkv_weight, None, proj_weight.half(), None, 2)
    with pytest.raises(ValueError, match="proj_weight"):  # (takes 48 inputs, not 2 x 32)
        triton_head_attention(x, keep, qkv_weight, None, proj_weight[:, :48], None, 2)
    with pytest.raises(ValueError, match="out must be"):
        triton_head_attention(x, keep, qkv_weight, None, proj_weight, None, 2, out=torch.empty(2, 5, 32, device=DEVICE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU interpreter's refusal")
def test_bf16_out_under_interpreter_is_a_clear_error():
    branch = make_branch(1, 5, 2, 32, 0)
    out = torch.empty(1, 5, 64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(NotImplementedError, match="bf16"):
        triton_head_attention(branch["x"], make_mask("all", 1, 2, 0), branch["qkv_weight"], branch["qkv_bias"],
                              branch["proj_weight"], branch["proj_bias"], 2, out=out)


@pytest.mark.parametrize("where", ["qkv_bias", "proj_bias", "residual", "layer_scale", "q_norm"])
def test_an_optional_tensor_on_another_device_is_refused(monkeypatch, where):
    """Biases, the residual, the layer scale and the norms are device-checked like the rest."""
    monkeypatch.setattr(attention_module, "_qkv_kernel", None)
    branch = make_branch(2, 5, 2, 16, 42)
    tensors = dict(residual=torch.zeros(2, 5, 32, device=DEVICE), layer_scale=torch.ones(32, device=DEVICE),
                   q_norm=layer_norm(16, True, True, 43))
    if where in branch:
        branch[where] = branch[where].to("meta")
    else:
        tensors[where] = tensors[where].to("meta")
    with pytest.raises(ValueError, match=f"{where}[.a-z]* on meta"):
        triton_head_attention(branch["x"], make_mask("all", 2, 2, 42), branch["qkv_weight"], branch["qkv_bias"],
                              branch["proj_weight"], branch["proj_bias"], 2, tensors["q_norm"], None,
                              residual=tensors["residual"], layer_scale=tensors["layer_scale"])


@pytest.mark.parametrize("tokens,overrides", [(65, {}), (33, dict(attn_block_m=32, attn_block_m_tail=16, attn_block_n=32)),
                                              (17, dict(attn_block_m=16, attn_block_m_tail=16, attn_block_n=16))])
def test_ragged_ends_of_one_token(monkeypatch, tokens, overrides):
    """N one past a whole query tile and key step (N % BLOCK_M == N % BLOCK_N == 1): the ragged
    query pass and the ragged key step each cover a single token."""
    monkeypatch.setattr(attention_module, "TILES_FP32", dataclasses.replace(attention_module.TILES_FP32, **overrides))
    fit = attention_module.tiles_for(32, torch.float32)
    assert tokens % fit.attn_block_m == 1 and tokens % fit.attn_block_n == 1
    branch = make_branch(2, tokens, 2, 32, tokens)
    run_and_check(branch, make_mask("random", 2, 2, tokens), 2)


def test_fit_tiles_shrinks_every_tile_to_16_rows_and_no_further():
    """Rows too wide for any larger tile (fp32, d=1024) take 16-row tiles in every kernel (the
    tl.dot minimum), each shrunk on its own rule."""
    huge = attention_module.fit_tiles(TileConfig(qkv_block_n=256, qkv_block_k=256, attn_block_n=256, proj_block_o=256),
                                      1024, 4)
    assert (huge.qkv_block_n, huge.qkv_block_k, huge.attn_block_m, huge.attn_block_n, huge.attn_block_tail,
            huge.proj_block_o) == (16,) * 6

"""The fused SAE -> steer -> gate kernel against `reference.sae_steer_gate`.

Runs compiled on CUDA and under TRITON_INTERPRET=1 on the CPU (set by conftest.py)."""
import zlib

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from headsteer.kernels import reference
from headsteer.kernels import triton_sae_gate as gate_module
from headsteer.kernels.triton_sae_gate import MAX_TOPK_CANDIDATES, _topk_rows, triton_sae_steer_gate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_gate(dim, hidden, heads, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = dict(
        norm_weight=1 + 0.2 * torch.randn(dim, generator=g),
        norm_bias=0.2 * torch.randn(dim, generator=g),
        norm_eps=1e-6,
        fc1_weight=torch.randn(hidden, dim, generator=g) / dim**0.5,
        fc1_bias=0.2 * torch.randn(hidden, generator=g),
        fc2_weight=torch.randn(heads, hidden, generator=g) / hidden**0.5,
        fc2_bias=0.2 * torch.randn(heads, generator=g),
    )
    return {k: v.to(DEVICE, dtype) if torch.is_tensor(v) else v for k, v in params.items()}


def make_sae(dim, width, activation, seed, k=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = dict(
        enc_weight=torch.randn(width, dim, generator=g) / dim**0.5,
        enc_bias=0.1 * torch.randn(width, generator=g),
        dec_weight=F.normalize(torch.randn(width, dim, generator=g), dim=1),
        dec_bias=0.1 * torch.randn(dim, generator=g),
        threshold=0.3 * torch.rand(width, generator=g),
    )
    params = {k_: v.to(DEVICE, dtype) for k_, v in params.items()}
    return dict(params, activation=activation, k=k)


def make_steering(kind, batch, width, seed):
    """(steer_scale, steer_shift) for: identity (None), per-sample scale, shift, scale and shift."""
    g = torch.Generator().manual_seed(seed)
    if kind == "identity":
        return None, None
    scale = (0.5 + 3 * torch.rand(batch, width, generator=g)).to(DEVICE)
    shift = (0.5 * torch.randn(batch, width, generator=g)).to(DEVICE)
    return {"scale": (scale, None), "shift": (None, shift), "scale+shift": (scale, shift)}[kind]


@pytest.fixture
def recorded_launches(monkeypatch):
    """The gate kernel replaced by a recorder: each launch's (args, kwargs), nothing run; for
    checks of what the launcher passes."""
    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((args, kwargs))

    monkeypatch.setattr(gate_module, "_sae_steer_gate_kernel", Recorder())
    return launches


def upcast(params):
    return None if params is None else {k: v.float() if torch.is_tensor(v) else v for k, v in params.items()}


def run_and_check(e, gate, sae, scale, shift, mode, budget, atol=1e-4):
    """Run the kernel into poisoned outputs and compare with the fp32 reference on the same values."""
    ref_logits, ref_keep = reference.sae_steer_gate(e.float(), upcast(gate), upcast(sae), scale, shift, mode, budget)
    logits = torch.full_like(ref_logits, float("nan"))
    keep = ~ref_keep  # every element starts wrong, so an unwritten one fails
    got_logits, got_keep = triton_sae_steer_gate(e, gate, sae, scale, shift, mode, budget, out=(logits, keep))
    assert got_logits is logits and got_keep is keep
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=1e-4)
    # The selection rule itself is exact: same as the reference rule applied to our logits ...
    assert torch.equal(keep, reference.keep_from_logits(logits, budget))
    # ... and, as random logits are far from ties at this tolerance, the reference's own mask.
    assert torch.equal(keep, ref_keep)


@pytest.mark.parametrize("batch", [1, 3, 5])
@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("steering", ["identity", "scale", "shift", "scale+shift"])
@pytest.mark.parametrize("mode", reference.STEER_MODES)
def test_sae_gate_matches_reference(batch, activation, steering, mode):
    seed = zlib.crc32(repr((batch, activation, steering, mode)).encode())
    dim, width, hidden, heads = 48, 40, 20, 6  # none a power of two: every tile is masked
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    gate = make_gate(dim, hidden, heads, seed + 1)
    sae = make_sae(dim, width, activation, seed + 2, k=7 if activation == "topk" else None)
    scale, shift = make_steering(steering, batch, width, seed + 3)
    for budget in (None, 0.5):
        run_and_check(e, gate, sae, scale, shift, mode, budget)


@pytest.mark.parametrize("budget", [None, 0.0, 0.17, 0.5, 1.0])
@pytest.mark.parametrize("heads", [2, 3, 12])
def test_gate_without_sae(budget, heads):
    seed = heads * 100 + int(100 * (budget or 0))
    e = 3 * torch.randn(5, 40, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    run_and_check(e, make_gate(40, 24, heads, seed), None, None, None, "preserve-error", budget)


def test_more_heads_than_one_16_wide_tile():
    """H = 20: the heads tile is padded to 32, every head gets its logit and a budget ranks all 20."""
    e = torch.randn(1, 24, generator=torch.Generator().manual_seed(191)).to(DEVICE)
    run_and_check(e, make_gate(24, 16, 20, 192), None, None, None, "preserve-error", 0.5)


def test_gate_without_norm_affine_or_biases():
    """A gate whose LayerNorm has no weight or bias, or whose fc1/fc2 have no bias (None), computes
    as the reference does without them, one absent at a time and all together."""
    e = torch.randn(3, 24, generator=torch.Generator().manual_seed(195)).to(DEVICE)
    names = ("norm_weight", "norm_bias", "fc1_bias", "fc2_bias")
    for absent in [(name,) for name in names] + [names]:
        gate = dict(make_gate(24, 16, 6, 196), **{name: None for name in absent})
        run_and_check(e, gate, None, None, None, "preserve-error", None)


def test_identity_steering_preserves_the_unsteered_gate():
    """preserve-error with identity steering is exactly the gate on e (the SAE is invisible)."""
    e = torch.randn(3, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    gate = make_gate(32, 16, 6, 6)
    plain = triton_sae_steer_gate(e, gate)
    with_sae = triton_sae_steer_gate(e, gate, make_sae(32, 64, "topk", 7, k=4))
    torch.testing.assert_close(with_sae[0], plain[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [0, 1, 5, 12, 16])
def test_topk_ties_break_toward_lower_latent(k):
    """Integer-valued inputs and duplicate encoder rows give exactly tied pre-activations (exact
    in any summation order); k cuts through the ties, and distinct decoder rows and scales make
    the choice of latent visible in the logits."""
    dim, width = 24, 16
    g = torch.Generator().manual_seed(11)
    sae = make_sae(dim, width, "topk", 11, k=k)
    sae["enc_weight"] = torch.randint(-2, 3, (4, dim), generator=g).float().repeat(4, 1).to(DEVICE)
    sae["enc_bias"] = torch.randint(5, 9, (4,), generator=g).float().repeat(4).to(DEVICE)  # latent i ties i+4, i+8, i+12
    sae["dec_bias"] = torch.randint(-1, 2, (dim,), generator=g).float().to(DEVICE)
    e = torch.randint(-3, 4, (3, dim), generator=g).float().to(DEVICE)
    scale, shift = make_steering("scale+shift", 3, width, 13)
    run_and_check(e, make_gate(dim, 8, 4, 14), sae, scale, shift, "reconstruct", None)


def test_budget_ties_break_toward_lower_head():
    """Heads 0, 2, 4 get zero fc2 rows and one bias, so their logits tie exactly; the odd heads
    vary per sample, so the budget cuts through the tie at different places."""
    gate = make_gate(32, 16, 6, 21)
    gate["fc2_weight"][0::2] = 0.0
    gate["fc2_bias"][0::2] = 0.1
    e = torch.randn(8, 32, generator=torch.Generator().manual_seed(22)).to(DEVICE)
    for budget in (0.17, 0.33, 0.5, 0.67, 0.83):
        run_and_check(e, gate, None, None, None, "preserve-error", budget)


@pytest.mark.parametrize("steering", ["identity", "scale", "scale+shift"])
def test_vit_small_shapes(steering):
    """ViT-S sizes with the runtime's defaults: D=384, S=4D, k=16, G=D/4, H=6: twelve latent tiles,
    and unshifted TopK steering decodes only the selected latents."""
    dim, batch = 384, 3
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(31)).to(DEVICE)
    scale, shift = make_steering(steering, batch, 4 * dim, 32)
    run_and_check(e, make_gate(dim, dim // 4, 6, 33), make_sae(dim, 4 * dim, "topk", 34, k=16), scale, shift,
                  "preserve-error", 0.33)


@pytest.mark.parametrize("batch", [17, 33])
@pytest.mark.parametrize("activation", ["topk", "relu"])
@pytest.mark.parametrize("steering", ["scale", "shift", "scale+shift"])
@pytest.mark.parametrize("mode", reference.STEER_MODES)
@pytest.mark.parametrize("dim,width", [(40, 300), (200, 40)])
def test_many_latent_and_batch_tiles(batch, activation, steering, mode, dim, width):
    """Several batch tiles (16 rows each, the last one ragged) times several latent tiles (the last
    one ragged), or one latent tile whose program decodes the shift for all 200 columns in
    chunks: every program writes its share and each row's finisher waits for its batch tile."""
    seed = zlib.crc32(repr(("tiles", batch, activation, steering, mode, dim)).encode())
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    scale, shift = make_steering(steering, batch, width, seed + 1)
    sae = make_sae(dim, width, activation, seed + 2, k=9 if activation == "topk" else None)
    run_and_check(e, make_gate(dim, 24, 5, seed + 3), sae, scale, shift, mode, None)


@pytest.mark.parametrize("activation,k", [("topk", 17), ("topk", 40), ("relu", None)])
def test_wide_rows_and_full_batch_tiles(activation, k):
    """D = 600 (a one-sample finisher assembles g in two column chunks), k above one 16-latent
    decode step, and a batch of exactly two 16-row tiles."""
    dim, width, batch = 600, 200, 32
    seed = zlib.crc32(repr(("wide", activation, k)).encode())
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    scale, shift = make_steering("scale+shift", batch, width, seed + 1)
    sae = make_sae(dim, width, activation, seed + 2, k=k)
    for mode in reference.STEER_MODES:
        run_and_check(e, make_gate(dim, 24, 6, seed + 3), sae, scale, shift, mode, 0.5)


@pytest.mark.parametrize("k", [0, 1, 100, 200, 300])
@pytest.mark.parametrize("mode", reference.STEER_MODES)
def test_topk_k_edges(k, mode):
    """k = 0 (nothing active), k above a latent tile (every latent of a tile is a candidate) and
    k = S (every latent active)."""
    dim, width, batch = 24, 300, 5
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(k)).to(DEVICE)
    for steering in ("scale", "scale+shift"):
        scale, shift = make_steering(steering, batch, width, k + 1)
        run_and_check(e, make_gate(dim, 16, 4, k + 2), make_sae(dim, width, "topk", k + 3, k=k), scale, shift, mode, 0.5)


def test_topk_ties_across_latent_tiles():
    """Latent i ties latents i + 64, i + 128, ... across three latent tiles of 128: the global
    selection must still prefer the lower latent index, as the reference's stable sort does."""
    dim, width, batch = 16, 320, 19
    g = torch.Generator().manual_seed(81)
    sae = make_sae(dim, width, "topk", 81, k=10)
    sae["enc_weight"] = torch.randint(-2, 3, (64, dim), generator=g).float().repeat(5, 1).to(DEVICE)
    sae["enc_bias"] = torch.randint(5, 9, (64,), generator=g).float().repeat(5).to(DEVICE)
    sae["dec_bias"] = torch.randint(-1, 2, (dim,), generator=g).float().to(DEVICE)
    e = torch.randint(-3, 4, (batch, dim), generator=g).float().to(DEVICE)
    scale, shift = make_steering("scale", batch, width, 82)
    run_and_check(e, make_gate(dim, 8, 4, 83), sae, scale, shift, "preserve-error", None)


def test_many_candidates_per_row():
    """S = 4096 in 32 latent tiles with k = 64: 2048 candidates per row, ranked in one tile."""
    dim, width, batch = 32, 4096, 18
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(91)).to(DEVICE)
    scale, shift = make_steering("scale+shift", batch, width, 92)
    run_and_check(e, make_gate(dim, 16, 6, 93), make_sae(dim, width, "topk", 94, k=64), scale, shift, "reconstruct", None)


def test_repeated_runs_are_bitwise_identical():
    """Partial decodes are summed in a fixed order (no floating-point atomics): same bits every run."""
    dim, width, batch = 64, 512, 20
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(95)).to(DEVICE)
    scale, shift = make_steering("scale+shift", batch, width, 96)
    gate, sae = make_gate(dim, 16, 6, 97), make_sae(dim, width, "topk", 98, k=16)
    first = triton_sae_steer_gate(e, gate, sae, scale, shift)
    for _ in range(3):
        again = triton_sae_steer_gate(e, gate, sae, scale, shift)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_compute_in_fp32(dtype):
    """Half-precision storage is only rounding of the inputs: the math must match the fp32
    reference applied to the same rounded values."""
    dim, width = 64, 96
    e = torch.randn(3, dim, generator=torch.Generator().manual_seed(41)).to(DEVICE, dtype)
    gate = make_gate(dim, 32, 6, 42, dtype)
    sae = make_sae(dim, width, "topk", 43, k=8, dtype=dtype)
    scale, shift = make_steering("scale+shift", 3, width, 44)
    run_and_check(e, gate, sae, scale.to(dtype), shift.to(dtype), "preserve-error", None)


@pytest.mark.parametrize("activation,k", [("topk", 4), ("jumprelu", None)])
def test_strided_gate_vectors_and_sae_biases(activation, k):
    """Gate norm/bias vectors, SAE biases and JumpReLU thresholds given as strided views are read by their values."""
    dim, width = 32, 48
    gate = make_gate(dim, 16, 3, 55)
    sae = make_sae(dim, width, activation, 56, k=k)
    sae_names = ("enc_bias", "dec_bias") + (("threshold",) if activation == "jumprelu" else ())
    for params, names in ((gate, ("norm_weight", "norm_bias", "fc1_bias", "fc2_bias")), (sae, sae_names)):
        for name in names:
            params[name] = params[name].repeat_interleave(2)[::2]  # same values, stride 2
    e = torch.randn(5, dim, generator=torch.Generator().manual_seed(57)).to(DEVICE)
    scale, shift = make_steering("scale+shift", 5, width, 58)
    run_and_check(e, gate, sae, scale, shift, "preserve-error", None)


def test_broadcast_steering_rows():
    """One steering row [S] applies to every sample, as broadcasting does in the reference."""
    dim, width = 32, 48
    e = torch.randn(5, dim, generator=torch.Generator().manual_seed(51)).to(DEVICE)
    scale, shift = make_steering("scale+shift", 1, width, 52)
    run_and_check(e, make_gate(dim, 16, 3, 53), make_sae(dim, width, "relu", 54), scale[0], shift, "preserve-error", None)


def test_bad_arguments_are_clear_errors():
    e = torch.randn(2, 16, device=DEVICE)
    gate = make_gate(16, 8, 3, 61)
    with pytest.raises(ValueError, match="steering mode"):
        triton_sae_steer_gate(e, gate, mode="sideways")
    with pytest.raises(ValueError, match="activation"):
        triton_sae_steer_gate(e, gate, make_sae(16, 8, "gelu", 62))
    with pytest.raises(ValueError, match="k <= 8"):
        triton_sae_steer_gate(e, gate, make_sae(16, 8, "topk", 63, k=9))
    # k >= the latent tile makes every latent a candidate: too many to rank in registers.
    width = MAX_TOPK_CANDIDATES + 1
    with pytest.raises(NotImplementedError, match="candidates"):
        triton_sae_steer_gate(e, gate, make_sae(16, width, "topk", 64, k=width), torch.ones(width, device=DEVICE))


def test_bad_shapes_and_outputs_are_refused_before_any_launch(recorded_launches):
    """Every tensor the kernel would read past (it reads raw pointers by the shapes it is told) and
    every output it could not write into is a ValueError naming it, before any launch; so is a
    TopK SAE without k, which `reference.sae_encode` refuses too."""
    dim, width, batch, heads = 16, 40, 3, 4
    gate, sae = make_gate(dim, 8, heads, 1), make_sae(dim, width, "jumprelu", 2)
    e = torch.randn(batch, dim, device=DEVICE)
    scale = torch.rand(batch, width, device=DEVICE)
    logits = torch.empty(batch, heads, device=DEVICE)
    keep = torch.empty(batch, heads, device=DEVICE, dtype=torch.bool)

    def refused(match, e=e, gate=gate, sae=sae, scale=scale, out=None):
        with pytest.raises(ValueError, match=match):
            triton_sae_steer_gate(e, gate, sae, scale, out=out)

    refused(r"decision vectors must be \[B, D\], got \(16,\)", e=e[0])
    refused(r"decision vectors must be \[B, D\]", e=e[None])
    refused("gate weights", gate=dict(gate, fc1_weight=gate["fc1_weight"][:, 1:]))
    refused("gate weights", gate=dict(gate, fc2_weight=gate["fc2_weight"][:, 1:]))
    for name, size in (("norm_weight", dim), ("norm_bias", dim), ("fc1_bias", 8), ("fc2_bias", heads)):
        refused(rf"gate {name} must be \[{size}\], got \({size - 1},\)", gate=dict(gate, **{name: gate[name][1:]}))
    refused("SAE weights", sae=dict(sae, enc_weight=sae["enc_weight"][:, 1:]))
    refused("SAE weights", sae=dict(sae, dec_weight=sae["dec_weight"][1:]))
    for name, size in (("enc_bias", width), ("dec_bias", dim), ("threshold", width)):
        refused(rf"SAE {name} must be \[{size}\], got \({size - 1},\)", sae=dict(sae, **{name: sae[name][1:]}))
    refused("jumprelu SAE needs a per-latent threshold", sae=dict(sae, threshold=None))
    for k in (None, -1):
        refused(rf"topk SAE needs 0 <= k <= {width}, got {k}", sae=dict(sae, activation="topk", k=k))
    refused(rf"steer_scale must be \[B, {width}\]", scale=scale[:, 1:])
    refused(rf"steer_scale must be \[B, {width}\]", scale=scale[None])
    for bad_logits in (logits[1:], logits.double(), torch.empty(heads, batch, device=DEVICE).t()):
        refused("out logits must be a contiguous float32", out=(bad_logits, keep))
    for bad_keep in (keep[1:], keep.int(), torch.empty(heads, batch, device=DEVICE, dtype=torch.bool).t()):
        refused("out keep must be a contiguous bool", out=(logits, bad_keep))
    assert recorded_launches == []


def test_topk_candidates_up_to_the_register_limit_are_accepted(recorded_launches):
    """Exactly MAX_TOPK_CANDIDATES candidates per row (S / 128 latent tiles x k = 128) still launch;
    one more is refused (`test_bad_arguments_are_clear_errors`)."""
    width, k = MAX_TOPK_CANDIDATES, 128
    e = torch.randn(2, 16, device=DEVICE)
    triton_sae_steer_gate(e, make_gate(16, 8, 3, 1), make_sae(16, width, "topk", 2, k=k), torch.ones(width, device=DEVICE))
    assert [kwargs["BLOCK_C"] for _, kwargs in recorded_launches] == [MAX_TOPK_CANDIDATES]


def test_an_empty_batch_gives_empty_outputs_without_a_launch(recorded_launches):
    gate, sae = make_gate(16, 8, 3, 1), make_sae(16, 40, "topk", 2, k=4)
    e = torch.randn(0, 16, device=DEVICE)
    for sae_params, steering in ((None, (None, None)), (sae, make_steering("scale+shift", 0, 40, 3))):
        logits, keep = triton_sae_steer_gate(e, gate, sae_params, *steering)
        assert logits.shape == keep.shape == (0, 3) and logits.dtype == torch.float32 and keep.dtype == torch.bool
    assert recorded_launches == []


def test_gate_constants_are_restored_even_after_an_error():
    defaults = (gate_module.BLOCK_S, gate_module.GATE_STAGES)
    with pytest.raises(RuntimeError, match="inside"):
        with gate_module.gate_constants(BLOCK_S=32, GATE_STAGES=1):
            assert (gate_module.BLOCK_S, gate_module.GATE_STAGES) == (32, 1)
            raise RuntimeError("inside")
    assert (gate_module.BLOCK_S, gate_module.GATE_STAGES) == defaults


@cuda_only
def test_no_host_sync_and_graph_replay():
    dim, width, batch = 64, 128, 5
    gate = make_gate(dim, 32, 6, 71)
    sae = make_sae(dim, width, "topk", 72, k=8)
    e = torch.randn(batch, dim, device=DEVICE)
    scale, shift = make_steering("scale+shift", batch, width, 73)
    triton_sae_steer_gate(e, gate, sae, scale, shift, budget=0.5)  # compile outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_sae_steer_gate(e, gate, sae, scale, shift, budget=0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits, keep = triton_sae_steer_gate(e, gate, sae, scale, shift, budget=0.5)
    e.copy_(torch.randn(batch, dim, device=DEVICE))
    graph.replay()
    ref_logits, ref_keep = reference.sae_steer_gate(e, gate, sae, scale, shift, budget=0.5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(keep, ref_keep)


def test_nan_logits_rank_first_under_a_budget():
    """A NaN logit ranks above every number (torch.sort puts NaN first), and a budget still keeps
    exactly round(b*H) heads per row: one NaN head, an all-NaN row, and clean rows."""
    gate = make_gate(32, 16, 6, 101)
    gate["fc2_weight"][2, 0] = float("nan")  # head 2 is NaN in every row
    e = torch.randn(4, 32, generator=torch.Generator().manual_seed(102)).to(DEVICE)
    e[1, 5] = float("nan")  # row 1: every logit NaN
    for budget in (0.17, 0.5, 0.83):
        ref_logits, ref_keep = reference.sae_steer_gate(e, gate, budget=budget)
        logits, keep = triton_sae_steer_gate(e, gate, budget=budget)
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, equal_nan=True)
        assert torch.equal(keep, ref_keep)
        assert (keep.sum(1) == reference.heads_for_budget(budget, 6)).all()


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4), ("topk", 40)])
@pytest.mark.parametrize("mode", reference.STEER_MODES)
def test_nan_latents_propagate_like_relu(activation, k, mode):
    """A NaN pre-activation stays NaN through the activation, as F.relu keeps it (a max that
    dropped NaN would hide a broken encoder row behind finite logits)."""
    dim, width = 32, 300
    sae = make_sae(dim, width, activation, 111, k=k)
    sae["enc_weight"][200, 0] = float("nan")  # latent 200 (third latent tile) is NaN for every row
    e = torch.randn(3, dim, generator=torch.Generator().manual_seed(112)).to(DEVICE)
    scale, _ = make_steering("scale", 3, width, 113)
    ref_logits, ref_keep = reference.sae_steer_gate(e, make_gate(dim, 16, 6, 114), sae, scale, None, mode)
    logits, keep = triton_sae_steer_gate(e, make_gate(dim, 16, 6, 114), sae, scale, None, mode)
    assert ref_logits.isnan().all()
    assert logits.isnan().all() and torch.equal(keep, ref_keep)


@triton.jit
def _topk_rows_probe(values_ptr, mask_ptr, C, k, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, DIGIT_BITS: tl.constexpr):
    """Runs the kernel's radix select on a [ROWS, C] tile (columns padded to BLOCK_C)."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    valid = (cols < C)[None, :] & (rows < ROWS)[:, None]
    values = tl.load(values_ptr + rows[:, None] * C + cols[None, :], mask=valid, other=0.0)
    chosen = _topk_rows(values, valid, k, DIGIT_BITS)
    tl.store(mask_ptr + rows[:, None] * C + cols[None, :], chosen, mask=valid)


def hard_topk_rows(rows, cols, generator):
    """Rows built to be hard for a radix select: exact ties (cut by k), +-0.0, +-inf, NaN,
    subnormals, keys that share all but their last bits, and a row of one repeated value."""
    values = torch.randint(-3, 4, (rows, cols), generator=generator).float()  # many exact ties
    values[1] = torch.randn(cols, generator=generator)  # all distinct
    values[2, :4] = torch.tensor([0.0, -0.0, -0.0, 0.0])
    values[3, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), -float("nan"), 1e-40])
    values[4] = float("-inf")  # every entry tied at -inf
    values[5] = -1e-40  # tied negative subnormals
    values[6] = torch.linspace(-1e30, 1e30, cols)
    # neighbouring floats: the keys agree on every digit but the last ones, some repeated
    ulps = torch.randint(0, 6, (cols,), generator=generator, dtype=torch.int32)
    values[7] = (torch.tensor(1.5).view(torch.int32) + ulps).view(torch.float32)
    values[8] = -values[7]
    return values


# (columns, padded columns, digit bits): the auto choice for a latent tile (3 bits, also at its
# widest, where a count of 128 sets the top bit of its 8-bit field) and for a
# finisher's candidates (2), and the bit-by-bit select as timed on the H200 (1).
@pytest.mark.parametrize("cols, block_c, digit_bits", [(21, 32, 0), (21, 32, 1), (21, 32, 2), (128, 128, 0), (200, 256, 0)])
@pytest.mark.parametrize("k", [0, 1, 3, 7, 20, 21, 40, 199, 200, 201])
def test_radix_select_matches_topk_mask(k, cols, block_c, digit_bits):
    """The TopK selection alone against `reference.topk_mask`, on hard rows (`hard_topk_rows`)
    with columns padded to a power of two, k from 0 to past the row's width."""
    if k > 40 and cols < 40:
        pytest.skip("k past a short row's width is covered by k = 40")
    rows = 16
    g = torch.Generator().manual_seed(zlib.crc32(repr((k, cols, digit_bits)).encode()))
    values = hard_topk_rows(rows, cols, g)
    got = torch.zeros(rows, cols, dtype=torch.bool, device=DEVICE)
    _topk_rows_probe[(1,)](values.to(DEVICE), got, cols, k, ROWS=rows, BLOCK_C=block_c, DIGIT_BITS=digit_bits)
    assert torch.equal(got.cpu(), reference.topk_mask(values, k))


@pytest.mark.parametrize("digit_bits", [0, 1])
def test_radix_select_keeps_nothing_for_a_negative_k(digit_bits):
    """The launcher never passes k < 0; if a caller did, the select keeps nothing (as for k = 0)
    instead of every entry."""
    values = torch.tensor([3.0, 1.0, 2.0, 0.5] * 4).repeat(16, 1)
    got = torch.ones(16, 16, dtype=torch.bool, device=DEVICE)
    _topk_rows_probe[(1,)](values.to(DEVICE), got, 16, -1, ROWS=16, BLOCK_C=16, DIGIT_BITS=digit_bits)
    assert not got.any()


def test_gate_pipeline_depth_stays_within_its_shared_memory_budget():
    """16-bit ViT tiles get GATE_STAGES (3 slots), fp32 tiles (twice the bytes) plain loads, never
    the 2-stage pipeline whose single slot overlaps nothing; the staged slots never pass the budget."""
    vit_tile = 32 * 512 + 16 * 32  # a ViT-S one-sample step: 32 rows of fc1 (D padded to 512) and of fc2
    assert gate_module.gate_stages(vit_tile, 2) == gate_module.GATE_STAGES == 4
    assert gate_module.gate_stages(vit_tile, 4) == 1
    assert gate_module.gate_stages(64, 4) == 4  # tiny gates: every slot fits
    for tile in (64, 4096, 8192, 20000, vit_tile, 40000, 70000):
        for element_bytes in (2, 4):
            stages = gate_module.gate_stages(tile, element_bytes)
            assert stages != 2 and 1 <= stages <= gate_module.GATE_STAGES
            assert (stages - 1) * tile * element_bytes <= gate_module._GATE_SHARED_BUDGET
    with gate_module.gate_constants(GATE_STAGES=1):
        assert gate_module.gate_stages(64, 2) == 1
    with gate_module.gate_constants(GATE_STAGES=3):
        assert gate_module.gate_stages(vit_tile, 2) == 3


@pytest.mark.parametrize("activation,k,steering", [("topk", 5, "scale+shift"), ("topk", 3, "scale"), ("relu", None, "scale")])
def test_scratch_parts_are_16_byte_aligned_at_any_batch(recorded_launches, activation, k, steering):
    """Triton specializes pointers on 16-byte alignment: every scratch part the launcher carves
    from its workspace starts aligned whatever B and k, so a batch size never gets narrower loads
    or a compile of its own (the kernel does not specialize on B either)."""
    gate, sae = make_gate(24, 8, 3, seed=1), make_sae(24, 40, activation, seed=2, k=k)
    for batch in (1, 3, 7, 17):
        e = torch.randn(batch, 24, device=DEVICE)
        triton_sae_steer_gate(e, gate, sae, *make_steering(steering, batch, 40, seed=3))
    assert len(recorded_launches) == 4
    for args, _ in recorded_launches:
        pointers = [arg for arg in args if torch.is_tensor(arg)]
        assert len(pointers) > 10 and all(pointer.data_ptr() % 16 == 0 for pointer in pointers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mma_16bit", [True, False])
@pytest.mark.parametrize("batch", [1, 5, 17])
@pytest.mark.parametrize("activation,k", [("topk", 8), ("relu", None), ("jumprelu", None)])
@pytest.mark.parametrize("steering_dtype", ["fp32", "same"])
@pytest.mark.parametrize("mode", reference.STEER_MODES)
def test_16bit_mma_matches_reference(dtype, mma_16bit, batch, activation, k, steering_dtype, mode):
    """The SAE's dots on 16-bit MMAs (`SAE_16BIT_MMA`: the encoder on a three-term 16-bit split of
    the fp32 e - b_dec, and with 16-bit steering the shift decode, both with exact products) and
    on 3xTF32 all give the fp32 reference's logits and keep mask for 16-bit inputs; D and S not
    multiples of the tiles."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the CPU interpreter's dots read bf16 as raw bits; covered on CUDA")
    dim, width = 40, 300
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(batch)).to(DEVICE, dtype)
    gate, sae = make_gate(dim, 16, 5, 51, dtype), make_sae(dim, width, activation, 52, k=k, dtype=dtype)
    scale, shift = make_steering("scale+shift", batch, width, 53)
    if steering_dtype == "same":
        scale, shift = scale.to(dtype), shift.to(dtype)
    # (_ENCODER_SPLIT_FP16: the encoder's bf16 split code, run in fp16 where bf16 dots cannot run)
    with gate_module.gate_constants(SAE_16BIT_MMA=mma_16bit, _ENCODER_SPLIT_FP16=DEVICE == "cpu"):
        run_and_check(e, gate, sae, scale, shift, mode, 0.4)


@pytest.mark.parametrize("encoder_block_k", [32, 64, 128])
@pytest.mark.parametrize("activation,k", [("topk", 8), ("relu", None)])
def test_wider_encoder_steps_match_reference(encoder_block_k, activation, k):
    """ENCODER_BLOCK_K, the 16-bit encoder's reduction step (128 by default; `--gate-sweep` times 32 and 64), over
    a D that is not a multiple of it: whole steps, then a ragged last one."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    dim, width, batch = 200, 300, 5
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(60)).to(DEVICE, dtype)
    gate, sae = make_gate(dim, 16, 5, 61, dtype), make_sae(dim, width, activation, 62, k=k, dtype=dtype)
    scale, shift = make_steering("scale+shift", batch, width, 63)
    with gate_module.gate_constants(ENCODER_BLOCK_K=encoder_block_k, _ENCODER_SPLIT_FP16=DEVICE == "cpu"):
        run_and_check(e, gate, sae, scale, shift, "preserve-error", 0.4)


def test_the_encoders_16bit_split_keeps_every_bit_of_e_minus_b_dec():
    """The three-term split (hi + mid + lo) of the fp32 e - b_dec is exact: latent 1 reads
    1 + 2**-11 + 2**-23, latent 0 reads 1 + 2**-11, apart only by the lo term's bit (hi = 1 + 2**-10,
    mid = -2**-11, lo = 2**-23 in fp16), so TopK (k = 1) must select latent 1, where hi + mid
    alone would tie them and select latent 0. (fp16 weights stand in for bf16 on the CPU.)"""
    dim, width, batch = 16, 16, 2
    sae = make_sae(dim, width, "topk", 201, k=1, dtype=torch.float16)
    enc_weight = torch.zeros(width, dim)
    enc_weight[0, 0] = enc_weight[1, 1] = 1.0
    sae.update(enc_weight=enc_weight.to(DEVICE, torch.float16), enc_bias=torch.zeros(width, device=DEVICE, dtype=torch.float16),
               dec_bias=torch.zeros(dim, device=DEVICE, dtype=torch.float16))
    e = torch.zeros(batch, dim)
    e[:, 0] = 1 + 2**-11
    e[:, 1] = 1 + 2**-11 + 2**-23
    e = e.to(DEVICE)
    assert (e[:, 1] > e[:, 0]).all()  # (exact in fp32)
    assert reference.sae_encode(e, *(sae[name].float() for name in ("enc_weight", "enc_bias", "dec_bias")), "topk", k=1)[:, 1].gt(0).all()
    scale, shift = make_steering("scale", batch, width, 202)
    with gate_module.gate_constants(_ENCODER_SPLIT_FP16=True, ENCODER_BLOCK_K=32):
        run_and_check(e, make_gate(dim, 16, 6, 203), sae, scale, shift, "preserve-error", None)


def test_wider_encoder_steps_only_on_the_16bit_split(recorded_launches):
    """The 3xTF32 encoder keeps 32-wide steps whatever ENCODER_BLOCK_K (its fp32 operand copies
    would spill wider); the 16-bit split takes ENCODER_BLOCK_K."""
    gate = make_gate(24, 8, 3, seed=1, dtype=torch.float16)
    sae = make_sae(24, 40, "topk", seed=2, k=4, dtype=torch.float16)
    e = torch.randn(3, 24, device=DEVICE).half()
    with gate_module.gate_constants(ENCODER_BLOCK_K=128):
        for split_fp16 in (False, True):
            with gate_module.gate_constants(_ENCODER_SPLIT_FP16=split_fp16):
                triton_sae_steer_gate(e, gate, sae, *make_steering("scale", 3, 40, seed=3))
    assert [kwargs["ENC_BLOCK_K"] for _, kwargs in recorded_launches] == [32, 128]


@pytest.mark.parametrize("split_fp16", [False, True])
def test_16bit_mma_follows_the_weights_dtype(recorded_launches, split_fp16):
    """The launcher runs the encoder on 16-bit MMAs when W_enc is bf16 (fp16 only when tests ask:
    e and b_dec may be any dtype, e - b_dec is formed in fp32 and split), and the shift decode
    when steer_shift and W_dec share a 16-bit dtype, with the switch on; anything else runs
    3xTF32 on fp32 values. (fp16 stands in for both 16-bit dtypes: the CPU interpreter cannot
    run bf16 dots.)"""
    half, single = torch.float16, torch.float32
    scale = torch.rand(3, 40, device=DEVICE) + 0.5
    expected = []
    for e_dtype, sae_dtype, bias_dtype, switch, encode in [(half, half, half, True, True), (half, half, half, False, False),
                                                           (half, single, single, True, False),
                                                           (half, half, single, True, True), (single, half, single, True, True),
                                                           (single, single, single, True, False)]:
        sae = make_sae(24, 40, "topk", 2, k=4, dtype=sae_dtype)
        sae["dec_bias"] = sae["dec_bias"].to(bias_dtype)
        e = torch.randn(3, 24, device=DEVICE).to(e_dtype)
        with gate_module.gate_constants(SAE_16BIT_MMA=switch, _ENCODER_SPLIT_FP16=split_fp16):
            triton_sae_steer_gate(e, make_gate(24, 8, 3, 1, e_dtype), sae, scale, scale.to(sae_dtype))
            triton_sae_steer_gate(e, make_gate(24, 8, 3, 1, e_dtype), sae, scale, scale.to(single))
        # (a 16-bit shift exactly when W_dec is 16-bit here)
        expected += [(encode and split_fp16, encode), (encode and split_fp16, False)]
    assert [(kwargs["ENCODE_16BIT"], kwargs["SHIFT_16BIT"]) for _, kwargs in recorded_launches] == expected
    # a 16-bit shift beside an fp32 W_dec is not one 16-bit dtype either: 3xTF32
    with gate_module.gate_constants(_ENCODER_SPLIT_FP16=split_fp16):
        triton_sae_steer_gate(torch.randn(3, 24, device=DEVICE), make_gate(24, 8, 3, 1), make_sae(24, 40, "topk", 2, k=4),
                              scale, scale.half())
    assert recorded_launches[-1][1]["SHIFT_16BIT"] is False


@pytest.mark.parametrize("chains", [1, 2, 4])
@pytest.mark.parametrize("width", [40, 300])
@pytest.mark.parametrize("mode", reference.STEER_MODES)
def test_shift_decode_chains(chains, width, mode):
    """The shift decode's independent accumulator chains (`SHIFT_DECODE_CHAINS`) each match the
    reference, with S not a multiple of chains x the reduction step."""
    dim, batch = 48, 5
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(61)).to(DEVICE)
    gate, sae = make_gate(dim, 16, 4, 62), make_sae(dim, width, "topk", 63, k=6)
    scale, shift = make_steering("scale+shift", batch, width, 64)
    with gate_module.gate_constants(SHIFT_DECODE_CHAINS=chains):
        run_and_check(e, gate, sae, scale, shift, mode, None)


def test_shift_decode_chains_are_checked():
    gate, sae = make_gate(24, 8, 3, 1), make_sae(24, 40, "topk", 2, k=4)
    with gate_module.gate_constants(SHIFT_DECODE_CHAINS=3), pytest.raises(ValueError, match="SHIFT_DECODE_CHAINS"):
        triton_sae_steer_gate(torch.randn(2, 24, device=DEVICE), gate, sae, None, torch.randn(2, 40, device=DEVICE))


@pytest.mark.parametrize("where", ["steer_scale", "gate fc2_weight", "SAE dec_weight", "out[1]"])
def test_a_tensor_on_another_device_is_refused_before_any_launch(recorded_launches, where):
    """Kernels read raw pointers: a tensor elsewhere (here on `meta`) would fault a GPU."""
    gate, sae = make_gate(16, 8, 3, 1), make_sae(16, 32, "topk", 2, k=4)
    scale, shift = make_steering("scale+shift", 2, 32, 3)
    out = (torch.empty(2, 3, device=DEVICE), torch.empty(2, 3, device=DEVICE, dtype=torch.bool))
    if where == "steer_scale":
        scale = scale.to("meta")
    elif where == "gate fc2_weight":
        gate["fc2_weight"] = gate["fc2_weight"].to("meta")
    elif where == "SAE dec_weight":
        sae["dec_weight"] = sae["dec_weight"].to("meta")
    else:
        out = (out[0], out[1].to("meta"))
    e = torch.randn(2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=f"{where.replace('[', '.').replace(']', '.')} on meta"):
        triton_sae_steer_gate(e, gate, sae, scale, shift, out=out)
    assert recorded_launches == []


def test_the_launch_runs_with_the_inputs_device_current(monkeypatch, recorded_launches):
    """Triton launches on the current CUDA device: the launch runs inside launch_device(e.device)."""
    import contextlib

    events = []

    @contextlib.contextmanager
    def recording_launch_device(device):
        events.append(("enter", device, len(recorded_launches)))
        yield
        events.append(("exit", device, len(recorded_launches)))

    monkeypatch.setattr(gate_module, "launch_device", recording_launch_device)
    e = torch.randn(2, 16, device=DEVICE)
    triton_sae_steer_gate(e, make_gate(16, 8, 3, 1), make_sae(16, 32, "topk", 2, k=4), *make_steering("scale", 2, 32, 3))
    assert events == [("enter", e.device, 0), ("exit", e.device, 1)]  # the one launch inside


@pytest.mark.parametrize("with_sae", [False, True])
def test_a_logit_of_exactly_zero_prunes_its_head(with_sae):
    """The keep rule is `logits > 0` (DESIGN.md, "The model" 2): heads whose fc2 row and bias are
    zero get a logit of exactly 0 and are pruned, with or without SAE work before the gate."""
    dim, width, batch = 24, 40, 5
    seed = 120 + with_sae
    gate = make_gate(dim, 16, 6, seed)
    gate["fc2_weight"][1::2] = 0.0
    gate["fc2_bias"][1::2] = 0.0
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    sae = make_sae(dim, width, "relu", seed + 1) if with_sae else None
    scale, shift = make_steering("scale+shift", batch, width, seed + 2) if with_sae else (None, None)
    logits, keep = triton_sae_steer_gate(e, gate, sae, scale, shift)
    assert (logits[:, 1::2] == 0).all() and not keep[:, 1::2].any()
    run_and_check(e, gate, sae, scale, shift, "preserve-error", None)


@pytest.mark.parametrize("heads,budget,count", [(1, 0.5, 1), (2, 0.25, 1), (5, 0.5, 3), (6, 0.75, 5), (10, 0.25, 3)])
def test_budget_halves_round_up_in_the_kernel(heads, budget, count):
    """A budget whose b * H is exactly a half keeps round-half-up(b * H) heads (0.5 -> 1, 2.5 -> 3,
    4.5 -> 5), as `reference.heads_for_budget` counts, not Python's round-half-to-even."""
    dim, width, batch = 24, 40, 4
    seed = zlib.crc32(repr(("half", heads, budget)).encode())
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    gate = make_gate(dim, 16, heads, seed + 1)
    for sae, steering in ((None, (None, None)), (make_sae(dim, width, "topk", seed + 2, k=5),
                                                 make_steering("scale", batch, width, seed + 3))):
        logits, keep = triton_sae_steer_gate(e, gate, sae, *steering, budget=budget)
        assert (keep.sum(1) == count).all()
        run_and_check(e, gate, sae, *steering, "preserve-error", budget)


@pytest.mark.parametrize("mode", reference.STEER_MODES)
def test_jumprelu_keeps_only_pre_activations_strictly_above_the_threshold(mode):
    """JumpReLU keeps `pre > threshold`: a latent whose pre-activation equals its threshold exactly
    (integer-valued inputs, exact in any summation order) is off. Row 0 sits on the threshold of
    every even latent, and the steering scale makes each active latent visible in the logits."""
    dim, width, batch = 16, 40, 4
    g = torch.Generator().manual_seed(131)
    sae = make_sae(dim, width, "jumprelu", 131)
    sae["enc_weight"] = torch.randint(-2, 3, (width, dim), generator=g).float().to(DEVICE)
    sae["enc_bias"] = torch.randint(-2, 3, (width,), generator=g).float().to(DEVICE)
    sae["dec_bias"] = torch.randint(-1, 2, (dim,), generator=g).float().to(DEVICE)
    e = torch.randint(-2, 3, (batch, dim), generator=g).float().to(DEVICE)
    pre = (e - sae["dec_bias"]) @ sae["enc_weight"].t() + sae["enc_bias"]
    threshold = pre[1] + 0.5  # odd latents: row 1 just below its threshold
    threshold[0::2] = pre[0, 0::2]  # even latents: row 0 exactly on its threshold
    sae["threshold"] = threshold
    assert (pre[0, 0::2] == sae["threshold"][0::2]).all()
    scale, shift = make_steering("scale", batch, width, 132)
    run_and_check(e, make_gate(dim, 8, 4, 133), sae, scale, shift, mode, None)
    # (a latent on its threshold switched on would move row 0's logits by about its value)
    on = reference.sae_encode(e, sae["enc_weight"], sae["enc_bias"], sae["dec_bias"], "jumprelu",
                              threshold=sae["threshold"] - 0.25)
    assert (on[0, 0::2] != 0).sum() >= 5


@pytest.mark.parametrize("activation,k,steering", [("relu", None, "scale+shift"), ("topk", 5, "scale+shift"),
                                                   ("topk", 5, "shift"), (None, None, "identity")])
def test_strided_decision_vectors_and_steering_slices(activation, k, steering):
    """What the runtime passes: e = x[:, 0] of the residual stream [B, N, D] (row stride N * D), and
    steering rows sliced from the concatenated [B, S_total] table at the site's offset (row stride
    S_total): the kernel reads both by their strides."""
    dim, width, batch, tokens, total = 24, 40, 5, 3, 100
    seed = zlib.crc32(repr(("strided", activation, k, steering)).encode())
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(batch, tokens, dim, generator=g).to(DEVICE)[:, 0]
    assert e.stride(0) == tokens * dim
    sae = make_sae(dim, width, activation, seed + 1, k=k) if activation else None
    scale = shift = None
    if steering != "identity":
        table_scale = (0.5 + 3 * torch.rand(batch, total, generator=g)).to(DEVICE)
        table_shift = (0.5 * torch.randn(batch, total, generator=g)).to(DEVICE)
        scale = table_scale[:, 30:30 + width] if "scale" in steering else None
        shift = table_shift[:, 30:30 + width]
    for mode in reference.STEER_MODES:
        run_and_check(e, make_gate(dim, 16, 6, seed + 2), sae, scale, shift, mode, 0.5)


def test_layer_norm_eps_is_the_gates_own():
    """The gate's LayerNorm uses `norm_eps` from its parameters: decision vectors of a variance
    near eps (1e-6) tell 1e-6 from 1e-5 or any fixed value."""
    e = 1e-3 * torch.randn(4, 32, generator=torch.Generator().manual_seed(141)).to(DEVICE)
    for eps in (1e-6, 1e-5):
        gate = make_gate(32, 16, 6, 142)
        gate["norm_eps"] = eps
        run_and_check(e, gate, None, None, None, "preserve-error", None)


def test_gelu_is_the_erf_form_to_fp32_precision():
    """fc1's weights are zero, so its bias sets every hidden unit: half at sqrt(2), where GELU(erf) is
    most sensitive to its constant 1/sqrt(2), half at 4, weighted by fc2 so the logits' sum cancels
    to ~0 (small rounding) while the units' GELU errors add up: a constant off in its 5th digit
    (0.7071) moves the logits by 3.5e-4, past the tolerance."""
    dim, hidden, heads = 16, 256, 4
    gate = make_gate(dim, hidden, heads, 211)
    units = torch.tensor([2**0.5, 4.0]).repeat(hidden // 2)
    at_sqrt2, at_4 = F.gelu(torch.tensor([2**0.5, 4.0], dtype=torch.float64))
    gate["fc1_weight"] = torch.zeros(hidden, dim, device=DEVICE)
    gate["fc1_bias"] = units.to(DEVICE)
    gate["fc2_weight"] = torch.tensor([1.0, -float(at_sqrt2 / at_4)]).repeat(heads, hidden // 2).to(DEVICE)
    gate["fc2_bias"] = 0.01 * torch.arange(1, heads + 1, device=DEVICE, dtype=torch.float32)  # logits ~ 0.01 .. 0.04
    e = torch.randn(2, dim, generator=torch.Generator().manual_seed(212)).to(DEVICE)
    run_and_check(e, gate, None, None, None, "preserve-error", None)


@pytest.mark.parametrize("mode", reference.STEER_MODES)
def test_shift_decode_covers_every_column(mode):
    """D = 50 over three latent tiles (S = 300): D / 3 rounded down is a power of two (16), so
    only a rounded-up share (32 columns a program) decodes the shift into every column."""
    dim, width, batch = 50, 300, 3
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(151)).to(DEVICE)
    for steering in ("shift", "scale+shift"):
        scale, shift = make_steering(steering, batch, width, 152)
        run_and_check(e, make_gate(dim, 16, 4, 153), make_sae(dim, width, "topk", 154, k=6), scale, shift, mode, None)


@pytest.mark.parametrize("digit_bits", [0, 1, 2])
def test_radix_select_ties_minus_zero_with_zero(digit_bits):
    """-0.0 and +0.0 compare equal, so `reference.topk_mask` takes them in column order: with k
    cutting through a run of mixed-sign zeros, the radix select must keep the lower columns, not
    every +0.0 first (their bit patterns differ)."""
    zeros = torch.tensor([-0.0, 0.0, -0.0, -0.0, 0.0, 0.0, -0.0, 0.0])
    values = torch.cat([zeros, torch.tensor([1.0, 2.0, -1.0, 3.0, -0.5, 0.5, -2.0, 4.0])]).repeat(16, 1)
    values[1::2, :8] = -values[1::2, :8]  # odd rows: the zeros' signs swapped
    for k in range(5, 14):  # 5 positives in each row, then the zeros
        got = torch.zeros(16, 16, dtype=torch.bool, device=DEVICE)
        _topk_rows_probe[(1,)](values.to(DEVICE), got, 16, k, ROWS=16, BLOCK_C=16, DIGIT_BITS=digit_bits)
        assert torch.equal(got.cpu(), reference.topk_mask(values, k)), k


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_partial_decodes_of_more_latent_tiles_than_one_load(activation):
    """S = 600: five latent tiles of 128, more than the PARTIAL_TILES (4) partial decodes a
    finisher sums per load, so the sum takes a second, ragged load (ViT-S's S = 1536 is twelve)."""
    dim, width, batch = 24, 600, 3
    e = torch.randn(batch, dim, generator=torch.Generator().manual_seed(171)).to(DEVICE)
    scale, shift = make_steering("scale+shift", batch, width, 172)
    sae = make_sae(dim, width, activation, 173)
    for mode in reference.STEER_MODES:
        run_and_check(e, make_gate(dim, 16, 4, 174), sae, scale, shift, mode, None)


@pytest.mark.parametrize("activation,k", [(None, None), ("relu", None), ("topk", 5)])
def test_decision_vectors_with_a_column_stride(activation, k):
    """e as a transposed view (column stride B, not 1) is read by its values, as from a copy."""
    dim, width, batch = 24, 40, 5
    e = torch.randn(dim, batch, generator=torch.Generator().manual_seed(181)).to(DEVICE).t()
    assert e.stride(1) != 1
    sae = make_sae(dim, width, activation, 182, k=k) if activation else None
    scale, shift = make_steering("scale+shift", batch, width, 183) if activation else (None, None)
    run_and_check(e, make_gate(dim, 16, 6, 184), sae, scale, shift, "preserve-error", 0.5)

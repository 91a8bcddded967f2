"""Fused SAE -> steer -> gate: one Triton launch per gated block, decision vectors in, keep mask out.

Each program owns one sample row and does, without writing any intermediate to memory:
SAE pre-activations, the activation (TopK / ReLU / JumpReLU), steering, the decode delta, the
gate input g, LayerNorm, Linear -> GELU(erf) -> Linear, the logits and the keep mask.
The math is `headsteer.kernels.reference.sae_steer_gate`; everything is computed in fp32
whatever the storage dtype of the inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from headsteer.kernels import reference

_ACTIVATION_CODES = {"relu": 0, "topk": 1, "jumprelu": 2}

# Register budget (elements) for one 2-D weight tile of a program; with 8 warps this is 64 fp32
# registers per thread, which keeps the SAE tiles spill-free while the latent row stays resident.
_TILE_ELEMENTS = 16384
# The pre-activation row of S latents lives in registers (so z never touches memory); past this
# width it would spill heavily, so wider SAEs are refused rather than silently slow.
MAX_SAE_WIDTH = 16384


@triton.jit
def _topk_select(pre, valid, k):
    """Mask of the k largest entries of `pre` (1-D), ties toward the lower index, like
    `reference.topk_mask`.

    Radix select: floats are mapped to integer keys in [0, 2**32) whose order is the float
    order, the k-th largest key is built bit by bit from the top (32 counting passes over the row),
    then the keys equal to it are taken in index order (an inclusive cumsum) until k are kept."""
    pre = pre + 0.0  # -0.0 -> +0.0 so the two zeros get one key, as they compare equal
    bits = pre.to(tl.int32, bitcast=True)
    # Flipping the magnitude bits of negative floats makes the signed int order the float order;
    # the int64 offset then makes every key non-negative so bits can be set greedily from the top.
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648
    key = tl.where(valid, key, -1)  # padding ranks below every real value (even -inf)
    kth = tl.zeros([], dtype=tl.int64)
    one = tl.full([], 1, dtype=tl.int64)
    for bit in tl.static_range(31, -1, -1):
        candidate = kth | (one << bit)
        at_least = tl.sum((key >= candidate).to(tl.int32), axis=0)
        kth = tl.where(at_least >= k, candidate, kth)
    above = key > kth
    ties_wanted = k - tl.sum(above.to(tl.int32), axis=0)
    tie = (key == kth) & valid
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based position among the ties
    return above | (tie & (tie_rank <= ties_wanted))


@triton.jit
def _sae_steer_gate_kernel(
    e_ptr, stride_eb,
    enc_w_ptr, enc_b_ptr, dec_w_ptr, dec_b_ptr, thr_ptr,
    scale_ptr, stride_scale_b, stride_scale_s,
    shift_ptr, stride_shift_b, stride_shift_s,
    ln_w_ptr, ln_b_ptr, ln_eps,
    fc1_w_ptr, fc1_b_ptr, fc2_w_ptr, fc2_b_ptr,
    logits_ptr, keep_ptr,
    D, S, G, H, sae_k, budget_k,
    HAS_SAE: tl.constexpr, ACTIVATION: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    RECONSTRUCT: tl.constexpr, HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr,
    HAS_FC1_B: tl.constexpr, HAS_FC2_B: tl.constexpr, USE_BUDGET: tl.constexpr,
    BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    CHUNK_G: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0)
    e_row = e_ptr + row * stride_eb
    offs_dfull = tl.arange(0, BLOCK_D)
    dfull_mask = offs_dfull < D
    e = tl.load(e_row + offs_dfull, mask=dfull_mask, other=0.0).to(tl.float32)

    if HAS_SAE:
        # Weights are [S, D] row-major and are streamed in coalesced tiles of CHUNK_S whole rows.
        # The latent row lives in registers as a [BLOCK_S // CHUNK_S, CHUNK_S] tile: registers
        # cannot be indexed, so chunk t is written (and later read) with a select on row t.
        chunk_ids = tl.arange(0, BLOCK_S // CHUNK_S)
        offs_cs = tl.arange(0, CHUNK_S)
        s2d = chunk_ids[:, None] * CHUNK_S + offs_cs[None, :]
        s2d_mask = s2d < S
        num_chunks = tl.cdiv(S, CHUNK_S)
        centered_e = e - tl.load(dec_b_ptr + offs_dfull, mask=dfull_mask, other=0.0).to(tl.float32)
        pre = tl.zeros([BLOCK_S // CHUNK_S, CHUNK_S], dtype=tl.float32)
        for t in range(0, num_chunks):
            s = t * CHUNK_S + offs_cs
            s_mask = s < S
            w = tl.load(enc_w_ptr + s[:, None] * D + offs_dfull[None, :], mask=s_mask[:, None] & dfull_mask[None, :], other=0.0)
            chunk = tl.sum(w.to(tl.float32) * centered_e[None, :], axis=1)
            chunk += tl.load(enc_b_ptr + s, mask=s_mask, other=0.0).to(tl.float32)
            pre = tl.where(chunk_ids[:, None] == t, chunk[None, :], pre)

        if ACTIVATION == 0:  # relu
            z = tl.maximum(pre, 0.0)
        elif ACTIVATION == 1:  # topk: ReLU on the k largest pre-activations (index order = s2d)
            selected = _topk_select(tl.reshape(pre, [BLOCK_S]), tl.reshape(s2d_mask, [BLOCK_S]), sae_k)
            z = tl.where(tl.reshape(selected, [BLOCK_S // CHUNK_S, CHUNK_S]), tl.maximum(pre, 0.0), 0.0)
        else:  # jumprelu
            thr = tl.load(thr_ptr + s2d, mask=s2d_mask, other=0.0).to(tl.float32)
            z = tl.where(pre > thr, pre, 0.0)
        steered = z
        if HAS_SCALE:
            steered = steered * tl.load(scale_ptr + row * stride_scale_b + s2d * stride_scale_s, mask=s2d_mask, other=1.0).to(tl.float32)
        if HAS_SHIFT:
            steered = steered + tl.load(shift_ptr + row * stride_shift_b + s2d * stride_shift_s, mask=s2d_mask, other=0.0).to(tl.float32)
        if RECONSTRUCT:
            coef = steered  # g = W_dec z' + b_dec
            g = tl.load(dec_b_ptr + offs_dfull, mask=dfull_mask, other=0.0).to(tl.float32)
        else:
            coef = steered - z  # g = e + W_dec (z' - z): exactly e when steering is the identity
            g = e
        coef = tl.where(s2d_mask, coef, 0.0)

        # Decode: g += sum_s coef[s] W_dec[s]. Chunks whose coefficients are all zero are skipped,
        # so e.g. an unshifted TopK SAE reads only the decoder rows of its (at most k) active latents.
        for t in range(0, num_chunks):
            c = tl.sum(tl.where(chunk_ids[:, None] == t, coef, 0.0), axis=0)
            if tl.max(tl.abs(c), axis=0) > 0.0:
                s = t * CHUNK_S + offs_cs
                w = tl.load(dec_w_ptr + s[:, None] * D + offs_dfull[None, :], mask=(s < S)[:, None] & dfull_mask[None, :], other=0.0)
                g += tl.sum(w.to(tl.float32) * c[:, None], axis=0)
    else:
        g = e

    # LayerNorm over D (two-pass mean / variance, as torch does).
    mean = tl.sum(tl.where(dfull_mask, g, 0.0), axis=0) / D
    centered = tl.where(dfull_mask, g - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + ln_eps)
    normed = centered * rstd
    if HAS_LN_W:
        normed *= tl.load(ln_w_ptr + offs_dfull, mask=dfull_mask, other=0.0).to(tl.float32)
    if HAS_LN_B:
        normed += tl.load(ln_b_ptr + offs_dfull, mask=dfull_mask, other=0.0).to(tl.float32)

    # fc1 -> GELU -> fc2, CHUNK_G hidden units at a time: the hidden layer is never materialized
    # whole, each chunk is folded straight into the logits.
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    offs_gc = tl.arange(0, CHUNK_G)
    logits = tl.zeros([BLOCK_H], dtype=tl.float32)
    for g0 in range(0, G, CHUNK_G):
        gi = g0 + offs_gc
        g_mask = gi < G
        w1 = tl.load(fc1_w_ptr + gi[:, None] * D + offs_dfull[None, :], mask=g_mask[:, None] & dfull_mask[None, :], other=0.0)
        hidden = tl.sum(w1.to(tl.float32) * normed[None, :], axis=1)
        if HAS_FC1_B:
            hidden += tl.load(fc1_b_ptr + gi, mask=g_mask, other=0.0).to(tl.float32)
        hidden = 0.5 * hidden * (1.0 + tl.math.erf(hidden * 0.7071067811865476))
        hidden = tl.where(g_mask, hidden, 0.0)
        w2 = tl.load(fc2_w_ptr + offs_h[:, None] * G + gi[None, :], mask=h_mask[:, None] & g_mask[None, :], other=0.0)
        logits += tl.sum(w2.to(tl.float32) * hidden[None, :], axis=1)
    if HAS_FC2_B:
        logits += tl.load(fc2_b_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)

    if USE_BUDGET:
        # Rank count over the H logits, identical to reference.topk_mask: i is kept when fewer
        # than budget_k heads beat it (larger, or equal with a lower index).
        rank = tl.zeros([BLOCK_H], dtype=tl.int32)
        for j in range(0, H):
            logit_j = tl.sum(tl.where(offs_h == j, logits, 0.0), axis=0)
            beats = (logit_j > logits) | ((logit_j == logits) & (j < offs_h))
            rank += beats.to(tl.int32)
        keep = rank < budget_k
    else:
        keep = logits > 0.0
    tl.store(logits_ptr + row * H + offs_h, logits, mask=h_mask)
    tl.store(keep_ptr + row * H + offs_h, keep, mask=h_mask)


def _flat_steering(steer: Optional[torch.Tensor], batch: int, width: int, name: str) -> Optional[torch.Tensor]:
    """Broadcast a steering tensor ([S], [1, S] or [B, S]) to a [B, S] view without copying."""
    if steer is None:
        return None
    if steer.shape[-1] != width or steer.dim() > 2:
        raise ValueError(f"{name} must be [B, {width}] (or broadcastable to it), got {tuple(steer.shape)}")
    return steer.expand(batch, width)


def triton_sae_steer_gate(
    e: torch.Tensor,
    gate_params: dict,
    sae_params: Optional[dict] = None,
    steer_scale: Optional[torch.Tensor] = None,
    steer_shift: Optional[torch.Tensor] = None,
    mode: str = "preserve-error",
    budget: Optional[float] = None,
    *,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.sae_steer_gate`: decision vectors [B, D] -> (logits [B, H] float32,
    keep [B, H] bool), in one kernel launch and without a host synchronization.

    Inputs may be fp32/fp16/bf16 (math is fp32). `out=(logits, keep)` writes into preallocated
    tensors (contiguous, float32 and bool)."""
    if mode not in reference.STEER_MODES:
        raise ValueError(f"unknown steering mode {mode!r}; expected one of {reference.STEER_MODES}")
    if e.dim() != 2:
        raise ValueError(f"decision vectors must be [B, D], got {tuple(e.shape)}")
    batch, dim = e.shape
    e = e if e.stride(1) == 1 else e.contiguous()
    fc1_w = gate_params["fc1_weight"].contiguous()
    fc2_w = gate_params["fc2_weight"].contiguous()
    hidden, num_heads = fc1_w.shape[0], fc2_w.shape[0]
    if fc1_w.shape[1] != dim or fc2_w.shape[1] != hidden:
        raise ValueError(f"gate weights {tuple(fc1_w.shape)}, {tuple(fc2_w.shape)} do not fit D={dim}")
    budget_k = reference.heads_for_budget(budget, num_heads) if budget is not None else 0

    if out is None:
        logits = torch.empty(batch, num_heads, device=e.device, dtype=torch.float32)
        keep = torch.empty(batch, num_heads, device=e.device, dtype=torch.bool)
    else:
        logits, keep = out
        if logits.shape != (batch, num_heads) or logits.dtype != torch.float32 or not logits.is_contiguous():
            raise ValueError(f"out logits must be a contiguous float32 [{batch}, {num_heads}] tensor")
        if keep.shape != (batch, num_heads) or keep.dtype != torch.bool or not keep.is_contiguous():
            raise ValueError(f"out keep must be a contiguous bool [{batch}, {num_heads}] tensor")
    if batch == 0:
        return logits, keep

    block_d = triton.next_power_of_2(dim)
    dummy = logits  # stands in for absent optional pointers; never dereferenced (constexpr-guarded)
    sae = sae_params
    if sae is not None:
        activation = sae["activation"]
        if activation not in _ACTIVATION_CODES:
            raise ValueError(f"unknown SAE activation {activation!r}; expected one of {reference.SAE_ACTIVATIONS}")
        enc_w, dec_w = sae["enc_weight"].contiguous(), sae["dec_weight"].contiguous()
        width = enc_w.shape[0]
        if enc_w.shape != (width, dim) or dec_w.shape != (width, dim):
            raise ValueError(f"SAE weights must be [S, {dim}], got {tuple(enc_w.shape)} and {tuple(dec_w.shape)}")
        if width > MAX_SAE_WIDTH:
            raise NotImplementedError(f"fused gate keeps the {width} SAE latents in registers; at most {MAX_SAE_WIDTH} supported")
        sae_k = sae.get("k") or 0
        if activation == "topk" and not 0 <= sae_k <= width:
            raise ValueError(f"topk SAE needs 0 <= k <= {width}, got {sae.get('k')}")
        threshold = sae.get("threshold")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("jumprelu SAE needs a per-latent threshold")
        threshold = threshold.contiguous() if activation == "jumprelu" else dummy
        scale = _flat_steering(steer_scale, batch, width, "steer_scale")
        shift = _flat_steering(steer_shift, batch, width, "steer_shift")
        block_s = triton.next_power_of_2(width)
        chunk_s = max(1, min(block_s, _TILE_ELEMENTS // block_d))
        sae_args = (enc_w, sae["enc_bias"].contiguous(), dec_w, sae["dec_bias"].contiguous(), threshold)
    else:
        activation, width, sae_k, scale, shift = "relu", 1, 0, None, None
        block_s, chunk_s = 1, 1
        sae_args = (dummy,) * 5
    scale_args = (scale, scale.stride(0), scale.stride(1)) if scale is not None else (dummy, 0, 0)
    shift_args = (shift, shift.stride(0), shift.stride(1)) if shift is not None else (dummy, 0, 0)
    ln_w, ln_b = gate_params.get("norm_weight"), gate_params.get("norm_bias")
    fc1_b, fc2_b = gate_params.get("fc1_bias"), gate_params.get("fc2_bias")

    _sae_steer_gate_kernel[(batch,)](
        e, e.stride(0),
        *sae_args,
        *scale_args,
        *shift_args,
        ln_w if ln_w is not None else dummy, ln_b if ln_b is not None else dummy, float(gate_params["norm_eps"]),
        fc1_w, fc1_b if fc1_b is not None else dummy, fc2_w, fc2_b if fc2_b is not None else dummy,
        logits, keep,
        dim, width, hidden, num_heads, sae_k, budget_k,
        HAS_SAE=sae is not None, ACTIVATION=_ACTIVATION_CODES[activation],
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, RECONSTRUCT=mode == "reconstruct",
        HAS_LN_W=ln_w is not None, HAS_LN_B=ln_b is not None,
        HAS_FC1_B=fc1_b is not None, HAS_FC2_B=fc2_b is not None, USE_BUDGET=budget is not None,
        BLOCK_S=block_s, CHUNK_S=chunk_s, BLOCK_D=block_d,
        CHUNK_G=max(1, min(triton.next_power_of_2(hidden), _TILE_ELEMENTS // block_d)),
        BLOCK_H=triton.next_power_of_2(num_heads),
        num_warps=8,
    )
    return logits, keep

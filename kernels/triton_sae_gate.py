"""Fused SAE -> steer -> gate: one Triton launch per gated block, decision vectors in, keep mask out.

The math is `headsteer.kernels.reference.sae_steer_gate`, computed in fp32 whatever the storage
dtype of the inputs. With SAE work the launch is a grid of (latent tile, batch tile) programs, so
that the SAE's two S x D matrices are streamed by many SMs at once, followed by one finisher per
sample; an SAE is 2-10 MB, and one program per sample
reading all of it made the gate latency-bound (measured 140-660 us on an H100 at ViT-S/B sizes).

- Every latent-tile program owns BLOCK_B samples x BLOCK_S latents. It computes that tile of pre-activations
  with tensor-core dots (bf16 weights: bf16 MMAs on an exact three-term split of the fp32
  e - b_dec, `SAE_16BIT_MMA`; other weights: 3xTF32 on CUDA) and writes small things only:
  ReLU / JumpReLU: the tile knows its coefficients z' - z, so it writes its share of the decode,
  `coef @ W_dec[tile]`, as an fp32 partial [BLOCK_B, D].
  TopK: its own k best pre-activations (value, latent index) as candidates. The row's global top
  k lies among them: an entry beaten by k entries of its own tile is beaten by k of the row. A
  steering shift's part of the decode (z' - z = z (scale - 1) + shift) needs no encoder, so the
  programs also split it by D columns: each writes `base + shift @ W_dec[:, its columns]`.
- B one-sample finishers, in the same launch after the latent-tile programs, then complete each
  row: global TopK over the candidates (radix select), the decode of the selected latents as a
  gathered FMA reduction, the partials summed in tile order (deterministic: no floating-point
  atomics), then LayerNorm -> Linear -> GELU(erf) -> Linear, the logits and the keep mask. Each
  waits on an atomic counter for its batch tile's latent tiles; programs take their roles from
  an atomic ticket, so a waiting finisher only ever waits on programs that are already running
  (no grid barrier, no deadlock, and Triton's serial CPU interpreter, which runs programs in
  ticket order, never waits). (The last latent-tile program of each batch tile running its 16
  rows, as on the H200 on 2026-11-26, was 2.3-2.5x slower on an H100 and has been removed.)

The SAE latents z never go to memory as a [B, S] tensor: only partial decodes, up to k
candidates per row and latent tile, the k selected (latent, coefficient) pairs per row and the
gate input g do. Gated blocks without SAE work (no SAE, or identity steering in "preserve-error"
mode, where g = e) take one program per sample that goes straight to the gate with FMA
reductions: B programs in parallel beat B/16 programs each running a chain of small dots.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional

import torch
import triton
import triton.language as tl

from headsteer.kernels import reference
from headsteer.kernels.aot import check_devices, fp32_dot_precision, launch_device, targets_cuda
from headsteer.kernels.launch_math import cdiv, next_power_of_2
from headsteer.kernels.triton_layer_norm import layer_norm_apply, layer_norm_stats

_ACTIVATION_CODES = {"relu": 0, "topk": 1, "jumprelu": 2}

# Samples per latent-tile program when there is SAE work (tl.dot needs every dimension >= 16;
# more rows would share each encoder tile among more samples). Finishers, and every program of a
# gate without SAE work, own one sample.
BLOCK_B = 16
# Latents per program: each program streams BLOCK_S rows of the encoder (and the decoder).
BLOCK_S = 128
# Benchmarks only (`--gate-sweep`): True launches only the latent-tile programs of a gate with SAE
# work, so their time (the SAE's first phase) can be read apart from the whole launch's; logits
# and keep are then left unwritten.
_LATENT_TILES_ONLY = False
# The SAE's dots with 16-bit weights as 16-bit MMAs, whose products are exact in the fp32
# accumulator: the encoder when W_enc is bf16 (the fp32 e - b_dec split into three exact bf16
# terms: per 32-wide reduction step a warp issues 12 bf16 mma.sync instead of 24 3xTF32 ones,
# sm_90 PTX), the shift decode when steer_shift and W_dec share a 16-bit dtype (exact as they
# are). Both are on the latent tiles' critical path. False: 3xTF32 on fp32 values, as timed on
# the H200 on 2026-11-26 (`--gate-sweep` compares; untimed).
SAE_16BIT_MMA = True
# Reduction step over D of the encoder on the 16-bit split path (SAE_16BIT_MMA). 32 took the
# latent-tile phase 19.3 / 26.7 us at ViT-S / ViT-B on an H100 (12 / 24 steps): ~0.6 us per step,
# as if each step of the 3-stage pipelined loop waited on about half a load round trip, while
# twice the MMAs (3xTF32) cost only 10%. 128 quarters the chain of steps (36 KiB staged per stage,
# at most 202 registers, no spills at sm_90): the whole TopK gate with a steering scale went from
# 84.4 to 55.1 us at ViT-B and 35.0 to 34.1 us at ViT-S (H100, 2026-11-27; `--gate-sweep`
# compares 32 and 64). The 3xTF32 path keeps 32 (its fp32 operand copies would spill wider).
ENCODER_BLOCK_K = 128
# Tests only: the encoder's three-term split for fp16 weights too, whose low terms underflow for
# |e - b_dec| below ~1e-3 (absolute error under 2**-24 per element, a relative one up to ~3e-4)
# and whose hi term overflows above 65504: the CPU interpreter cannot run bf16 dots, so this is
# how it runs the split's code.
_ENCODER_SPLIT_FP16 = False
# Independent accumulator chains of the shift decode (TopK with a steering shift), 1, 2 or 4: its
# dots have M = 16 rows and run S latents deep (1536 at ViT-S), i.e. on sm_90 a chain of 576
# dependent 3xTF32 mma.sync per 8 output columns in one accumulator (1: as timed on the H200 on
# 2026-11-26; `--gate-sweep` compares; untimed).
SHIFT_DECODE_CHAINS = 4
# Warps of every gate program (`python -m headsteer.bench.kernels --gate-sweep` times others).
GATE_WARPS = 8
# Software-pipeline depth of a one-sample program's fc1/fc2 loop, a chain of L2 round trips: 1 =
# plain loads, each step waiting on its own (as timed on the H200 on 2026-11-26); S >= 2 stages
# copy weight tiles into S - 1 shared-memory slots with cp.async. Triton issues the copy of step
# i + S - 1 at the end of step i and waits for step i's at its start, so S = 2 overlaps nothing
# (its TTGIR waits for every outstanding copy at the top of the loop) and S = 4 keeps the next two
# steps' tiles in flight while one reduces: all three of ViT-S's steps are issued before the first
# reduction, and ViT-B's twelve wait on about one round trip instead of twelve. At most this
# deep: the launcher takes fewer slots where they would pass _GATE_SHARED_BUDGET (`gate_stages`).
GATE_STAGES = 4
# Shared memory the staged weight tiles may take: 16-bit gates get their 3 slots (96-99 KiB at
# ViT-S/B, so 2 programs still fit on an sm_90 SM); fp32 tiles are twice the bytes and run unstaged.
_GATE_SHARED_BUDGET = 100 * 1024
# Bits of the TopK radix select's digit per pass (`_topk_rows`): 0 picks 3 for rows of up to 128
# columns (a latent tile; a finisher's candidates at small S) and 2 for wider ones; 1 is the
# bit-by-bit select timed on the H200 on 2026-11-26 (32 passes; `--gate-sweep` compares).
TOPK_DIGIT_BITS = 0
# The finisher ranks all of a row's candidates (latent tiles x min(k, BLOCK_S)) in registers.
MAX_TOPK_CANDIDATES = 16384
# Half the register budget (elements) of a finisher's per-step tile, its gathered [K_STEP, columns]
# decoder rows or its [PARTIAL_TILES, columns] partials: it sets how many columns of g a step
# assembles (FIN_CHUNK_D).
_TILE_ELEMENTS = 4096
# Register budget (elements) of one fc1 weight tile of a one-sample gate: CHUNK_G whole rows of D.
_GATE_TILE_ELEMENTS = 16384


@contextlib.contextmanager
def gate_constants(**values) -> Iterator[None]:
    """Launch with some of this module's tuning constants (BLOCK_S, GATE_WARPS, GATE_STAGES,
    SAE_16BIT_MMA, ...) set to `values` inside the block, then restore them; for sweeps,
    tests and compile reports."""
    module = sys.modules[__name__]
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@triton.jit
def _order_keys(values):
    """Unsigned 32-bit keys whose order is the order `reference.topk_mask` ranks floats in:
    -0.0 and +0.0 get one key (they compare equal), every NaN the key of +NaN, above +inf."""
    values = values + 0.0  # -0.0 -> +0.0
    values = tl.where(values != values, float("nan"), values)  # every NaN positive: ranks first, as in torch.sort
    bits = values.to(tl.int32, bitcast=True)
    # Flipping the magnitude bits of negative floats makes the signed int order the float order;
    # flipping the sign bit too makes the unsigned order the float order.
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF) ^ -2147483648).to(tl.uint32, bitcast=True)


@triton.jit
def _topk_rows_bitwise(values, valid, k):
    """`_topk_rows` one bit per pass, as timed on the H200 on 2026-11-26 (TOPK_DIGIT_BITS = 1).

    Radix select: floats are mapped to integer keys in [0, 2**32) whose order is the float order,
    each row's k-th largest key is built bit by bit from the top (32 counting passes), then the
    keys equal to it are taken in column order (an inclusive cumsum) until k are kept. A row with
    fewer than k valid entries keeps all of them."""
    # (as int64, so every key is non-negative and padding can rank below every real value)
    key = tl.where(valid, _order_keys(values).to(tl.int64), -1)
    kth = tl.zeros_like(tl.max(key, axis=1))
    one = tl.full([], 1, dtype=tl.int64)
    for bit in tl.static_range(31, -1, -1):
        candidate = kth | (one << bit)
        at_least = tl.sum((key >= candidate[:, None]).to(tl.int32), axis=1)
        kth = tl.where(at_least >= k, candidate, kth)
    above = key > kth[:, None]
    ties_wanted = k - tl.sum(above.to(tl.int32), axis=1)
    tie = (key == kth[:, None]) & valid
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)  # 1-based position among the row's ties
    return above | (tie & (tie_rank <= ties_wanted[:, None]))


@triton.jit
def _pick_digit(counts, remaining, DIGIT_VALUES: tl.constexpr, FIELD_BITS: tl.constexpr):
    """One radix pass's choice, per row: the largest digit whose keys, with those of the larger
    digits, reach `remaining` (counts: one FIELD_BITS-bit count per digit value, packed in an
    int64); returns (that digit, how many keys have a larger one)."""
    FIELD_MASK: tl.constexpr = (1 << FIELD_BITS) - 1
    above = tl.zeros_like(remaining)
    chosen = tl.zeros_like(remaining)
    found = remaining < 0  # (all False)
    for d in tl.static_range(DIGIT_VALUES - 1, -1, -1):
        count = ((counts >> (d * FIELD_BITS)) & FIELD_MASK).to(tl.int32)
        hit = (above + count >= remaining) & ~found
        chosen = tl.where(hit, d, chosen)
        above = tl.where(found | hit, above, above + count)
        found = found | hit
    return chosen, above


@triton.jit
def _topk_rows(values, valid, k, DIGIT_BITS: tl.constexpr):
    """Mask of the k largest valid entries of each row of a 2-D tile, ties toward the lower
    column, like `reference.topk_mask` (which also ranks NaN above everything). A row with fewer
    than k valid entries keeps all of them.

    Radix select: floats map to unsigned 32-bit keys whose order is the float order, and each
    row's k-th largest key is built from the top, DIGIT_BITS bits per pass (0: 3 for rows of up
    to 128 columns, else 2; 1: `_topk_rows_bitwise`, as timed on the H200). A pass counts, for
    every value of the next digit, the row's keys that match the digits chosen so far and have
    that digit: the counts are fields of one int64 per entry (1 << digit * FIELD_BITS), so a pass
    is one sum across the row, then the digit is picked from the counts (row scalars). Each sum
    is a chain of shuffles and CTA barriers (three per pass on sm_90) that dwarfs a pass's
    arithmetic, so fewer, wider passes: 11 or 16 instead of 32 one-bit passes. The keys equal to
    the k-th are then taken in column order (an inclusive cumsum) until k are kept."""
    if DIGIT_BITS == 1:
        return _topk_rows_bitwise(values, valid, k)
    COLUMNS: tl.constexpr = values.shape[1]
    BITS: tl.constexpr = DIGIT_BITS if DIGIT_BITS > 0 else (3 if COLUMNS <= 128 else 2)
    # A digit's 2**BITS counts share 64 bits; a count never exceeds COLUMNS (< 2**FIELD_BITS).
    DIGIT_VALUES: tl.constexpr = 1 << BITS
    FIELD_BITS: tl.constexpr = 64 // DIGIT_VALUES
    tl.static_assert(COLUMNS < (1 << FIELD_BITS), "too many columns for the radix select's count fields")
    FIELD_MASK: tl.constexpr = (1 << FIELD_BITS) - 1
    PASSES: tl.constexpr = (32 + BITS - 1) // BITS
    # Digits are taken from a PASSES * BITS-bit key (33 bits for 3-bit digits: the first digit's
    # top bit is always 0), so every pass's digit has the same width.
    TOP_LOW: tl.constexpr = PASSES * BITS - BITS  # the first digit's lowest bit
    key = _order_keys(values)
    one = tl.full([], 1, dtype=tl.int64)

    # Pass 0, every valid key matching the empty prefix; its counts also give each row's valid
    # count, which caps k.
    digit = ((key >> TOP_LOW) & (DIGIT_VALUES - 1)).to(tl.int32)
    counts = tl.sum(tl.where(valid, one << (digit * FIELD_BITS).to(tl.int64), 0), axis=1)
    valid_count = tl.zeros([values.shape[0]], dtype=tl.int32)
    for d in tl.static_range(DIGIT_VALUES):
        valid_count += ((counts >> (d * FIELD_BITS)) & FIELD_MASK).to(tl.int32)
    remaining = tl.maximum(tl.minimum(valid_count, k), 0)  # the k-th's rank among the keys matching its digits so far (k < 0 keeps none, as k = 0)
    chosen, above = _pick_digit(counts, remaining, DIGIT_VALUES, FIELD_BITS)
    remaining -= above
    kth = chosen.to(tl.uint32) << TOP_LOW  # the k-th largest key, digits chosen so far
    # Passes 1.. as a loop, not unrolled: one copy of a pass in the compiled kernel instead of
    # PASSES (the select runs twice per gate; unrolled, the kernel took twice as long to compile
    # and its code was twice the size). Shifts stay below 32: the digit below the first one ends
    # at bit TOP_LOW <= 30.
    for p in range(1, PASSES):
        high = tl.cast(TOP_LOW - (p - 1) * BITS, tl.uint32)  # one past the digit's top bit
        low = high - BITS
        digit = ((key >> low) & (DIGIT_VALUES - 1)).to(tl.int32)
        match = valid & ((key >> high) == (kth >> high)[:, None])
        counts = tl.sum(tl.where(match, one << (digit * FIELD_BITS).to(tl.int64), 0), axis=1)
        chosen, above = _pick_digit(counts, remaining, DIGIT_VALUES, FIELD_BITS)
        remaining -= above
        kth = kth | (chosen.to(tl.uint32) << low)
    # k = 0 (or no valid entry) leaves remaining 0 and kth all ones, above every key: none kept.
    tie = (key == kth[:, None]) & valid
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)  # 1-based position among the row's ties
    return ((key > kth[:, None]) & valid) | (tie & (tie_rank <= remaining[:, None]))


@triton.jit
def _gate_input_chunk(e_ptr, stride_eb, g_ptr, dec_b_ptr, rows, row_mask, d0, D, SOURCE: tl.constexpr,
                      CHUNK_D: tl.constexpr):
    """Columns [d0, d0 + CHUNK_D) of the gate input g for `rows`, fp32 (zeros past D):
    SOURCE 0 = e itself, 1 = g as assembled in the scratch buffer, 2 = b_dec on every row."""
    dd = d0 + tl.arange(0, CHUNK_D)
    d_mask = dd < D
    mask = row_mask[:, None] & d_mask[None, :]
    if SOURCE == 0:
        return tl.load(e_ptr + rows[:, None] * stride_eb + dd[None, :], mask=mask, other=0.0).to(tl.float32)
    elif SOURCE == 1:  # written by other programs of this launch: read from L2, never a stale L1 line
        return tl.load(g_ptr + rows[:, None] * D + dd[None, :], mask=mask, other=0.0, cache_modifier=".cg")
    else:
        return tl.where(mask, tl.load(dec_b_ptr + dd, mask=d_mask, other=0.0).to(tl.float32)[None, :], 0.0)


@triton.jit
def _shift_decode_dot(acc, shift_ptr, stride_shift_b, stride_shift_s, dec_w_ptr, rows, row_mask, kk, S, D, dd, d_mask,
                      PRECISION: tl.constexpr, OPERANDS_16BIT: tl.constexpr):
    """acc + shift[rows, kk] @ W_dec[kk, dd] in fp32 (latents kk past S contribute nothing):
    16-bit operands as they are (OPERANDS_16BIT: exact products), else fp32 ones."""
    k_mask = kk < S
    shift = tl.load(shift_ptr + rows[:, None] * stride_shift_b + kk[None, :] * stride_shift_s,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
    w_dec = tl.load(dec_w_ptr + kk[:, None] * D + dd[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
    if OPERANDS_16BIT:
        return tl.dot(shift, w_dec, acc)
    return tl.dot(shift.to(tl.float32), w_dec.to(tl.float32), acc, input_precision=PRECISION)


@triton.jit
def _selected_latents(sel_idx_ptr, sel_coef_ptr, rows, row_mask, j0, sae_k, K_STEP: tl.constexpr):
    """Selected latents j0 .. j0 + K_STEP - 1 of each row: (latent index, decode coefficient, mask)."""
    j = j0 + tl.arange(0, K_STEP)
    sel_mask = row_mask[:, None] & (j < sae_k)[None, :]
    flat = rows[:, None] * sae_k + j[None, :]
    latent = tl.load(sel_idx_ptr + flat, mask=sel_mask, other=0)
    sel_coef = tl.load(sel_coef_ptr + flat, mask=sel_mask, other=0.0)
    return latent, sel_coef, sel_mask


@triton.jit
def _decode_step(dec_w_ptr, latent, sel_coef, sel_mask, dd, d_mask, D):
    """sum_j sel_coef[b, j] W_dec[latent[b, j], dd] for a [rows, K_STEP] block of selected
    latents: a gathered [rows, K_STEP, len(dd)] tile reduced with fp32 FMAs."""
    w_sel = tl.load(dec_w_ptr + latent[:, :, None].to(tl.int64) * D + dd[None, None, :],
                    mask=sel_mask[:, :, None] & d_mask[None, None, :], other=0.0).to(tl.float32)
    return tl.sum(sel_coef[:, :, None] * w_sel, axis=1)


# Batch-dependent ints are not specialized (Triton would compile a variant for each of ==1, % 16
# and other): they bound loops and masks and count rows, never the contiguous stride of a load,
# so one compile of this kernel (2-4 s for sm_90 on one CPU core) serves every batch size.
@triton.jit(do_not_specialize=["B", "budget_k", "num_b_tiles"])
def _sae_steer_gate_kernel(
    e_ptr, stride_eb,
    enc_w_ptr, enc_b_ptr, dec_w_ptr, dec_b_ptr, thr_ptr,
    scale_ptr, stride_scale_b, stride_scale_s,
    shift_ptr, stride_shift_b, stride_shift_s,
    ln_w_ptr, ln_b_ptr, ln_eps,
    fc1_w_ptr, fc1_b_ptr, fc2_w_ptr, fc2_b_ptr,
    logits_ptr, keep_ptr,
    counter_ptr, partial_ptr, cand_val_ptr, cand_idx_ptr, sel_idx_ptr, sel_coef_ptr, g_ptr,
    B, D, S, G, H, sae_k, cand_per_tile, budget_k, num_b_tiles, num_s_tiles,
    ACTIVATION: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    RECONSTRUCT: tl.constexpr, PARTIAL: tl.constexpr, GATHER: tl.constexpr,
    SHIFT_DECODE: tl.constexpr, SPLIT: tl.constexpr,
    HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, HAS_FC1_B: tl.constexpr, HAS_FC2_B: tl.constexpr,
    USE_BUDGET: tl.constexpr, G_SOURCE: tl.constexpr, PRECISION: tl.constexpr, ENCODE_16BIT: tl.constexpr,
    SHIFT_CHAINS: tl.constexpr, SHIFT_16BIT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, ENC_BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr, FIN_CHUNK_D: tl.constexpr, SLICE_D: tl.constexpr, SLICE_CHUNK: tl.constexpr, PARTIAL_TILES: tl.constexpr,
    BLOCK_C: tl.constexpr, K_STEP: tl.constexpr, CHUNK_G: tl.constexpr, GATE_STAGES: tl.constexpr,
    BLOCK_H: tl.constexpr, TOPK_DIGIT_BITS: tl.constexpr,
):
    # Tile sizes: BLOCK_B samples and BLOCK_S latents per latent-tile program; ENC_BLOCK_K the encoder's and
    # BLOCK_K the shift decode's reduction step; BLOCK_D >= D; CHUNK_D columns of g per step; SLICE_D columns
    # of the shift decode per program (SLICE_CHUNK at a time); PARTIAL_TILES partials per load;
    # BLOCK_C >= a row's TopK candidates; K_STEP selected latents per row per decode step; CHUNK_G
    # hidden units of the gate per step; BLOCK_H >= H.
    # Roles:
    # - SPLIT (SAE work): a 1-D grid of num_b_tiles * num_s_tiles latent-tile programs, then B
    #   one-sample finishers, each gating one row (phase 2). Roles go by a ticket drawn from an
    #   atomic counter, not by program id: a finisher (a late ticket) waits only on tiles whose
    #   tickets were drawn earlier, i.e. by programs already running, so the wait always ends (as
    #   in a decoupled look-back scan); the serial CPU interpreter draws tickets in program order
    #   and never waits.
    # - otherwise: one program per sample (grid axis 0 is the batch, up to 2**31 - 1 programs).
    if SPLIT:
        ticket = tl.atomic_add(counter_ptr + num_b_tiles, 1, sem="relaxed")
        tiles_total = num_b_tiles * num_s_tiles
        do_tile = ticket < tiles_total
        sample = ticket - tiles_total
        tile_b = tl.where(do_tile, ticket // num_s_tiles, sample // BLOCK_B)
        tile_s = ticket % num_s_tiles
        offs_b = tl.arange(0, BLOCK_B)
        rows = tile_b * BLOCK_B + offs_b  # a latent-tile program's batch tile
        row_mask = rows < B
    else:
        sample = tl.program_id(0)

    # ---- Phase 1, every latent-tile program: one [BLOCK_B, BLOCK_S] tile of latents. ----
    finishing = True  # without SAE work every program finishes its own sample
    if SPLIT:
        if do_tile:
            offs_s = tile_s * BLOCK_S + tl.arange(0, BLOCK_S)
            s_mask = offs_s < S
            tile_mask = row_mask[:, None] & s_mask[None, :]
            if PARTIAL or GATHER:  # both need the tile's pre-activations
                pre = tl.zeros([BLOCK_B, BLOCK_S], dtype=tl.float32)
                if ENCODE_16BIT:
                    pre_low = tl.zeros([BLOCK_B, BLOCK_S], dtype=tl.float32)  # the mid and lo terms' chain
                for k0 in range(0, D, ENC_BLOCK_K):
                    kk = k0 + tl.arange(0, ENC_BLOCK_K)
                    k_mask = kk < D
                    e_tile = tl.load(e_ptr + rows[:, None] * stride_eb + kk[None, :],
                                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                    b_dec = tl.load(dec_b_ptr + kk, mask=k_mask, other=0.0)
                    w_enc = tl.load(enc_w_ptr + offs_s[:, None] * D + kk[None, :],
                                    mask=s_mask[:, None] & k_mask[None, :], other=0.0)
                    centered = e_tile.to(tl.float32) - b_dec.to(tl.float32)[None, :]
                    if ENCODE_16BIT:
                        # W_enc is bf16, so only the fp32 (e - b_dec) needs splitting: into three
                        # bf16 terms hi + mid + lo (each remainder is exact in fp32, and three terms
                        # of 8 significant bits hold fp32's 24, for |e - b_dec| from 2**-110 up to
                        # within 0.2% of fp32's max, where hi rounds to inf, as TF32 would), whose
                        # products with W are exact in the fp32 accumulator: fp32-level like
                        # 3xTF32, in half its MMAs.
                        # Centring first keeps the error relative to |e - b_dec| (e W - b_dec W
                        # would cancel large e and b_dec: ViTs' massive activations). mid and lo
                        # accumulate apart, a second MMA chain beside hi's.
                        hi = centered.to(enc_w_ptr.dtype.element_ty)
                        rest = centered - hi.to(tl.float32)
                        mid = rest.to(enc_w_ptr.dtype.element_ty)
                        lo = (rest - mid.to(tl.float32)).to(enc_w_ptr.dtype.element_ty)
                        pre = tl.dot(hi, tl.trans(w_enc), pre)
                        pre_low = tl.dot(lo, tl.trans(w_enc), tl.dot(mid, tl.trans(w_enc), pre_low))
                    else:
                        pre = tl.dot(centered, tl.trans(w_enc.to(tl.float32)), pre, input_precision=PRECISION)
                if ENCODE_16BIT:
                    pre += pre_low
                pre += tl.load(enc_b_ptr + offs_s, mask=s_mask, other=0.0).to(tl.float32)[None, :]
            if PARTIAL:
                # ReLU / JumpReLU: the tile knows its latents' full coefficients of the decode
                # g += (z' - z) W_dec (or z' W_dec to reconstruct) and writes its share of it.
                if ACTIVATION == 0:
                    z = tl.maximum(pre, 0.0, propagate_nan=tl.PropagateNan.ALL)  # F.relu keeps NaN
                else:
                    threshold = tl.load(thr_ptr + offs_s, mask=s_mask, other=0.0).to(tl.float32)
                    z = tl.where(pre > threshold[None, :], pre, 0.0)
                steered = z
                if HAS_SCALE:
                    steered = steered * tl.load(
                        scale_ptr + rows[:, None] * stride_scale_b + offs_s[None, :] * stride_scale_s,
                        mask=tile_mask, other=1.0).to(tl.float32)
                if HAS_SHIFT:
                    steered = steered + tl.load(
                        shift_ptr + rows[:, None] * stride_shift_b + offs_s[None, :] * stride_shift_s,
                        mask=tile_mask, other=0.0).to(tl.float32)
                coef = tl.where(tile_mask, steered if RECONSTRUCT else steered - z, 0.0)
                for d0 in range(0, D, CHUNK_D):
                    dd = d0 + tl.arange(0, CHUNK_D)
                    d_mask = dd < D
                    w_dec = tl.load(dec_w_ptr + offs_s[:, None] * D + dd[None, :],
                                    mask=s_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
                    part = tl.dot(coef, w_dec, input_precision=PRECISION)
                    tl.store(partial_ptr + (tile_s.to(tl.int64) * B + rows[:, None]) * D + dd[None, :], part,
                             mask=row_mask[:, None] & d_mask[None, :])
            if SHIFT_DECODE:
                # TopK with a shift: z' - z = z (scale - 1) + shift. The shift part does not depend on
                # the encoder, so it is decoded here by D columns instead of by latents: this program
                # writes g = base + shift @ W_dec for its SLICE_D columns over all S latents, which
                # needs no cross-program sum. The z part (k latents per row) is left to the finisher.
                for c0 in range(0, SLICE_D, SLICE_CHUNK):  # SLICE_CHUNK divides SLICE_D: no column twice
                    dd = tile_s * SLICE_D + c0 + tl.arange(0, SLICE_CHUNK)
                    d_mask = dd < D
                    if tile_s * SLICE_D + c0 < D:
                        acc = _gate_input_chunk(e_ptr, stride_eb, g_ptr, dec_b_ptr, rows, row_mask,
                                                tile_s * SLICE_D + c0, D, 2 if RECONSTRUCT else 0, SLICE_CHUNK)
                        # SHIFT_CHAINS independent accumulators over interleaved latent blocks: on M =
                        # 16 rows each dot is a chain of dependent mma.sync (3 per 8 latents in
                        # 3xTF32), S long, so separate chains overlap in the tensor pipe; they are
                        # summed in a fixed order after the loop.
                        acc1 = tl.zeros_like(acc)
                        acc2 = tl.zeros_like(acc)
                        acc3 = tl.zeros_like(acc)
                        for k0 in range(0, S, SHIFT_CHAINS * BLOCK_K):
                            kk = k0 + tl.arange(0, BLOCK_K)
                            acc = _shift_decode_dot(acc, shift_ptr, stride_shift_b, stride_shift_s, dec_w_ptr, rows,
                                                    row_mask, kk, S, D, dd, d_mask, PRECISION, SHIFT_16BIT)
                            if SHIFT_CHAINS >= 2:
                                acc1 = _shift_decode_dot(acc1, shift_ptr, stride_shift_b, stride_shift_s, dec_w_ptr, rows,
                                                         row_mask, kk + BLOCK_K, S, D, dd, d_mask, PRECISION, SHIFT_16BIT)
                            if SHIFT_CHAINS >= 4:
                                acc2 = _shift_decode_dot(acc2, shift_ptr, stride_shift_b, stride_shift_s, dec_w_ptr, rows,
                                                         row_mask, kk + 2 * BLOCK_K, S, D, dd, d_mask, PRECISION, SHIFT_16BIT)
                                acc3 = _shift_decode_dot(acc3, shift_ptr, stride_shift_b, stride_shift_s, dec_w_ptr, rows,
                                                         row_mask, kk + 3 * BLOCK_K, S, D, dd, d_mask, PRECISION, SHIFT_16BIT)
                        acc += (acc1 + acc2) + acc3  # (zeros for chains not used: exact)
                        tl.store(g_ptr + rows[:, None] * D + dd[None, :], acc, mask=row_mask[:, None] & d_mask[None, :])
            if GATHER:
                # The tile's own top min(k, BLOCK_S) per row, packed in latent order into its slots.
                chosen = _topk_rows(pre, tile_mask, cand_per_tile, TOPK_DIGIT_BITS)
                slot = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
                dst = rows[:, None] * (num_s_tiles * cand_per_tile) + tile_s * cand_per_tile + slot
                tl.store(cand_val_ptr + dst, pre, mask=chosen)
                tl.store(cand_idx_ptr + dst, tl.broadcast_to(offs_s[None, :], [BLOCK_B, BLOCK_S]), mask=chosen)
            # Make this CTA's stores visible before announcing them (release; acq_rel as compiled
            # and timed on an H100).
            tl.debug_barrier()
            arrived = tl.atomic_add(counter_ptr + tile_b, 1, sem="acq_rel")
            # Never: latent-tile programs leave the gate to the finishers. (A tensor, as in the
            # other branch of the runtime `if do_tile`; the count starts at 0.)
            finishing = arrived == -1
        else:
            # A one-sample finisher: wait (acquire) until every latent tile of its batch tile is done.
            arrived = tl.atomic_add(counter_ptr + tile_b, 0, sem="acquire")
            while arrived < num_s_tiles:
                arrived = tl.atomic_add(counter_ptr + tile_b, 0, sem="acquire")
            finishing = arrived >= num_s_tiles

    # ---- Phase 2, one sample per program: the gate input g, then the gate. ----
    if finishing:
        fin_rows = sample + tl.arange(0, 1)  # (the sample as a [1] row block, for 2-D tiles)
        fin_mask = fin_rows < B
        if GATHER:
            num_cand = num_s_tiles * cand_per_tile
            slots = tl.arange(0, BLOCK_C)
            slot_tile = slots // cand_per_tile
            # Slot j of a tile is written only if the tile had more than j real latents.
            slot_valid = (slots < num_cand) & (slots % cand_per_tile < S - slot_tile * BLOCK_S)
            # (Names differ from phase 1's: Triton types variables by first use.)
            cand_valid = fin_mask[:, None] & slot_valid[None, :]
            src = fin_rows[:, None] * num_cand + slots[None, :]
            cand_pre = tl.load(cand_val_ptr + src, mask=cand_valid, other=0.0, cache_modifier=".cg")
            cand_latent = tl.load(cand_idx_ptr + src, mask=cand_valid, other=0, cache_modifier=".cg")
            # Candidates sit in latent order, so column order breaks ties as the spec does.
            selected = _topk_rows(cand_pre, cand_valid, sae_k, TOPK_DIGIT_BITS)
            cand_z = tl.maximum(cand_pre, 0.0, propagate_nan=tl.PropagateNan.ALL)
            if HAS_SCALE:
                cand_scale = tl.load(
                    scale_ptr + fin_rows[:, None] * stride_scale_b + cand_latent * stride_scale_s,
                    mask=selected, other=1.0).to(tl.float32)
                cand_coef = cand_z * cand_scale if RECONSTRUCT else cand_z * (cand_scale - 1.0)
            else:
                cand_coef = cand_z  # only reached when reconstructing: preserve-error cancels z
            sel_slot = fin_rows[:, None] * sae_k + tl.cumsum(selected.to(tl.int32), axis=1) - 1
            tl.store(sel_idx_ptr + sel_slot, cand_latent, mask=selected)
            tl.store(sel_coef_ptr + sel_slot, cand_coef, mask=selected)
            tl.debug_barrier()

        if SPLIT:
            if GATHER:
                first_latent, first_coef, first_mask = _selected_latents(sel_idx_ptr, sel_coef_ptr, fin_rows, fin_mask, 0,
                                                                         sae_k, K_STEP)
            for d0 in range(0, D, FIN_CHUNK_D):
                dd = d0 + tl.arange(0, FIN_CHUNK_D)
                d_mask = dd < D
                out_mask = fin_mask[:, None] & d_mask[None, :]
                # base (e, or b_dec to reconstruct), already with the shift decoded when SHIFT_DECODE
                acc = _gate_input_chunk(e_ptr, stride_eb, g_ptr, dec_b_ptr, fin_rows, fin_mask, d0, D,
                                        1 if SHIFT_DECODE else 2 if RECONSTRUCT else 0, FIN_CHUNK_D)
                if PARTIAL:
                    # The latent tiles' partial decodes, PARTIAL_TILES at a time, in a fixed order:
                    # the same bits on every run (no floating-point atomics).
                    for t0 in range(0, num_s_tiles, PARTIAL_TILES):
                        tiles = t0 + tl.arange(0, PARTIAL_TILES)
                        parts = tl.load(partial_ptr + ((tiles.to(tl.int64)[:, None, None] * B + fin_rows[None, :, None]) * D
                                                       + dd[None, None, :]),
                                        mask=(tiles < num_s_tiles)[:, None, None] & out_mask[None, :, :], other=0.0,
                                        cache_modifier=".cg")
                        acc += tl.sum(parts, axis=0)
                if GATHER:
                    # sum_j coef[b, j] W_dec[latent[b, j]] over the k selected latents of each
                    # row, K_STEP of them per step as exact fp32 FMA reductions of a gathered
                    # [1, K_STEP, FIN_CHUNK_D] tile (each gathered decoder row is contiguous).
                    # The first step's latents were loaded once for every chunk (all of them when
                    # k <= K_STEP, e.g. k = 16), so a chunk waits on one gather, not on two loads.
                    acc += _decode_step(dec_w_ptr, first_latent, first_coef, first_mask, dd, d_mask, D)
                    for j0 in range(K_STEP, sae_k, K_STEP):
                        latent, sel_coef, sel_mask = _selected_latents(sel_idx_ptr, sel_coef_ptr, fin_rows, fin_mask, j0,
                                                                       sae_k, K_STEP)
                        acc += _decode_step(dec_w_ptr, latent, sel_coef, sel_mask, dd, d_mask, D)
                tl.store(g_ptr + fin_rows[:, None] * D + dd[None, :], acc, mask=out_mask)
            tl.debug_barrier()

        # LayerNorm statistics over D (two passes over the registers, mean then variance, as
        # torch does) from one load of the whole row of g.
        offs_d = tl.arange(0, BLOCK_D)
        d_full = offs_d < D
        whole = _gate_input_chunk(e_ptr, stride_eb, g_ptr, dec_b_ptr, fin_rows, fin_mask, 0, D, G_SOURCE, BLOCK_D)
        mean, rstd = layer_norm_stats(whole, d_full, D, ln_eps)  # columns past D load as zeros
        # (the whole normalized row stays in registers for every step)
        normed_row = layer_norm_apply(whole, mean, rstd, ln_w_ptr, ln_b_ptr, offs_d, d_full, HAS_LN_W, HAS_LN_B)

        # fc1 -> GELU -> fc2, CHUNK_G hidden units per step, each chunk folded straight into the
        # logits. The chain of dependent steps, not the FLOPs, sets this phase's time.
        offs_h = tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        logits = tl.zeros([1, BLOCK_H], dtype=tl.float32)
        # A loop of loads and FMA reductions that Triton pipelines only when asked (GATE_STAGES):
        # the fc1/fc2 tiles of the next steps load while this one reduces.
        for g0 in tl.range(0, G, CHUNK_G, num_stages=GATE_STAGES):
            gi = g0 + tl.arange(0, CHUNK_G)
            g_mask = gi < G
            # Whole fc1 rows against the normalized row, FMA reductions.
            w1 = tl.load(fc1_w_ptr + gi[:, None] * D + offs_d[None, :],
                         mask=g_mask[:, None] & d_full[None, :], other=0.0).to(tl.float32)
            hidden = tl.sum(normed_row[:, None, :] * w1[None, :, :], axis=2)
            if HAS_FC1_B:
                hidden += tl.load(fc1_b_ptr + gi, mask=g_mask, other=0.0).to(tl.float32)[None, :]
            hidden = 0.5 * hidden * (1.0 + tl.math.erf(hidden * 0.7071067811865476))
            hidden = tl.where(g_mask[None, :], hidden, 0.0)
            w2 = tl.load(fc2_w_ptr + offs_h[:, None] * G + gi[None, :],
                         mask=h_mask[:, None] & g_mask[None, :], other=0.0).to(tl.float32)
            logits += tl.sum(hidden[:, None, :] * w2[None, :, :], axis=2)
        if HAS_FC2_B:
            logits += tl.load(fc2_b_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]

        if USE_BUDGET:
            # Rank count over the H logits, identical to reference.topk_mask: head i is kept when
            # fewer than budget_k heads beat it (larger, or equal with a lower index; NaN ranks
            # above every number, as torch.sort puts it first).
            rank = tl.zeros([1, BLOCK_H], dtype=tl.int32)
            logit_nan = logits != logits
            for j in range(0, H):
                is_j = offs_h[None, :] == j
                logit_j = tl.sum(tl.where(is_j, logits, 0.0), axis=1)
                nan_j = tl.max(tl.where(is_j, logit_nan, False).to(tl.int32), axis=1) != 0
                ties = (logit_j[:, None] == logits) | (nan_j[:, None] & logit_nan)
                beats = (logit_j[:, None] > logits) | (nan_j[:, None] & ~logit_nan) | (ties & (j < offs_h[None, :]))
                rank += beats.to(tl.int32)
            keep = rank < budget_k
        else:
            keep = logits > 0.0
        out_offs = fin_rows[:, None] * H + offs_h[None, :]
        out_mask = fin_mask[:, None] & h_mask[None, :]
        tl.store(logits_ptr + out_offs, logits, mask=out_mask)
        tl.store(keep_ptr + out_offs, keep, mask=out_mask)


def _mma_16bit(*operands: torch.Tensor) -> bool:
    """Whether the SAE multiplies these operands as 16-bit MMAs (`SAE_16BIT_MMA`): one 16-bit
    dtype for all, compiled for CUDA or fp16 (the CPU interpreter's dots misread bf16)."""
    dtype = operands[0].dtype
    return (SAE_16BIT_MMA and dtype in (torch.float16, torch.bfloat16) and all(op.dtype == dtype for op in operands)
            and (targets_cuda(operands[0].device) or dtype == torch.float16))


def _flat_steering(steer: Optional[torch.Tensor], batch: int, width: int, name: str) -> Optional[torch.Tensor]:
    """Broadcast a steering tensor ([S], [1, S] or [B, S]) to a [B, S] view without copying."""
    if steer is None:
        return None
    if steer.shape[-1] != width or steer.dim() > 2:
        raise ValueError(f"{name} must be [B, {width}] (or broadcastable to it), got {tuple(steer.shape)}")
    return steer.expand(batch, width)


def _check_vectors(label: str, params: dict, **lengths: int) -> None:
    """Refuse a parameter vector that is not [length] (absent ones pass: they are optional)."""
    for name, length in lengths.items():
        vector = params.get(name)
        if vector is not None and vector.shape != (length,):
            raise ValueError(f"{label}{name} must be [{length}], got {tuple(vector.shape)}")


def gate_stages(tile_elements: int, element_bytes: int) -> int:
    """Pipeline depth of the gate's fc1/fc2 loop: GATE_STAGES, less where its S - 1 staged weight
    tiles (`tile_elements` per step) would pass _GATE_SHARED_BUDGET; 1 (plain loads) rather than
    2, whose single slot only adds a detour through shared memory (see GATE_STAGES)."""
    slots = min(GATE_STAGES - 1, _GATE_SHARED_BUDGET // (tile_elements * element_bytes))
    return slots + 1 if slots >= 2 else 1


def _pow2(n: int, floor: int = 16) -> int:
    """Smallest power of two >= n and >= floor (tl.dot needs every dimension >= 16)."""
    return max(floor, next_power_of_2(max(1, n)))


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
    tensors (contiguous, float32 and bool).

    Steering must be finite (`Engine` refuses anything else before any work). A TopK SAE reads
    `steer_scale` only at the k latents each row selects, so a NaN or inf at an unselected latent,
    where the reference computes 0 * NaN = NaN for the whole row, leaves this row's logits finite."""
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
    # (the kernel reads every vector as [length]: a shorter one would be read past its end)
    _check_vectors("gate ", gate_params, norm_weight=dim, norm_bias=dim, fc1_bias=hidden, fc2_bias=num_heads)
    budget_k = reference.heads_for_budget(budget, num_heads) if budget is not None else 0
    check_devices(e.device, dict(steer_scale=steer_scale, steer_shift=steer_shift),
                  dict(zip(("out[0]", "out[1]"), out or ())), ("gate ", gate_params), ("SAE ", sae_params or {}))

    if out is None:
        logits = torch.empty(batch, num_heads, device=e.device, dtype=torch.float32)
        keep = torch.empty(batch, num_heads, device=e.device, dtype=torch.bool)
    else:
        logits, keep = out
        if logits.shape != (batch, num_heads) or logits.dtype != torch.float32 or not logits.is_contiguous():
            raise ValueError(f"out logits must be a contiguous float32 [{batch}, {num_heads}] tensor")
        if keep.shape != (batch, num_heads) or keep.dtype != torch.bool or not keep.is_contiguous():
            raise ValueError(f"out keep must be a contiguous bool [{batch}, {num_heads}] tensor")

    dummy = logits  # stands in for absent optional pointers; never dereferenced (constexpr-guarded)
    sae = sae_params
    activation, width, sae_k, scale, shift = "relu", 1, 0, None, None
    partial = gather = shift_decode = reconstruct = encode_16bit = shift_16bit = False
    sae_args = (dummy,) * 5
    if sae is not None:
        activation = sae["activation"]
        if activation not in _ACTIVATION_CODES:
            raise ValueError(f"unknown SAE activation {activation!r}; expected one of {reference.SAE_ACTIVATIONS}")
        enc_w, dec_w = sae["enc_weight"].contiguous(), sae["dec_weight"].contiguous()
        width = enc_w.shape[0]
        if enc_w.shape != (width, dim) or dec_w.shape != (width, dim):
            raise ValueError(f"SAE weights must be [S, {dim}], got {tuple(enc_w.shape)} and {tuple(dec_w.shape)}")
        sae_k = sae.get("k")
        if activation == "topk" and (sae_k is None or not 0 <= sae_k <= width):
            raise ValueError(f"topk SAE needs 0 <= k <= {width}, got {sae_k}")
        sae_k = sae_k or 0
        threshold = sae.get("threshold")
        if activation == "jumprelu" and threshold is None:
            raise ValueError("jumprelu SAE needs a per-latent threshold")
        _check_vectors("SAE ", sae, enc_bias=width, dec_bias=dim, **(dict(threshold=width) if activation == "jumprelu" else {}))
        scale = _flat_steering(steer_scale, batch, width, "steer_scale")
        shift = _flat_steering(steer_shift, batch, width, "steer_shift")
        reconstruct = mode == "reconstruct"
        if reconstruct or scale is not None or shift is not None:
            # (Identity steering in preserve-error mode gives g = e exactly: no SAE work at all.)
            if activation == "topk":
                # z' - z = z (scale - 1) + shift: the shift part is decoded by D slices, the z part
                # (k latents per row) by the finisher, which needs the encoder's candidates.
                gather = sae_k > 0 and (reconstruct or scale is not None)
                shift_decode = shift is not None
            else:
                partial = True
        threshold = threshold.contiguous() if activation == "jumprelu" else dummy
        sae_args = (enc_w, sae["enc_bias"].contiguous(), dec_w, sae["dec_bias"].contiguous(), threshold)
        # The encoder forms e - b_dec in fp32 and splits it to W_enc's dtype: exactly for bf16;
        # fp16's narrow exponent loses the low terms of small values, so fp16 weights keep 3xTF32.
        encode_16bit = _mma_16bit(enc_w) and (enc_w.dtype == torch.bfloat16 or _ENCODER_SPLIT_FP16)
        shift_16bit = shift is not None and _mma_16bit(shift, dec_w)

    split = partial or gather or shift_decode
    if shift_decode and SHIFT_DECODE_CHAINS not in (1, 2, 4):
        raise ValueError(f"SHIFT_DECODE_CHAINS must be 1, 2 or 4, got {SHIFT_DECODE_CHAINS}")
    block_s = min(BLOCK_S, _pow2(width))
    num_s_tiles = cdiv(width, block_s) if split else 1
    cand_per_tile = min(sae_k, block_s) if gather else 1
    block_c = _pow2(num_s_tiles * cand_per_tile, floor=1)
    if gather and block_c > MAX_TOPK_CANDIDATES:
        raise NotImplementedError(
            f"fused gate ranks a row's TopK candidates ({num_s_tiles} latent tiles x {cand_per_tile}) in registers; "
            f"at most {MAX_TOPK_CANDIDATES} supported (S={width}, k={sae_k})"
        )
    if batch == 0:
        return logits, keep

    # Scratch, all written before it is read: partial decodes, TopK candidates, selected latents,
    # the gate input; one fp32 buffer (int32 parts are views of it) and zeroed counters: one per
    # batch tile, then the finishers' ticket dispenser.
    num_b_tiles = cdiv(batch, BLOCK_B)  # (passed but unused without SAE work)
    sizes = dict(
        partial=num_s_tiles * batch * dim if partial else 0,
        cand_val=batch * num_s_tiles * cand_per_tile if gather else 0,
        cand_idx=batch * num_s_tiles * cand_per_tile if gather else 0,
        sel_idx=batch * sae_k if gather else 0,
        sel_coef=batch * sae_k if gather else 0,
        g=batch * dim if split else 0,  # the gate input, assembled before the gate reads it
    )
    scratch, counter = {}, dummy
    if split:
        # Each part starts 16-byte aligned (a multiple of 4 floats), whatever B and k: Triton
        # specializes pointer arguments on 16-byte alignment, so unaligned parts would take
        # narrower loads and, at some batch sizes only, a compile of their own.
        padded = {name: cdiv(size, 4) * 4 for name, size in sizes.items()}
        workspace = torch.empty(sum(padded.values()), device=e.device, dtype=torch.float32)
        start = 0
        for name, size in sizes.items():
            part = workspace[start:start + size]
            scratch[name] = part.view(torch.int32) if name.endswith("_idx") else part
            start += padded[name]
        counter = torch.zeros(num_b_tiles + 1, device=e.device, dtype=torch.int32)
    scratch_args = [scratch.get(name) if sizes[name] else dummy for name in sizes]

    scale_args = (scale, scale.stride(0), scale.stride(1)) if scale is not None else (dummy, 0, 0)
    shift_args = (shift, shift.stride(0), shift.stride(1)) if shift is not None else (dummy, 0, 0)
    # (vectors the kernel reads as contiguous, whatever views the caller passes)
    ln_w, ln_b, fc1_b, fc2_b = (gate_params[name].contiguous() if gate_params.get(name) is not None else None
                                for name in ("norm_weight", "norm_bias", "fc1_bias", "fc2_bias"))
    block_d = _pow2(dim)
    chunk_d = min(64, block_d)
    k_step = min(16, _pow2(sae_k, floor=1))
    partial_tiles = 4  # partial decodes summed per load
    # Columns of g a finisher assembles per step: its gathered [1, k_step, columns] decoder tile
    # and its [partial_tiles, 1, columns] partials stay within _TILE_ELEMENTS * 2 (a whole ViT-S
    # row at once; ViT-B's TopK decode in two steps).
    per_column = max(k_step if gather else 1, partial_tiles if partial else 1)
    fin_chunk_d = min(block_d, max(chunk_d, 2 * _TILE_ELEMENTS // per_column))
    chunk_g = min(_pow2(hidden, floor=1), max(1, _GATE_TILE_ELEMENTS // block_d))  # whole rows of fc1 per step
    slice_d = _pow2(cdiv(dim, num_s_tiles))  # D columns whose shift decode one program owns
    # the fc1 and fc2 tiles one step of the gate loop stages
    block_h = _pow2(num_heads)
    stages = gate_stages(chunk_g * block_d + block_h * chunk_g, fc1_w.element_size())

    # latent-tile programs, then one finisher per sample; without SAE work, one program per sample
    finishers = 0 if _LATENT_TILES_ONLY else batch
    grid = (num_b_tiles * num_s_tiles + finishers,) if split else (batch,)
    with launch_device(e.device):  # (Triton launches on the current CUDA device)
        _sae_steer_gate_kernel[grid](
            e, e.stride(0),
            *sae_args,
            *scale_args,
            *shift_args,
            ln_w if ln_w is not None else dummy, ln_b if ln_b is not None else dummy, float(gate_params["norm_eps"]),
            fc1_w, fc1_b if fc1_b is not None else dummy, fc2_w, fc2_b if fc2_b is not None else dummy,
            logits, keep,
            counter, *scratch_args,
            batch, dim, width, hidden, num_heads, max(sae_k, 1), cand_per_tile, budget_k, num_b_tiles, num_s_tiles,
            ACTIVATION=_ACTIVATION_CODES[activation], HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            RECONSTRUCT=reconstruct, PARTIAL=partial, GATHER=gather,
            SHIFT_DECODE=shift_decode, SPLIT=split,
            HAS_LN_W=ln_w is not None, HAS_LN_B=ln_b is not None,
            HAS_FC1_B=fc1_b is not None, HAS_FC2_B=fc2_b is not None, USE_BUDGET=budget is not None,
            G_SOURCE=1 if split else 2 if reconstruct else 0,  # g: scratch, b_dec (TopK k=0, no shift), e
            PRECISION=fp32_dot_precision(e.device), ENCODE_16BIT=encode_16bit, SHIFT_CHAINS=SHIFT_DECODE_CHAINS,
            SHIFT_16BIT=shift_16bit,
            BLOCK_B=BLOCK_B, BLOCK_S=block_s, BLOCK_K=32, ENC_BLOCK_K=ENCODER_BLOCK_K if encode_16bit else 32,
            BLOCK_D=block_d, CHUNK_D=chunk_d, FIN_CHUNK_D=fin_chunk_d,
            SLICE_D=slice_d, SLICE_CHUNK=min(chunk_d, slice_d), PARTIAL_TILES=partial_tiles,
            BLOCK_C=block_c, K_STEP=k_step, CHUNK_G=chunk_g, GATE_STAGES=stages,
            BLOCK_H=block_h, TOPK_DIGIT_BITS=TOPK_DIGIT_BITS,
            num_warps=GATE_WARPS,
        )
    return logits, keep

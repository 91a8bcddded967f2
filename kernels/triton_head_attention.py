"""Head-sparse attention branch in Triton: only kept (sample, head) pairs do any work.

Three launches, all with grids sized from B, H and N alone (never from the mask), so
nothing waits on the host and the whole branch can be captured in a CUDA graph:

1. `_qkv_kernel` projects one head's q, k, v (and applies the q/k LayerNorm) for a tile of
   tokens: one program per (tile of the flattened B*N tokens, head), where rows of samples that
   pruned the head load as zeros and are not stored and a tile no sample keeps stops after its
   mask bits. A sample's N is not padded up to the tile (197 -> 256 with 64-token tiles).
2. `_attention_kernel`, grid (B*H, query tiles): flash attention with an online softmax; pruned
   (sample, head) pairs return after reading their bit.
3. `_proj_kernel`, grid (token tiles, output-column tiles): sums `o_h @ W_o[:, h]^T` over the
   heads kept by the tile's samples (the mask bits guard each head's loads and MMA), adds the bias
   and, when asked, a block's residual (times a LayerScale first) in the same epilogue.

Removed after timing (H100, `bench/RESULTS.md`; see git history): on 2026-11-26, QKV over
compacted per-head token lists walked by persistent programs (`qkv_compact`), and QKV with
attention in one launch (`fuse_qkv_attention`); both were slower than the flattened QKV launch at
ViT-S and ViT-B, at usage 1 and 0.33. On 2026-11-27 (graph replay, B=64, N=197, bf16), attention
and output projection in one launch (`fuse_attention_proj`: slower at usage 1, a tie at 0.33)
and the whole branch in one launch (`fuse_branch`: 1.4-1.6x slower at both sizes and usages)
against these three launches.

Scratch buffers (q/k/v and per-head outputs, `new_scratch`) are uninitialized: slots of pruned
heads are never written and never read. Math matches `reference.head_attention` with head_weight = keep; matmuls
accumulate in fp32; fp32 inputs multiply as 3xTF32 on CUDA (fp32-level accuracy, never plain
TF32) with the smaller TILES_FP32 tiles, exactly under the CPU interpreter.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import triton
import triton.language as tl
from torch import nn
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from headsteer.kernels.aot import check_devices, cuda_capability, fp32_dot_precision, launch_device, targets_cuda
from headsteer.kernels.launch_math import cdiv, next_power_of_2
from headsteer.kernels.triton_layer_norm import layer_norm_apply, layer_norm_stats


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and warps of the three kernels (BLOCK_* are rows of the tiles each program owns)."""

    qkv_block_n: int = 64  # tokens per QKV-projection program
    qkv_block_k: int = 64  # reduction step over D
    qkv_warps: int = 4
    qkv_stages: int = 3  # software-pipeline depth of the reduction loop (copies of its input tiles)
    # QKV: q and k as one MMA of twice the width (blocks without q/k norms), v as a second, so
    # x's tile is read from shared memory twice per step instead of three times. An sm_90 wgmma
    # with both operands in shared memory reads (64 + N) x 16 x 2 bytes per 64 x N x 16 MACs: at
    # N = 64 that is 4 KiB per 32 tensor-core cycles, all of the SM's 128 B/cycle (which the
    # pipeline's copies into shared memory share), so three 64-wide dots leave the tensor cores
    # waiting; q|k at N = 128 needs 6 KiB per 64 cycles. (Estimated.) Timed on an H100 on
    # 2026-11-26 it gained nothing in the since-removed compacted QKV: three 64-wide dots ran
    # ViT-S in 84.0 us against 84.7 and ViT-B in 283.7 against 287.5 (usage 1), so three dots
    # are the default; with this flattened QKV only q|k was timed (`--sweep` compares both).
    qkv_fuse_qk: bool = False
    # QKV tiles narrowed to where their head is kept (opt-in; 0: never): when every row of a
    # tile whose sample keeps the head lies within this many consecutive rows, the program
    # projects only those rows (a tile of the flattened B*N tokens straddles two samples when
    # N is not a multiple of it, and then does the MMA work of a whole tile for either one).
    # Meant for 128-token tiles, which read 20 bytes from L2 per output against 32 for 64-token
    # tiles (timed 7% faster at usage 1 on an H100 on 2026-11-27) but straddled in 64% of tiles
    # at ViT's N=197 (4.5% slower at usage 0.33): with 64-row narrow passes, a tile whose one
    # sample keeps the head over at most 64 of its rows does half the work. At usage 0.33
    # (kept heads independent per sample) that estimates the same MMA rows as 64-token tiles
    # (40% of the dense rows against 48% for plain 128-token tiles). Untimed; `--sweep` times it.
    # A power of two (tl.arange); below 16 rows (tl.dot) or as wide as the tile it is off.
    qkv_narrow_n: int = 0
    attn_block_m: int = 128  # queries per attention program
    attn_block_m_tail: int = 128  # narrowest pass over the ragged last query tile (`ragged_step`)
    attn_block_n: int = 64  # keys per online-softmax step
    attn_block_tail: int = 64  # narrowest step over the ragged last keys (`ragged_step`)
    attn_warps: int = 4
    attn_stages: int = 3  # software-pipeline depth of the key loop
    proj_block_t: int = 64  # tokens per output-projection program
    proj_block_o: int = 128  # output columns per output-projection program
    proj_warps: int = 4
    proj_stages: int = 3  # software-pipeline depth of the head loop (pipelined with the kept-head list)
    # Output projection for models of at most this many heads: walk a list of the heads the tile
    # keeps (a loop without branches, which Triton software-pipelines); above it, test every head
    # inside the loop (0: always). Each step of the list finds its head with reductions over
    # next_power_of_2(heads) lanes, a cost the one-MMA steps (64 x 128 x head_dim) do not hide at
    # 12 heads: on an H100 the list won at ViT-S (6 heads; usage 1 / 0.33: 84.1 / 41.1 us against
    # 88.3 / 42.0 for the whole branch) and lost at ViT-B (12 heads; 264.8 / 117.7 against 246.7 /
    # 108.0), the same both ways on 2026-11-26 and 2026-11-27. 8 (the same 8 lanes as 6 heads) is
    # where the measurements put the change; 7 and 8 heads are untimed.
    proj_kept_list_max_heads: int = 8
    # The kept-head list (opt-in; models of at most 64 heads): each row's kept heads as the bits of
    # one integer, built once per program, so a step finds which rows keep its head with a shift
    # instead of the [BLOCK_T, next_power_of_2(heads)] reduction above (at sm_90, ViT-B: 36 warp
    # shuffles per step of the list's loop, about 4 with the bits; PTX, `python -m
    # headsteer.kernels.aot --ptx`). Untimed; `--sweep` times it at both head counts.
    proj_list_row_bits: bool = False
    # Programmatic dependent launch (sm_90 and later; opt-in): each launch of the branch may be
    # scheduled while the one before it drains, and waits on the device for its results
    # (`_follow_previous_launch`) instead of the stream holding it back until the previous grid
    # has retired (stream capture records programmatic graph edges). What it can shave is the gap
    # between dependent launches, which the branch's three launches pay twice. On an H100 on
    # 2026-11-27 (usage 1 / 0.33) it ran ViT-S in 81.9 / 39.2 us against 84.1 / 41.1 and ViT-B in
    # 261.3 / 115.7 against 264.8 / 117.7. `--sweep` times it.
    programmatic_launch: bool = False


# Used by every 16-bit launch; tuned on an H100/H200 for ViT shapes (N=197, d=64, bf16) with
# `python -m headsteer.bench.kernels --sweep`, which swaps this module attribute. Attention:
# 128-query tiles and 64-key steps, without narrow passes over the ragged ends. The H200 sweep of
# 2026-11-26 put 64-query / 32-key tiles within noise of these; with 16-row and 16-key passes
# over the ragged ends (each (sample, head)'s padded score tile at N=197 cut from 256 x 256 to
# 208 x 208) the H100 sweep of the same day ran ViT-B's branch (bf16, B=64, graph replay) at 275 /
# 117 us at usage 1 / 0.33 (flattened QKV with q|k as one MMA, kept-head projection list) against
# 246 / 108 us with these tiles (three-dot QKV, per-head projection branch: worth about +1 and -5
# us at ViT-S, so the tiles make ViT-B's difference); ViT-S ran at 81 / 42 against 88 / 42 us,
# about even once the projection's 5 us are counted.
TILES = TileConfig()

# 64-query tiles and 32-key steps with 16-wide passes over the ragged query and key ends: the
# 16-bit default before the H100 sweep, an alternative the sweep times.
NARROW_TAIL_TILES = dict(attn_block_m=64, attn_block_m_tail=16, attn_block_n=32, attn_block_tail=16)


# fp32 launches: 3xTF32 dots keep fp32 operands (twice the bytes) and three accumulating MMAs
# per dot, so the 16-bit tiles spill registers and overflow shared memory on sm_90; these fit
# (`python -m headsteer.kernels.aot`). Not tuned for speed: fp32 runs for parity, 16-bit for speed.
# The ragged key end takes a whole 64-key step (`fit_tiles` explains why).
TILES_FP32 = TileConfig(qkv_block_n=64, qkv_block_k=32, qkv_warps=8, qkv_fuse_qk=False, attn_block_m=64,
                        attn_block_m_tail=16, attn_block_n=64, attn_block_tail=64, attn_warps=8, proj_block_t=64,
                        proj_block_o=64, proj_warps=8)


# Shared memory a kernel's staged tiles may take; an H100/H200 block gets 227 KiB.
_SHARED_BUDGET = 200 * 1024


@functools.lru_cache(maxsize=None)
def fit_tiles(tiles: TileConfig, block_d: int, element_bytes: int) -> TileConfig:
    """`tiles` shrunk, where needed, for head rows of `block_d` (padded head dim) elements of
    `element_bytes`: the defaults are tuned for d=64 16-bit rows, and d=128 or fp32 rows would
    overflow shared memory or spill registers on sm_90. The rules are estimates, checked against
    compiled kernels (`python -m headsteer.kernels.aot`, `tests/kernels/test_aot_compile.py`);
    the tuned defaults at d=64 16-bit pass through unchanged:
    - attention: its q tile and output accumulator hold 2 x BLOCK_M x BLOCK_D values over 32 x
      warps threads, at most 128 registers per thread (48 for fp32 inputs); its staged k and v
      tiles, (2 x stages + 2) x BLOCK_N x row bytes, stay under 200 KiB;
    - QKV: its three fp32 accumulators hold 3 x BLOCK_N x BLOCK_D values over 32 x warps threads,
      at most 96 registers per thread (48 for fp32 inputs, whose 3xTF32 dots keep split copies of
      every operand); its staged x and weight tiles, stages x (BLOCK_N + 3 BLOCK_D) x BLOCK_K
      elements, stay under 200 KiB;
    - output projection: stages x (BLOCK_T + BLOCK_O) x BLOCK_D elements under 200 KiB (its loop
      is pipelined with the kept-head list, `proj_kept_list_max_heads`)."""
    attn_block_m = tiles.attn_block_m
    query_regs = 48 if element_bytes >= 4 else 128
    while attn_block_m > 16 and 2 * attn_block_m * block_d > query_regs * 32 * tiles.attn_warps:
        attn_block_m //= 2
    attn_block_n = tiles.attn_block_n
    while attn_block_n > 16 and (2 * tiles.attn_stages + 2) * attn_block_n * block_d * element_bytes > _SHARED_BUDGET:
        attn_block_n //= 2
    # fp32 takes its ragged key end as one whole masked key step: a narrower 3xTF32 step (16 keys
    # after 64-key steps, 64-query tiles, 8 warps, d = 32 and 64) faulted with an illegal memory
    # access on an H100 (Triton 3.6, 2026-11-26), where whole-width tails and 4 warps ran exact.
    # fp32 is the parity path; the narrow tail only saves 16-bit MMA work.
    attn_block_tail = attn_block_n if element_bytes >= 4 else min(tiles.attn_block_tail, attn_block_n)
    qkv_block_n = tiles.qkv_block_n
    accumulator_regs = 48 if element_bytes >= 4 else 96
    while qkv_block_n > 16 and 3 * qkv_block_n * block_d > accumulator_regs * 32 * tiles.qkv_warps:
        qkv_block_n //= 2
    qkv_block_k = tiles.qkv_block_k
    while qkv_block_k > 16 and tiles.qkv_stages * (qkv_block_n + 3 * block_d) * qkv_block_k * element_bytes > _SHARED_BUDGET:
        qkv_block_k //= 2
    proj_block_o = tiles.proj_block_o
    while proj_block_o > 16 and tiles.proj_stages * (tiles.proj_block_t + proj_block_o) * block_d * element_bytes > _SHARED_BUDGET:
        proj_block_o //= 2
    # A narrow pass is a power of two of at least 16 rows (tl.dot), narrower than the tile.
    qkv_narrow_n = tiles.qkv_narrow_n
    if qkv_narrow_n and next_power_of_2(qkv_narrow_n) != qkv_narrow_n:
        raise ValueError(f"TileConfig.qkv_narrow_n must be 0 or a power of two, got {qkv_narrow_n}")
    qkv_narrow_n = qkv_narrow_n if 16 <= qkv_narrow_n < qkv_block_n else 0
    return dataclasses.replace(tiles, attn_block_m=attn_block_m,
                               attn_block_m_tail=min(tiles.attn_block_m_tail, attn_block_m), attn_block_n=attn_block_n,
                               attn_block_tail=attn_block_tail,
                               qkv_block_n=qkv_block_n, qkv_narrow_n=qkv_narrow_n, qkv_block_k=qkv_block_k,
                               proj_block_o=proj_block_o)


def ragged_step(length: int, block: int, narrowest: int) -> int:
    """Width of the one pass that covers the last `length % block` rows (or keys) of a sequence
    tiled by `block`: the next power of two, at least `narrowest`, at most `block` (for N=197 and
    64-row tiles, 16 rows for the 5 left over; a ragged end over half a tile gets a whole one)."""
    ragged = length % block
    return block if ragged == 0 else min(block, max(narrowest, next_power_of_2(ragged)))


def head_block(head_dim: int) -> int:
    """Columns of a head's tiles: the head dim padded to a power of two, at least 16 (tl.dot)."""
    return max(16, next_power_of_2(head_dim))


def tiles_for(head_dim: int, dtype: torch.dtype) -> TileConfig:
    """The tiles a launch for inputs of `dtype` with `head_dim`-wide heads uses: TILES (16-bit)
    or TILES_FP32 (fp32), fitted to the head's rows (`fit_tiles`)."""
    return fit_tiles(TILES_FP32 if dtype == torch.float32 else TILES, head_block(head_dim), dtype.itemsize)


@contextlib.contextmanager
def tile_config(tiles: TileConfig, fp32_tiles: Optional[TileConfig] = None) -> Iterator[None]:
    """Launch with `tiles` (and `fp32_tiles` for fp32 inputs, if given) inside the block, then
    restore the defaults; for tile sweeps and compile reports."""
    global TILES, TILES_FP32
    saved = TILES, TILES_FP32
    TILES, TILES_FP32 = tiles, fp32_tiles or TILES_FP32
    try:
        yield
    finally:
        TILES, TILES_FP32 = saved


@triton.jit
def _qkv_rows(
    x_ptr, stride_xb, stride_xn, stride_xd, w_ptr, stride_wr, stride_wd, bias_ptr,
    qn_w_ptr, qn_b_ptr, q_eps, kn_w_ptr, kn_b_ptr, k_eps, qkv_ptr, scratch_part,
    sample, token, row_kept, h, N, D, H, HEAD_DIM,
    HAS_BIAS: tl.constexpr,
    Q_NORM: tl.constexpr, QN_W: tl.constexpr, QN_B: tl.constexpr,
    K_NORM: tl.constexpr, KN_W: tl.constexpr, KN_B: tl.constexpr,
    PRECISION: tl.constexpr, FUSE_QK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Head h's q, k, v (q/k LayerNorm applied) for BLOCK_N token rows given as (sample, token):
    rows with row_kept False load as zeros and are not stored."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    # timm's qkv rows are ordered (q|k|v, head, dim): this head's q rows start at h*d, its k
    # rows at (H + h)*d, its v rows at (2H + h)*d. Weight tiles are loaded transposed [K, d].
    q_rows = h * HEAD_DIM + offs_d
    k_rows = q_rows + H * HEAD_DIM
    v_rows = k_rows + H * HEAD_DIM
    if FUSE_QK:
        # q and k side by side as one [BLOCK_N, 2 BLOCK_D] accumulator: one MMA twice as wide
        # per step instead of two (x's tile is read from shared memory once for both).
        offs_qk = tl.arange(0, 2 * BLOCK_D)
        qk_part = offs_qk // BLOCK_D  # 0: q, 1: k
        qk_col = offs_qk % BLOCK_D
        qk_rows = (qk_part * H + h) * HEAD_DIM + qk_col
        qk_mask = qk_col < HEAD_DIM
        acc_q = tl.zeros([BLOCK_N, 2 * BLOCK_D], dtype=tl.float32)
    else:
        acc_q = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        acc_k = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # 64-bit offsets: B*N*D (or the scratch's 3*B*N*D) may pass 2**31 elements at large batches.
    x_row = x_ptr + sample.to(tl.int64)[:, None] * stride_xb + token[:, None] * stride_xn
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < D
        x = tl.load(x_row + kk[None, :] * stride_xd, mask=row_kept[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & d_mask[None, :]
        w_cols = kk[:, None] * stride_wd
        if FUSE_QK:
            wqk = tl.load(w_ptr + qk_rows[None, :] * stride_wr + w_cols, mask=k_mask[:, None] & qk_mask[None, :],
                          other=0.0)
            acc_q = tl.dot(x, wqk, acc_q, input_precision=PRECISION)
        else:
            wq = tl.load(w_ptr + q_rows[None, :] * stride_wr + w_cols, mask=w_mask, other=0.0)
            wk = tl.load(w_ptr + k_rows[None, :] * stride_wr + w_cols, mask=w_mask, other=0.0)
            acc_q = tl.dot(x, wq, acc_q, input_precision=PRECISION)
            acc_k = tl.dot(x, wk, acc_k, input_precision=PRECISION)
        wv = tl.load(w_ptr + v_rows[None, :] * stride_wr + w_cols, mask=w_mask, other=0.0)
        acc_v = tl.dot(x, wv, acc_v, input_precision=PRECISION)
    if HAS_BIAS:
        if FUSE_QK:
            acc_q += tl.load(bias_ptr + qk_rows, mask=qk_mask, other=0.0).to(tl.float32)[None, :]
        else:
            acc_q += tl.load(bias_ptr + q_rows, mask=d_mask, other=0.0).to(tl.float32)[None, :]
            acc_k += tl.load(bias_ptr + k_rows, mask=d_mask, other=0.0).to(tl.float32)[None, :]
        acc_v += tl.load(bias_ptr + v_rows, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if Q_NORM:  # (never with FUSE_QK: the launcher fuses q and k only without q/k norms)
        q_mean, q_rstd = layer_norm_stats(acc_q, d_mask, HEAD_DIM, q_eps)
        acc_q = layer_norm_apply(acc_q, q_mean, q_rstd, qn_w_ptr, qn_b_ptr, offs_d, d_mask, QN_W, QN_B)
    if K_NORM:
        k_mean, k_rstd = layer_norm_stats(acc_k, d_mask, HEAD_DIM, k_eps)
        acc_k = layer_norm_apply(acc_k, k_mean, k_rstd, kn_w_ptr, kn_b_ptr, offs_d, d_mask, KN_W, KN_B)
    # Scratch layout [3, B, H, N, d]: each (sample, head) owns a contiguous [N, d] slab.
    out_dtype = qkv_ptr.dtype.element_ty
    # scratch_part = B*H*N*d elements per part, added to the pointer (never multiplied).
    row_base = ((sample * H + h) * N + token).to(tl.int64) * HEAD_DIM
    offs = row_base[:, None] + offs_d[None, :]
    mask = row_kept[:, None] & d_mask[None, :]
    if FUSE_QK:
        # Column c of the q|k accumulator goes to part c // BLOCK_D (0 or 1, so the product
        # with scratch_part stays within its range), column c % BLOCK_D.
        qk_offs = row_base[:, None] + qk_part[None, :] * scratch_part + qk_col[None, :]
        tl.store(qkv_ptr + qk_offs, acc_q.to(out_dtype), mask=row_kept[:, None] & qk_mask[None, :])
    else:
        tl.store(qkv_ptr + offs, acc_q.to(out_dtype), mask=mask)
        tl.store(qkv_ptr + scratch_part + offs, acc_k.to(out_dtype), mask=mask)
    tl.store(qkv_ptr + scratch_part + scratch_part + offs, acc_v.to(out_dtype), mask=mask)


@triton.jit
def _nth_flagged(flagged, rank, n, index):
    """index[j] of the flagged entry j whose rank among the flagged entries is n (rank: their
    0-based running count, cumsum - 1); 0 when there is none. Flagged entries hold distinct
    ranks, so one reduction finds it."""
    return tl.sum(tl.where(flagged & (rank == n), index, 0), axis=0)


@triton.jit
def _follow_previous_launch(PDL: tl.constexpr):
    """A kernel's first step. With programmatic dependent launch (PDL: the launcher sets it, and
    launch_pdl, on sm_90 and later), the kernel may start while the launch before it in the stream
    drains: wait here until that launch has finished and its writes are visible, before any
    memory access (its outputs are this kernel's inputs, and memory it still reads may be this
    kernel's scratch), then let the next launch start the same way. Without PDL, nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit(do_not_specialize=["B"])  # (one compile serves every batch size)
def _qkv_kernel(
    x_ptr, stride_xb, stride_xn, stride_xd,
    w_ptr, stride_wr, stride_wd, bias_ptr,
    keep_ptr, stride_keep_b, stride_keep_h,
    qn_w_ptr, qn_b_ptr, q_eps, kn_w_ptr, kn_b_ptr, k_eps,
    qkv_ptr, scratch_part,
    B, N, D, H, HEAD_DIM,
    HAS_BIAS: tl.constexpr,
    Q_NORM: tl.constexpr, QN_W: tl.constexpr, QN_B: tl.constexpr,
    K_NORM: tl.constexpr, KN_W: tl.constexpr, KN_B: tl.constexpr,
    PRECISION: tl.constexpr, FUSE_QK: tl.constexpr,
    BLOCK_N: tl.constexpr, NARROW_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    _follow_previous_launch(PDL)
    # One program per (tile of the flattened B*N tokens, head); the head varies fastest so the
    # H programs of a token tile share its x rows in L2. Rows whose sample pruned the head load as
    # zeros and are never stored; a tile where no sample keeps the head does nothing beyond
    # reading the mask bits.
    tile = tl.program_id(0) // H
    h = tl.program_id(0) % H
    offs_n = tl.arange(0, BLOCK_N)
    rows = tile * BLOCK_N + offs_n
    sample = rows // N
    row_kept = tl.load(keep_ptr + sample * stride_keep_b + h * stride_keep_h, mask=rows < B * N, other=0) != 0
    if NARROW_N == 0:
        whole_tile = tl.max(row_kept.to(tl.int32), axis=0) != 0
    else:
        # The tile's first and last rows whose sample keeps h (first > last: none). When they lie
        # within NARROW_N rows, project only the NARROW_N rows from the first: rows past the last
        # kept one (the next sample's, or the next tile's) are neither loaded nor stored, and rows
        # in between whose sample pruned h (several samples per tile when N < BLOCK_N) load their
        # own mask bits, as in the whole tile.
        first = tl.min(tl.where(row_kept, offs_n, BLOCK_N), axis=0)
        last = tl.max(tl.where(row_kept, offs_n, -1), axis=0)
        whole_tile = last - first >= NARROW_N
    if whole_tile:
        _qkv_rows(x_ptr, stride_xb, stride_xn, stride_xd, w_ptr, stride_wr, stride_wd, bias_ptr,
                  qn_w_ptr, qn_b_ptr, q_eps, kn_w_ptr, kn_b_ptr, k_eps, qkv_ptr, scratch_part,
                  sample, rows % N, row_kept, h, N, D, H, HEAD_DIM,
                  HAS_BIAS, Q_NORM, QN_W, QN_B, K_NORM, KN_W, KN_B, PRECISION, FUSE_QK,
                  BLOCK_N, BLOCK_K, BLOCK_D)
    elif NARROW_N > 0:
        if first <= last:
            offs_narrow = tl.arange(0, NARROW_N)
            narrow_rows = tile * BLOCK_N + first + offs_narrow
            narrow_sample = narrow_rows // N
            in_span = offs_narrow <= last - first
            narrow_kept = in_span & (tl.load(keep_ptr + narrow_sample * stride_keep_b + h * stride_keep_h,
                                             mask=in_span, other=0) != 0)
            _qkv_rows(x_ptr, stride_xb, stride_xn, stride_xd, w_ptr, stride_wr, stride_wd, bias_ptr,
                      qn_w_ptr, qn_b_ptr, q_eps, kn_w_ptr, kn_b_ptr, k_eps, qkv_ptr, scratch_part,
                      narrow_sample, narrow_rows % N, narrow_kept, h, N, D, H, HEAD_DIM,
                      HAS_BIAS, Q_NORM, QN_W, QN_B, K_NORM, KN_W, KN_B, PRECISION, FUSE_QK,
                      NARROW_N, BLOCK_K, BLOCK_D)


@triton.jit
def _attend_keys(q, k_base, v_base, start, N, HEAD_DIM, qk_scale, m_i, l_i, acc, d_mask,
                 MASK_KEYS: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N): returns the updated running
    max m_i, denominator l_i and unnormalized output acc. MASK_KEYS: the block may pass N."""
    cols = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_offs = cols[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = (cols < N)[:, None] & d_mask[None, :] if MASK_KEYS else d_mask[None, :]
    k = tl.load(k_base + kv_offs, mask=kv_mask, other=0.0)
    v = tl.load(v_base + kv_offs, mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASK_KEYS:
        scores = tl.where((cols < N)[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every block has a real column
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_queries(qkv_ptr, scratch_part, o_ptr, b, h, first_row, N, H, HEAD_DIM, qk_scale,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_TAIL: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Attention of queries [first_row, first_row + BLOCK_M) of one (sample, head) over all N keys."""
    offs_m = first_row + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    slab = ((b * H + h) * N).to(tl.int64) * HEAD_DIM  # 64-bit: the scratch may pass 2**31 elements
    q = tl.load(qkv_ptr + slab + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(offs_m < N)[:, None] & d_mask[None, :], other=0.0)
    k_base = qkv_ptr + scratch_part + slab
    v_base = qkv_ptr + scratch_part + scratch_part + slab
    # Online softmax in base 2: qk_scale = log2(e) / sqrt(d) folds the softmax scale and the
    # exp -> exp2 change of base into one multiply of the fp32 scores.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Whole key blocks run without column masks; the ragged end (N % BLOCK_N keys, e.g. 5 of
    # ViT's 197) runs in narrow BLOCK_TAIL blocks, so it costs a 16-key step, not a 64-key one.
    full_end = (N // BLOCK_N) * BLOCK_N
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = _attend_keys(q, k_base, v_base, start, N, HEAD_DIM, qk_scale, m_i, l_i, acc, d_mask,
                                     False, PRECISION, BLOCK_N, BLOCK_D)
    for start in range(full_end, N, BLOCK_TAIL):
        m_i, l_i, acc = _attend_keys(q, k_base, v_base, start, N, HEAD_DIM, qk_scale, m_i, l_i, acc, d_mask,
                                     True, PRECISION, BLOCK_TAIL, BLOCK_D)
    acc = acc / l_i[:, None]
    # Head outputs go to [B, N, H, d] (= timm's [B, N, H*d] before the projection).
    o_offs = ((b * N + offs_m[:, None]) * H + h).to(tl.int64) * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptr + o_offs, acc.to(o_ptr.dtype.element_ty), mask=(offs_m < N)[:, None] & d_mask[None, :])


@triton.jit
def _attention_kernel(
    qkv_ptr, scratch_part, keep_ptr, stride_keep_b, stride_keep_h, o_ptr,
    N, H, HEAD_DIM, qk_scale,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_M_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_TAIL: tl.constexpr,
    BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    _follow_previous_launch(PDL)
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    if tl.load(keep_ptr + b * stride_keep_b + h * stride_keep_h) != 0:
        first_row = tl.program_id(1) * BLOCK_M
        if BLOCK_M_TAIL == BLOCK_M or first_row + BLOCK_M <= N:
            _attend_queries(qkv_ptr, scratch_part, o_ptr, b, h, first_row, N, H, HEAD_DIM, qk_scale,
                            PRECISION, BLOCK_M, BLOCK_N, BLOCK_TAIL, BLOCK_D)
        else:
            # The last, ragged query tile (N % BLOCK_M rows, e.g. 5 of ViT's 197 with 64-row
            # tiles) in BLOCK_M_TAIL-row passes: a 16-row pass over the keys, not a 64-row one.
            # (The launcher picks BLOCK_M_TAIL >= N % BLOCK_M: one pass, never a serial chain.)
            for row in range(first_row, N, BLOCK_M_TAIL):
                _attend_queries(qkv_ptr, scratch_part, o_ptr, b, h, row, N, H, HEAD_DIM, qk_scale,
                                PRECISION, BLOCK_M_TAIL, BLOCK_N, BLOCK_TAIL, BLOCK_D)


@triton.jit
def _project_head(o_ptr, w_ptr, stride_wo, stride_wi, rows, row_kept, offs_o, o_mask, h, H, HEAD_DIM, acc,
                  PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr):
    """acc + o_h @ W_o[:, h]^T for a tile of rows (rows that pruned head h load as zeros), CHUNK_D
    of the head's BLOCK_D dims per dot."""
    for d0 in tl.static_range(0, BLOCK_D, CHUNK_D):
        offs_d = d0 + tl.arange(0, CHUNK_D)
        d_mask = offs_d < HEAD_DIM
        heads = tl.load(o_ptr + (rows[:, None] * H + h).to(tl.int64) * HEAD_DIM + offs_d[None, :],
                        mask=row_kept[:, None] & d_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_o[None, :] * stride_wo + (h * HEAD_DIM + offs_d)[:, None] * stride_wi,
                    mask=d_mask[:, None] & o_mask[None, :], other=0.0)
        acc = tl.dot(heads, w, acc, input_precision=PRECISION)
    return acc


@triton.jit(do_not_specialize=["B"])  # (B only bounds rows: one compile serves every batch size)
def _proj_kernel(
    o_ptr, keep_ptr, stride_keep_b, stride_keep_h,
    w_ptr, stride_wo, stride_wi, bias_ptr,
    out_ptr, stride_ob, stride_on, stride_od,
    res_ptr, stride_rb, stride_rn, stride_rd, gamma_ptr,
    B, N, H, HEAD_DIM, D_OUT,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_LAYER_SCALE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, KEPT_LIST: tl.constexpr, ROW_BITS: tl.constexpr, PDL: tl.constexpr,
):
    """Output rows of a token tile (flattened sample * N + token; those past B*N are neither read
    nor written) at a tile of columns: the sum over the heads each row's sample keeps of
    o_h @ W_o[:, h]^T, plus the bias and, when asked, a block's residual (times a LayerScale)."""
    _follow_previous_launch(PDL)
    # Token tiles run over the flattened B*N tokens, like the QKV projection. Each head's dot
    # runs CHUNK_D of its BLOCK_D dims at a time (fp32 3xTF32 operands of a 128-wide head spill).
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    row_valid = rows < B * N
    sample = rows // N
    o_mask = offs_o < D_OUT
    acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
    if KEPT_LIST:
        # The heads some row of the tile keeps, as a list: the i-th kept head is the head whose
        # running count of kept heads reaches i + 1. The loop below then has no branch.
        offs_h = tl.arange(0, BLOCK_H)
        tile_keeps = tl.load(keep_ptr + sample[:, None] * stride_keep_b + offs_h[None, :] * stride_keep_h,
                             mask=row_valid[:, None] & (offs_h < H)[None, :], other=0) != 0
        head_kept = tl.max(tile_keeps.to(tl.int32), axis=0)
        kept_rank = tl.cumsum(head_kept, axis=0) - 1
        if ROW_BITS:  # bit h of row_bits: the row's sample keeps head h (distinct bits: the sum is an OR)
            if BLOCK_H > 32:
                row_bits = tl.sum(tile_keeps.to(tl.int64) << offs_h.to(tl.int64)[None, :], axis=1)
            else:  # (32-bit words at up to 32 heads: fewer registers)
                row_bits = tl.sum(tile_keeps.to(tl.int32) << offs_h[None, :], axis=1)
        for i in range(0, tl.sum(head_kept, axis=0)):
            h = _nth_flagged(head_kept != 0, kept_rank, i, offs_h)
            if ROW_BITS:
                row_kept = ((row_bits >> h.to(row_bits.dtype)) & 1) != 0
            else:
                row_kept = tl.sum(tl.where(offs_h[None, :] == h, tile_keeps.to(tl.int32), 0), axis=1) != 0
            acc = _project_head(o_ptr, w_ptr, stride_wo, stride_wi, rows, row_kept, offs_o, o_mask, h, H, HEAD_DIM,
                                acc, PRECISION, BLOCK_D, CHUNK_D)
    else:
        for h in range(0, H):
            # Head h contributes only through rows whose sample kept it; the others load as zeros,
            # so the (never written) outputs of pruned heads are never read, and a head pruned by
            # every sample of the tile costs only its mask bits (no loads of o or W_o, no MMA).
            row_kept = tl.load(keep_ptr + sample * stride_keep_b + h * stride_keep_h, mask=row_valid, other=0) != 0
            if tl.max(row_kept.to(tl.int32), axis=0) != 0:
                acc = _project_head(o_ptr, w_ptr, stride_wo, stride_wi, rows, row_kept, offs_o, o_mask, h, H,
                                    HEAD_DIM, acc, PRECISION, BLOCK_D, CHUNK_D)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    # A pre-norm block's `residual + layer_scale * branch`, in fp32 and rounded once.
    if HAS_LAYER_SCALE:
        acc *= tl.load(gamma_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
    tokens = sample.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + tokens * stride_rb + (rows % N)[:, None] * stride_rn + offs_o[None, :] * stride_rd,
                       mask=row_valid[:, None] & o_mask[None, :], other=0.0).to(tl.float32)
    out_offs = tokens * stride_ob + (rows % N)[:, None] * stride_on + offs_o[None, :] * stride_od
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & o_mask[None, :])


def new_scratch(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """An uninitialized scratch buffer of `like`'s device and dtype (the tests swap this for one
    filled with NaN, so a read of a slot no kernel wrote shows in the output)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _norm_args(norm: Optional[nn.Module], head_dim: int, which: str, dummy: torch.Tensor) -> tuple:
    """Kernel arguments (weight, bias, eps, enabled, has_weight, has_bias) for a q/k norm module.

    Only LayerNorm over the head dim is fused; anything else (e.g. an RmsNorm) is refused so the
    caller can fall back to another backend rather than get silently different math."""
    if norm is None or isinstance(norm, nn.Identity):
        return dummy, dummy, 0.0, False, False, False
    if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (head_dim,):
        raise NotImplementedError(
            f"triton head attention fuses only nn.LayerNorm({head_dim}) as {which}; got {norm!r}"
        )
    weight, bias = (p.contiguous() if p is not None else None for p in (norm.weight, norm.bias))
    return (
        weight if weight is not None else dummy,
        bias if bias is not None else dummy,
        float(norm.eps),
        True,
        weight is not None,
        bias is not None,
    )


def head_attention_launches(
    x: torch.Tensor,
    keep: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    num_heads: int,
    q_norm: Optional[nn.Module] = None,
    k_norm: Optional[nn.Module] = None,
    *,
    residual: Optional[torch.Tensor] = None,
    layer_scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, list[tuple[str, Callable[[], None]]]]:
    """Check the arguments and allocate the output and scratch of `triton_head_attention`; return
    the output and its kernel launches in order as (name, launch) pairs, so a benchmark can
    time each kernel (`headsteer.bench.kernels --breakdown`): qkv, attention, proj. Arguments as
    `triton_head_attention`. The launches go to the current CUDA device: call them inside
    `launch_device(x.device)`, as `triton_head_attention` does."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D], got {tuple(x.shape)}")
    batch, tokens, dim = x.shape
    if qkv_weight.shape[0] % (3 * num_heads) or qkv_weight.shape[1] != dim:
        raise ValueError(f"qkv_weight {tuple(qkv_weight.shape)} does not fit D={dim} and {num_heads} heads")
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    d_out = proj_weight.shape[0]
    if proj_weight.shape[1] != num_heads * head_dim:
        raise ValueError(f"proj_weight {tuple(proj_weight.shape)} does not take {num_heads}x{head_dim} inputs")
    if keep.shape != (batch, num_heads):
        raise ValueError(f"keep must be [{batch}, {num_heads}], got {tuple(keep.shape)}")
    if qkv_weight.dtype != x.dtype or proj_weight.dtype != x.dtype:
        # (the MMAs multiply x by W_qkv and the head outputs, stored in x's dtype, by W_o)
        raise TypeError(f"qkv_weight ({qkv_weight.dtype}) and proj_weight ({proj_weight.dtype}) must have "
                        f"x's dtype ({x.dtype}); cast the module, e.g. model.to({x.dtype})")
    if residual is not None and residual.shape != (batch, tokens, d_out):
        raise ValueError(f"residual must be [{batch}, {tokens}, {d_out}], got {tuple(residual.shape)}")
    if layer_scale is not None and layer_scale.shape != (d_out,):
        raise ValueError(f"layer_scale must be [{d_out}], got {tuple(layer_scale.shape)}")
    if layer_scale is not None and residual is None:
        raise ValueError("layer_scale scales the branch added to a residual; pass residual too")
    if out is None:
        out = torch.empty(batch, tokens, d_out, device=x.device, dtype=x.dtype)
    elif out.shape != (batch, tokens, d_out):
        raise ValueError(f"out must be [{batch}, {tokens}, {d_out}], got {tuple(out.shape)}")
    if (residual is not None and out.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr()
            and (out.data_ptr(), out.stride()) != (residual.data_ptr(), residual.stride())):
        # (in place is safe: each element is read and then written by one program; any other
        # sharing could overwrite a residual element before another program reads it)
        raise ValueError("out shares memory with residual without being the same view; pass out=residual or "
                         "a separate tensor")
    check_devices(x.device, dict(keep=keep, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight,
                                 proj_bias=proj_bias, residual=residual, layer_scale=layer_scale, out=out),
                  *((label, {"weight": norm.weight, "bias": norm.bias})  # (other norms are refused below)
                    for label, norm in (("q_norm.", q_norm), ("k_norm.", k_norm)) if isinstance(norm, nn.LayerNorm)))
    # The kernels read biases, norm weights and the layer scale as contiguous vectors.
    qkv_bias, proj_bias, layer_scale = (vector.contiguous() if vector is not None else None
                                        for vector in (qkv_bias, proj_bias, layer_scale))
    if not targets_cuda(x.device) and torch.bfloat16 in (x.dtype, out.dtype):
        # Triton's CPU interpreter (3.8) returns garbage from tl.dot on bf16 tiles; refuse loudly.
        raise NotImplementedError("triton head attention under TRITON_INTERPRET supports fp32/fp16, not bf16")
    if batch == 0 or tokens == 0:
        return out, []

    dummy = out
    qn = _norm_args(q_norm, head_dim, "q_norm", dummy)
    kn = _norm_args(k_norm, head_dim, "k_norm", dummy)
    # fp32 inputs multiply at fp32-level accuracy (3xTF32 on CUDA), never as plain TF32
    precision = fp32_dot_precision(x.device) if x.dtype == torch.float32 else None
    block_d = head_block(head_dim)
    qkv = new_scratch((3, batch, num_heads, tokens, head_dim), x)
    heads = new_scratch((batch, tokens, num_heads, head_dim), x)
    keep_b, keep_h = keep.stride()
    scratch_part = qkv[0].numel()  # elements of each of q, k and v
    tiles = tiles_for(head_dim, x.dtype)
    fuse_qk = tiles.qkv_fuse_qk and not (qn[3] or kn[3])  # (q/k norms keep q and k apart)
    query_tail = ragged_step(tokens, tiles.attn_block_m, tiles.attn_block_m_tail)
    key_tail = ragged_step(tokens, tiles.attn_block_n, tiles.attn_block_tail)
    proj_chunk_d = min(block_d, 64) if precision is not None else block_d
    qk_scale = 1.4426950408889634 / head_dim**0.5  # log2(e) / sqrt(d): softmax in base 2 (`_attend_queries`)

    qkv_tiles = cdiv(batch * tokens, tiles.qkv_block_n)  # a head's tiles when every sample keeps it
    # Programmatic dependent launch needs sm_90's griddepcontrol (never under the interpreter).
    pdl = tiles.programmatic_launch and (cuda_capability(x.device) or 0) >= 90

    def qkv_projection():
        _qkv_kernel[(qkv_tiles * num_heads,)](
            x, *x.stride(),
            qkv_weight, *qkv_weight.stride(), qkv_bias if qkv_bias is not None else dummy,
            keep, keep_b, keep_h,
            qn[0], qn[1], qn[2], kn[0], kn[1], kn[2],
            qkv, scratch_part,
            batch, tokens, dim, num_heads, head_dim,
            HAS_BIAS=qkv_bias is not None,
            Q_NORM=qn[3], QN_W=qn[4], QN_B=qn[5], K_NORM=kn[3], KN_W=kn[4], KN_B=kn[5],
            PRECISION=precision, FUSE_QK=fuse_qk,
            BLOCK_N=tiles.qkv_block_n, NARROW_N=tiles.qkv_narrow_n, BLOCK_K=tiles.qkv_block_k, BLOCK_D=block_d,
            PDL=pdl, launch_pdl=pdl, num_warps=tiles.qkv_warps, num_stages=tiles.qkv_stages,
        )

    def attention():
        _attention_kernel[(batch * num_heads, cdiv(tokens, tiles.attn_block_m))](
            qkv, scratch_part, keep, keep_b, keep_h, heads,
            tokens, num_heads, head_dim, qk_scale,
            PRECISION=precision,
            BLOCK_M=tiles.attn_block_m, BLOCK_M_TAIL=query_tail, BLOCK_N=tiles.attn_block_n, BLOCK_TAIL=key_tail,
            BLOCK_D=block_d,
            PDL=pdl, launch_pdl=pdl, num_warps=tiles.attn_warps, num_stages=tiles.attn_stages,
        )

    def output_projection():
        _proj_kernel[(cdiv(batch * tokens, tiles.proj_block_t), cdiv(d_out, tiles.proj_block_o))](
            heads, keep, keep_b, keep_h,
            proj_weight, *proj_weight.stride(), proj_bias if proj_bias is not None else dummy,
            out, *out.stride(),
            *((residual, *residual.stride()) if residual is not None else (dummy, 0, 0, 0)),
            layer_scale if layer_scale is not None else dummy,
            batch, tokens, num_heads, head_dim, d_out,
            HAS_BIAS=proj_bias is not None, HAS_RESIDUAL=residual is not None,
            HAS_LAYER_SCALE=layer_scale is not None, PRECISION=precision,
            BLOCK_T=tiles.proj_block_t, BLOCK_O=tiles.proj_block_o, BLOCK_D=block_d,
            CHUNK_D=proj_chunk_d,
            BLOCK_H=next_power_of_2(num_heads), KEPT_LIST=num_heads <= tiles.proj_kept_list_max_heads,
            ROW_BITS=tiles.proj_list_row_bits and num_heads <= 64,
            PDL=pdl, launch_pdl=pdl, num_warps=tiles.proj_warps, num_stages=tiles.proj_stages,
        )

    return out, [("qkv", qkv_projection), ("attention", attention), ("proj", output_projection)]


def triton_head_attention(
    x: torch.Tensor,
    keep: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    num_heads: int,
    q_norm: Optional[nn.Module] = None,
    k_norm: Optional[nn.Module] = None,
    *,
    residual: Optional[torch.Tensor] = None,
    layer_scale: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Triton twin of `reference.head_attention` with head_weight = keep: [B, N, D] -> [B, N, D_out].

    keep is [B, H] (bool; nonzero = kept), read on the device only. x and the two weight matrices
    share one dtype, fp32/fp16/bf16 (biases and norms may be any float dtype), any strides; the
    output has x's dtype (or `out`'s, when given: a preallocated [B, N, D_out] tensor, any
    strides). q_norm/k_norm: None, nn.Identity or nn.LayerNorm over the head dim.

    With `residual` ([B, N, D_out], any strides) and optionally `layer_scale` ([D_out], a timm
    LayerScale's gamma) it returns a pre-norm block's `residual + layer_scale * branch` instead,
    added in the output projection's epilogue (one rounding instead of three, no extra launch);
    `out` must then not overlap `residual` unless it is the very same tensor."""
    out, launches = head_attention_launches(x, keep, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads,
                                            q_norm, k_norm, residual=residual, layer_scale=layer_scale, out=out)
    with launch_device(x.device):
        for _, launch in launches:
            launch()
    return out

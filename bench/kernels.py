"""GPU benchmark of the Triton kernels: head-sparse attention vs the dense branch, fused gate share.

    python -m headsteer.bench.kernels [--json FILE] [--md FILE]             # the table
    python -m headsteer.bench.kernels --breakdown [--json FILE] | --sweep | --gate-sweep | --profile
    python -m headsteer.bench.kernels --warm-up [--jobs N] [--seconds S] | --host [--repeats N] [--json FILE]

At B=64, N=197, bf16, for ViT-S (H=6, D=384) and ViT-B (H=12, D=768):
- the attention branch, dense (F.linear qkv -> flash scaled_dot_product_attention -> F.linear proj)
  against `triton_head_attention` at head usage 1.0/0.67/0.5/0.33/0.17 (random masks with exactly
  round(u*H) heads per sample), timed eagerly and as a CUDA-graph replay;
- the fused SAE -> steer -> gate kernel (without an SAE, and with the runtime's default SAE:
  S=4D, TopK k=16, per-sample steering scale without and with a shift) as a share of a dense block (norm1 + attn + norm2 + MLP).
Times are medians of `triton.testing.do_bench` (which flushes L2 between runs) in microseconds.
`--sweep` times alternative tile configurations of the attention kernels instead; `--breakdown`
times each kernel of both branches on its own (CUDA-graph replay) at every usage, to show where
the time goes; `--gate-sweep` times the fused gate's tuning constants. `--warm-up [--jobs N]
[--seconds S]` times nothing: it compiles the kernels of all four modes in N processes at once
into Triton's on-disk cache, so a following timing run spends its time timing. `--profile`
launches each kernel worth a hardware-counter look once, between cudaProfilerStart and Stop, for
`ncu --profile-from-start off` (`bench/gpu_checks.sh`): where the gate's and the branch's time goes
inside one launch, which timings alone cannot show. `--host` times what each of those launches
costs the host (the eager columns' launch overhead, which CUDA graphs remove); it also runs without
CUDA, with the kernels compiled for sm_90 and not launched.
Without CUDA every other mode says so and exits 0 without writing anything.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from headsteer.runtime.files import write_text_atomic

BATCH, TOKENS = 64, 197
DEVICE = "cuda"  # tests swap in "cpu" (under TRITON_INTERPRET) with tiny shapes and a fake timer
MODELS = {"ViT-S": (6, 384), "ViT-B": (12, 768)}
USAGES = (1.0, 0.67, 0.5, 0.33, 0.17)
DTYPE = torch.bfloat16
TARGETS = "usage 0.33: sparse >= 2.5x faster than dense; usage 1.0: at most 5% slower; fused gate < 5% of a block"


def random_keep(batch: int, heads: int, usage: float, generator: torch.Generator) -> torch.Tensor:
    """Bool [B, H] with exactly round(usage*H) randomly chosen heads kept per sample."""
    from headsteer.kernels.reference import heads_for_budget

    ranks = torch.rand(batch, heads, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks < heads_for_budget(usage, heads)).to(DEVICE)


def make_block(heads: int, dim: int, generator: torch.Generator) -> dict:
    """Random bf16 weights of one pre-norm ViT block, scaled like trained ones."""

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, DTYPE)

    return dict(
        norm1_w=rand(dim) + 1, norm1_b=rand(dim, scale=0.1), norm2_w=rand(dim) + 1, norm2_b=rand(dim, scale=0.1),
        qkv_w=rand(3 * dim, dim, scale=dim**-0.5), qkv_b=rand(3 * dim, scale=0.1),
        proj_w=rand(dim, dim, scale=dim**-0.5), proj_b=rand(dim, scale=0.1),
        fc1_w=rand(4 * dim, dim, scale=dim**-0.5), fc1_b=rand(4 * dim, scale=0.1),
        fc2_w=rand(dim, 4 * dim, scale=(4 * dim) ** -0.5), fc2_b=rand(dim, scale=0.1),
    )


def dense_attention(x: torch.Tensor, w: dict, heads: int) -> torch.Tensor:
    """The dense branch as timm computes it, with SDPA pinned to FlashAttention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, tokens, dim = x.shape
    q, k, v = F.linear(x, w["qkv_w"], w["qkv_b"]).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q, k, v)
    return F.linear(o.transpose(1, 2).reshape(batch, tokens, dim), w["proj_w"], w["proj_b"])


def dense_block(x: torch.Tensor, w: dict, heads: int) -> torch.Tensor:
    dim = x.shape[-1]
    x = x + dense_attention(F.layer_norm(x, (dim,), w["norm1_w"], w["norm1_b"]), w, heads)
    hidden = F.gelu(F.linear(F.layer_norm(x, (dim,), w["norm2_w"], w["norm2_b"]), w["fc1_w"], w["fc1_b"]))
    return x + F.linear(hidden, w["fc2_w"], w["fc2_b"])


def sparse_attention(x: torch.Tensor, keep: torch.Tensor, w: dict, heads: int) -> torch.Tensor:
    from headsteer.kernels.triton_head_attention import triton_head_attention

    return triton_head_attention(x, keep, w["qkv_w"], w["qkv_b"], w["proj_w"], w["proj_b"], heads)


# Milliseconds of calls each CUDA-graph timing captures: `do_bench_cudagraph` captures about rep
# ms worth of calls (counted from an eager estimate, which launch costs inflate) one Python call
# at a time, then replays that graph 10 times and takes the median. The table uses the long one;
# the sweeps and the breakdown, hundreds of timings in a lease's few minutes, the short one
# (a replay of ~10 ms of calls still averages hundreds of them).
GRAPH_REP_MS = 200
SWEEP_REP_MS = 50


def graph_timed(fn, rep_ms: int = GRAPH_REP_MS) -> float:
    """Median microseconds of fn replayed from a CUDA graph (GPU time, no host launch cost)."""
    import triton.testing

    with torch.cuda.stream(torch.cuda.Stream()):
        return 1000 * triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")


# Bytes written between the calls of a cold timing: as `triton.testing.do_bench` flushes between
# eager runs, more than an H100/H200's 50-60 MB of L2.
L2_FLUSH_BYTES = 256 * 1024 * 1024


def graph_timed_cold(fn, rep_ms: int = GRAPH_REP_MS) -> float:
    """Median microseconds of fn replayed from a CUDA graph with L2 flushed before each call: the
    graph of (a write of L2_FLUSH_BYTES, fn) less the graph of the write alone. What a gate costs
    inside a forward, where a whole block's weights pass through L2 between two gates; back-to-back
    replays (`graph_timed`) keep its SAE's weights warm."""
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=DEVICE)
    both = graph_timed(lambda: (flush.zero_(), fn()), rep_ms)
    return both - graph_timed(flush.zero_, rep_ms)


def timed(fn) -> tuple[float, float]:
    """(eager, CUDA-graph replay) median microseconds of fn."""
    import triton.testing

    eager = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return 1000 * eager, graph_timed(fn)


def gate_params(dim: int, heads: int, generator: torch.Generator, with_sae: bool) -> tuple[dict, dict | None, tuple]:
    """The runtime's default gate (G = D/4) and, optionally, SAE (S = 4D, TopK k=16) with steering."""

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator)).to(DEVICE, DTYPE)

    gate = dict(norm_weight=rand(dim) + 1, norm_bias=rand(dim, scale=0.1), norm_eps=1e-6,
                fc1_weight=rand(dim // 4, dim, scale=dim**-0.5), fc1_bias=rand(dim // 4, scale=0.1),
                fc2_weight=rand(heads, dim // 4, scale=(dim // 4) ** -0.5), fc2_bias=rand(heads, scale=0.1))
    if not with_sae:
        return gate, None, (None, None)
    width = 4 * dim
    sae = dict(enc_weight=rand(width, dim, scale=dim**-0.5), enc_bias=rand(width, scale=0.1),
               dec_weight=F.normalize(rand(width, dim).float(), dim=1).to(DTYPE), dec_bias=rand(dim, scale=0.1),
               threshold=None, activation="topk", k=16)
    return gate, sae, (rand(BATCH, width) + 1, rand(BATCH, width, scale=0.1))


def run_benchmark() -> dict:
    from headsteer.kernels.triton_sae_gate import triton_sae_steer_gate

    generator = torch.Generator().manual_seed(0)
    results = {"attention": [], "gate": []}
    for name, (heads, dim) in MODELS.items():
        w = make_block(heads, dim, generator)
        x = torch.randn(BATCH, TOKENS, dim, generator=generator).to(DEVICE, DTYPE)
        dense = timed(lambda: dense_attention(x, w, heads))
        for usage in USAGES:
            keep = random_keep(BATCH, heads, usage, generator)
            sparse = timed(lambda: sparse_attention(x, keep, w, heads))
            results["attention"].append(dict(
                model=name, heads=heads, dim=dim, usage=usage, heads_kept=int(keep[0].sum()),
                dense_us=dense[0], sparse_us=sparse[0], speedup=dense[0] / sparse[0],
                dense_graph_us=dense[1], sparse_graph_us=sparse[1], speedup_graph=dense[1] / sparse[1],
            ))
        block = timed(lambda: dense_block(x, w, heads))
        block_cold = graph_timed_cold(lambda: dense_block(x, w, heads))
        e = x[:, 0]
        for with_sae, shifted in ((False, False), (True, False), (True, True)):
            gate, sae, (scale, shift) = gate_params(dim, heads, generator, with_sae)
            shift = shift if shifted else None

            def gate_call(gate=gate, sae=sae, scale=scale, shift=shift):
                return triton_sae_steer_gate(e, gate, sae, scale, shift, budget=None)

            gate_time, gate_cold = timed(gate_call), graph_timed_cold(gate_call)
            results["gate"].append(dict(
                model=name, sae=("S=4D topk k=16, scale" + (" + shift" if shifted else "")) if with_sae else "none",
                gate_us=gate_time[0],
                block_us=block[0], share=gate_time[0] / block[0],
                gate_graph_us=gate_time[1], block_graph_us=block[1], share_graph=gate_time[1] / block[1],
                gate_cold_graph_us=gate_cold, block_cold_graph_us=block_cold,
                # (a difference of two timings: the warm-up's placeholder timings make it 0)
                share_cold_graph=gate_cold / block_cold if block_cold > 0 else float("nan"),
            ))
    return results


def dense_stages(x: torch.Tensor, w: dict, heads: int) -> list[tuple[str, callable]]:
    """The dense branch's three steps as separate calls on preallocated intermediates."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, tokens, dim = x.shape
    qkv = F.linear(x, w["qkv_w"], w["qkv_b"])
    q, k, v = qkv.reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q, k, v)
    merged = o.transpose(1, 2).reshape(batch, tokens, dim)

    def attention():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(q, k, v)

    return [("qkv", lambda: F.linear(x, w["qkv_w"], w["qkv_b"])), ("attention", attention),
            ("proj", lambda: F.linear(merged, w["proj_w"], w["proj_b"]))]


def breakdown() -> dict:
    """Graph-replay microseconds of each kernel of the dense and the sparse branch; prints each
    row as soon as it is measured (a lease's time limit may cut the rest)."""
    from headsteer.kernels import triton_head_attention as module

    def sparse_stages(x, keep, w, heads) -> dict:
        _, launches = module.head_attention_launches(x, keep, w["qkv_w"], w["qkv_b"], w["proj_w"], w["proj_b"], heads)
        for _, launch in launches:  # fill the scratch in order once, so each stage reads real data
            launch()
        return {stage: graph_timed(launch, SWEEP_REP_MS) for stage, launch in launches}

    def add(row: dict) -> None:
        rows.append(dict(row, total=sum(row[stage] for stage in BREAKDOWN_STAGES)))
        print(breakdown_row(rows[-1]), flush=True)

    generator = torch.Generator().manual_seed(0)
    rows = []
    print(BREAKDOWN_HEADER, flush=True)
    for name, (heads, dim) in MODELS.items():
        w = make_block(heads, dim, generator)
        x = torch.randn(BATCH, TOKENS, dim, generator=generator).to(DEVICE, DTYPE)
        add(dict(model=name, usage=None, branch="dense",
                 **{stage: graph_timed(fn, SWEEP_REP_MS) for stage, fn in dense_stages(x, w, heads)}))
        for usage in USAGES + (0.0,):  # (usage 0: what each kernel costs with nothing to compute)
            add(dict(model=name, usage=usage, branch="sparse",
                     **sparse_stages(x, random_keep(BATCH, heads, usage, generator), w, heads)))
    return {"breakdown": rows}


# (dense shares these names)
BREAKDOWN_STAGES = ("qkv", "attention", "proj")
BREAKDOWN_HEADER = "| model | branch | usage | qkv us | attention us | proj us | sum us |\n| --- | --- | --- | --- | --- | --- | --- |"


def breakdown_row(r: dict) -> str:
    usage = "" if r["usage"] is None else f"{r['usage']:.2f}"
    return (f"| {r['model']} | {r['branch']} | {usage} | {r['qkv']:.1f} | {r['attention']:.1f} | {r['proj']:.1f} "
            f"| {r['total']:.1f} |")


def failure(error: Exception) -> str:
    """One line saying why a sweep variant could not be timed; the sweep goes on to the next one."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def sweep_variants() -> list:
    """The attention tile configurations `sweep` times: the defaults, then one kernel's tiles
    changed at a time, most informative first (a time limit cuts the tail)."""
    from headsteer.kernels import triton_head_attention as module

    base = module.TILES  # vary one kernel's tiles at a time around the current defaults
    variants = [base]
    # Untimed candidates first. The kept-head list finding each step's rows by a bit shift
    # (`proj_list_row_bits`) at both head counts, in the defaults' 64 x 128 tiles and in 128 x 256
    # tiles of 8 warps (cuBLAS-sized; at ViT-S, 384 columns, they compute 512).
    row_bits = dict(proj_kept_list_max_heads=16, proj_list_row_bits=True)
    variants.append(dataclasses.replace(base, **row_bits))
    variants.append(dataclasses.replace(base, **row_bits, proj_block_t=128, proj_block_o=256, proj_warps=8))
    # 128-token QKV tiles (8 warps) narrowed to 64 rows where one sample of a straddling tile
    # keeps the head (`qkv_narrow_n`): plain 128-token tiles were 7% faster at usage 1 and 4.5%
    # slower at 0.33 on an H100 on 2026-11-27.
    variants.append(dataclasses.replace(base, qkv_block_n=128, qkv_warps=8, qkv_narrow_n=64))
    # Programmatic dependent launches (opt-in; 1-5% faster on an H100 on 2026-11-27).
    variants.append(dataclasses.replace(base, programmatic_launch=True))
    # The output projection's per-head branch at every head count, then its kept-head list at
    # every head count (the defaults take the list up to 8 heads: ViT-S's, not ViT-B's).
    variants.append(dataclasses.replace(base, proj_kept_list_max_heads=0))
    variants.append(dataclasses.replace(base, proj_kept_list_max_heads=16))
    # Attention: the narrow-tail tiling the H100 timed slower at ViT-B, then (query tile, queries
    # per pass over the ragged end, key step, keys per step over the ragged end, warps).
    variants.append(dataclasses.replace(base, **module.NARROW_TAIL_TILES))
    for attn in ((128, 16, 64, 16, 4), (128, 128, 64, 16, 4), (64, 64, 64, 64, 4),
                 (64, 16, 64, 16, 4), (64, 16, 32, 32, 4), (128, 128, 64, 64, 8)):
        variants.append(dataclasses.replace(base, attn_block_m=attn[0], attn_block_m_tail=attn[1], attn_block_n=attn[2],
                                            attn_block_tail=attn[3], attn_warps=attn[4]))
    # QKV: wider token tiles (each program re-reads its head's 192 weight rows from L2 per tile),
    # q and k as one MMA.
    for qkv in ((128, 64, 8), (128, 32, 4), (64, 32, 4)):
        variants.append(dataclasses.replace(base, qkv_block_n=qkv[0], qkv_block_k=qkv[1], qkv_warps=qkv[2]))
    variants.append(dataclasses.replace(base, qkv_fuse_qk=True))
    variants.append(dataclasses.replace(base, qkv_fuse_qk=True, qkv_block_n=128, qkv_warps=8))
    # The output projection's tiles and pipeline depths.
    for proj in ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 2), (64, 128, 4, 4)):
        variants.append(dataclasses.replace(base, proj_block_t=proj[0], proj_block_o=proj[1], proj_warps=proj[2],
                                            proj_stages=proj[3]))
    for stages in (2, 4):
        variants.append(dataclasses.replace(base, qkv_stages=stages))
        variants.append(dataclasses.replace(base, attn_stages=stages))
    variants.append(dataclasses.replace(base, qkv_block_k=128, qkv_stages=2))
    return variants


def sweep(variants: list | None = None) -> None:
    """Time the sparse branch under alternative tile configurations (default `sweep_variants()`),
    one kernel's tiles at a time, each with its speedups over the dense branch timed first in the
    same run (usage 0.33 and 1.0 are the issue's targets: a variant's line says how far it is)."""
    from headsteer.kernels import triton_head_attention as module

    variants = sweep_variants() if variants is None else variants
    generator = torch.Generator().manual_seed(0)
    setups = {}
    for name, (heads, dim) in MODELS.items():
        w = make_block(heads, dim, generator)
        x = torch.randn(BATCH, TOKENS, dim, generator=generator).to(DEVICE, DTYPE)
        setups[name] = heads, dim, w, x, {u: random_keep(BATCH, heads, u, generator) for u in (1.0, 0.33)}
    dense = {}
    for name, (heads, dim, w, x, keeps) in setups.items():
        dense[name] = graph_timed(lambda: dense_attention(x, w, heads), SWEEP_REP_MS)
        print(f"{name} dense graph {dense[name]:6.1f}us (the speedups below are over this)", flush=True)
    # Variant by variant (both models each), most informative first: a time limit cuts the tail.
    timed_tiles = set()
    for requested in variants:
        for name, (heads, dim, w, x, keeps) in setups.items():
            # Launches shrink tiles that would not fit (module.fit_tiles): time and print what runs.
            with module.tile_config(requested, requested):
                tiles = module.tiles_for(dim // heads, DTYPE)
            if (name, tiles) in timed_tiles:
                continue
            timed_tiles.add((name, tiles))
            try:
                with module.tile_config(tiles):
                    times = {u: graph_timed(lambda: sparse_attention(x, keep, w, heads), SWEEP_REP_MS)
                             for u, keep in keeps.items()}
            except Exception as error:  # (e.g. OutOfResources on this GPU): report it, time the rest
                print(f"{name} FAILED {failure(error)}  {tiles}", flush=True)
                continue
            speedups = {u: dense[name] / time for u, time in times.items()}
            print(f"{name} graph u=1.0 {times[1.0]:6.1f}us {speedups[1.0]:4.2f}x u=0.33 {times[0.33]:6.1f}us "
                  f"{speedups[0.33]:4.2f}x  {tiles}", flush=True)


def gate_sweep_variants() -> list[dict]:
    """The fused gate's constant overrides `gate_sweep` times, most informative first: the
    defaults, the SAE's first phase alone (`_LATENT_TILES_ONLY`: its latent-tile programs; the
    gate without an SAE runs whole), the encoder's narrower steps (the default before an H100
    timed 128 on 2026-11-27, and 64), other latent tiles, warps and fc1 tiles (4 warps were
    faster on 2026-11-27 at 32-wide encoder steps but spill in the ReLU gate with a shift, and
    badly with 128-wide steps), then the alternatives an H100 timed as ties or losses on
    2026-11-26 (a time limit cuts these first)."""
    variants = [dict(), dict(_LATENT_TILES_ONLY=True)]
    variants += [dict(ENCODER_BLOCK_K=32), dict(ENCODER_BLOCK_K=64)]
    variants += [dict(BLOCK_S=s) for s in (64, 256)]
    variants += [dict(GATE_WARPS=4)] + [dict(_GATE_TILE_ELEMENTS=n) for n in (8192, 32768)]
    variants += [dict(GATE_WARPS=4, _GATE_TILE_ELEMENTS=8192)]
    variants += [dict(TOPK_DIGIT_BITS=1), dict(SAE_16BIT_MMA=False), dict(_LATENT_TILES_ONLY=True, SAE_16BIT_MMA=False),
                 dict(SHIFT_DECODE_CHAINS=1), dict(GATE_STAGES=1), dict(GATE_STAGES=3)]
    return variants


def gate_sweep(variants: list[dict] | None = None) -> None:
    """Time the fused gate (SAE TopK with a steering scale, with a scale and a shift, and without
    SAE) under `variants` (default `gate_sweep_variants()`); prints one line per configuration
    (graph replay)."""
    from headsteer.kernels import triton_sae_gate as module

    generator = torch.Generator().manual_seed(0)
    setups = {}
    for name, (heads, dim) in MODELS.items():
        e = torch.randn(BATCH, dim, generator=generator).to(DEVICE, DTYPE)
        gate, sae, (scale, shift) = gate_params(dim, heads, generator, True)
        setups[name] = e, {"SAE topk, scale": (gate, sae, scale, None), "+ shift": (gate, sae, scale, shift),
                           "none": (*gate_params(dim, heads, generator, False)[:2], None, None)}
    for variant in gate_sweep_variants() if variants is None else variants:
        # variant by variant (both models each): a time limit cuts the tail
        for name, (e, cases) in setups.items():
            times = []
            with module.gate_constants(**variant):
                for label, (gate, sae, scale, shift) in cases.items():
                    try:
                        gate_time = graph_timed(lambda: module.triton_sae_steer_gate(e, gate, sae, scale, shift),
                                                SWEEP_REP_MS)
                        times.append(f"{label} {gate_time:6.1f}us")
                    except Exception as error:  # report it, time the rest
                        times.append(f"{label} FAILED {failure(error)}")
            print(f"{name} gate graph: {'  '.join(times)}  {variant or 'defaults'}", flush=True)


def launch_cases() -> list[tuple[str, callable]]:
    """(label, call) for each launch worth a look, per model: the fused gate (with the default
    SAE and a steering scale; without an SAE), the sparse branch at usage 1 and 0.33 and the
    dense branch; `--profile` and `--host` go through them in this order."""
    from headsteer.kernels.triton_sae_gate import triton_sae_steer_gate

    generator = torch.Generator().manual_seed(0)
    cases = []
    for name, (heads, dim) in MODELS.items():
        w = make_block(heads, dim, generator)
        x = torch.randn(BATCH, TOKENS, dim, generator=generator).to(DEVICE, DTYPE)
        e = x[:, 0]
        gate, sae, (scale, _) = gate_params(dim, heads, generator, True)
        plain_gate = gate_params(dim, heads, generator, False)[0]
        keeps = {u: random_keep(BATCH, heads, u, generator) for u in (1.0, 0.33)}
        cases += [
            (f"{name} gate, SAE topk k=16, scale", lambda e=e, g=gate, s=sae, c=scale: triton_sae_steer_gate(e, g, s, c, None)),
            (f"{name} gate, no SAE", lambda e=e, g=plain_gate: triton_sae_steer_gate(e, g, None, None, None)),
            (f"{name} sparse branch, usage 1.00", lambda x=x, k=keeps[1.0], w=w, h=heads: sparse_attention(x, k, w, h)),
            (f"{name} sparse branch, usage 0.33", lambda x=x, k=keeps[0.33], w=w, h=heads: sparse_attention(x, k, w, h)),
            (f"{name} dense branch", lambda x=x, w=w, h=heads: dense_attention(x, w, h)),
        ]
    return cases


def profile_launches() -> list[str]:
    """Launch each of `launch_cases()` once, in order, inside a CUDA profiler range (compiled and
    warmed up before it, so a profiler that starts at the range sees only these launches). Prints
    and returns the labels in launch order: the profiler's report lists the kernels in the same
    order."""
    cases = launch_cases()
    for _, launch in cases:  # compile and warm up outside the profiled range
        launch()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for label, launch in cases:
        print(f"profiled launch: {label}", flush=True)
        launch()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    return [label for label, _ in cases]


HOST_REPEATS = 300


def host_us(fn, repeats: int = HOST_REPEATS, clock=time.perf_counter) -> float:
    """Median microseconds fn takes to return, i.e. the host's share of an eager call: on CUDA
    each call starts on an idle GPU (synchronized between calls, outside the timing), so it returns
    once its launches are enqueued and never waits for a full launch queue."""
    fn()  # (compiles on the first call)
    samples = []
    for _ in range(repeats):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = clock()
        fn()
        samples.append(clock() - start)
    return 1e6 * statistics.median(samples)


def host_costs(repeats: int = HOST_REPEATS) -> list[dict]:
    """`host_us` of each of `launch_cases()`, printed as it is measured: what an eager forward pays
    on the host per gated block, which CUDA-graph replay removes and the eager columns of the
    table include. Without CUDA (`main` runs it inside `compile_only`) the kernels are compiled for
    sm_90 and not launched, so the driver's launch calls are left out, and the dense branch, which
    would compute on the CPU, is skipped."""
    rows = []
    print("| launch | host us |\n| --- | --- |", flush=True)
    for label, launch in launch_cases():
        if DEVICE != "cuda" and label.endswith("dense branch"):
            continue
        rows.append(dict(launch=label, host_us=host_us(launch, repeats)))
        print(f"| {label} | {rows[-1]['host_us']:.1f} |", flush=True)
    return rows


def _launch_once(fn, rep_ms: int = GRAPH_REP_MS) -> float:
    """`graph_timed`'s stand-in while warming up: one launch (compiling what it needs), no timing;
    returns a placeholder of 1 us (the modes divide by their times; their output is dropped)."""
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return 1.0


def _launch_once_eager_and_graph(fn) -> tuple[float, float]:
    """`timed`'s stand-in while warming up."""
    return _launch_once(fn), 1.0


def warm_up_tasks() -> list[tuple[str, str, int]]:
    """(mode, model, variant index) of every launch sequence the timing modes run, one model each:
    the table and the breakdown (timed first), then each `--gate-sweep` variant (its TopK gate
    kernels compile slowest, 2-4 s each on one core), then each `--sweep` variant."""
    tasks = [(mode, model, 0) for mode in ("table", "breakdown") for model in MODELS]
    tasks += [("gate-sweep", model, index) for index in range(len(gate_sweep_variants())) for model in MODELS]
    tasks += [("sweep", model, index) for index in range(len(sweep_variants())) for model in MODELS]
    return tasks


def warm_up_task(task: tuple[str, str, int]) -> tuple[tuple[str, str, int], float, str]:
    """Run one of `warm_up_tasks()` with every timed call launched once instead, output dropped:
    returns (task, seconds, error or "")."""
    global MODELS, timed, graph_timed

    mode, model, index = task
    saved = MODELS, timed, graph_timed
    MODELS, timed, graph_timed = {model: MODELS[model]}, _launch_once_eager_and_graph, _launch_once
    start = time.perf_counter()
    error = ""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # (the modes print their placeholder "timings")
            if mode == "table":
                run_benchmark()
            elif mode == "breakdown":
                breakdown()
            elif mode == "gate-sweep":
                gate_sweep([gate_sweep_variants()[index]])
            elif mode == "sweep":
                sweep([sweep_variants()[index]])
            else:
                raise ValueError(f"unknown warm-up mode {mode!r}")
    except Exception as failed:  # the timing step will meet it again and report it in place
        error = failure(failed)
    finally:
        MODELS, timed, graph_timed = saved
    return task, time.perf_counter() - start, error


def warm_up(jobs: int, seconds: float, task_function=None, tasks: list | None = None) -> int:
    """Compile the kernels of every timing mode in `jobs` processes at once, into Triton's on-disk
    cache, so the timing steps that follow (one process each, serial by nature) load them instead
    of compiling them one after another: on a short GPU lease the serial compiles, not the
    timings, decide how much of `--sweep` and `--gate-sweep` gets timed. Stops at `seconds`
    (what is left compiles when timed); returns the number of tasks finished.
    `task_function`/`tasks` default to `warm_up_task` over `warm_up_tasks()` (tests swap them)."""
    import importlib
    import multiprocessing

    # Workers pickle the task function by module name: `python -m` runs this file as __main__.
    task_function = task_function or importlib.import_module("headsteer.bench.kernels").warm_up_task
    tasks = warm_up_tasks() if tasks is None else tasks
    deadline = time.monotonic() + seconds
    finished = 0
    # spawn: CUDA cannot be used in a forked child of a process that has initialized it.
    pool = multiprocessing.get_context("spawn").Pool(jobs)
    try:
        results = pool.imap_unordered(task_function, tasks)
        for _ in tasks:
            try:
                task, took, error = results.next(timeout=max(deadline - time.monotonic(), 0.0))
            except multiprocessing.TimeoutError:
                print(f"warm-up: stopped at its {seconds:.0f} s limit with {len(tasks) - finished} of {len(tasks)} "
                      "tasks unfinished (they compile when timed)", flush=True)
                break
            finished += 1
            print(f"{took:6.1f}s {' '.join(map(str, task))}{'  ' + error if error else ''}", flush=True)
    finally:
        pool.terminate()  # (unfinished compiles must not compete with the timing steps for CPUs)
        pool.join()
    return finished


def markdown(results: dict, device: str, date: str, command: str) -> str:
    lines = [
        "## Triton kernels (issue 4)", "",
        f"Measured on {device}, {date}, with `{command}`; torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}. B={BATCH}, N={TOKENS}, bf16, d=64; medians of "
        "`triton.testing.do_bench` in microseconds (L2 flushed between runs); `graph` = the same "
        "call replayed from a CUDA graph (`do_bench_cudagraph`: replays back to back, L2 not "
        "flushed, so weights the call reads stay warm, e.g. the SAE's in the gate share). "
        "Dense = F.linear qkv + flash SDPA + F.linear proj.",
        f"Targets: {TARGETS}.", "",
        "| model | usage | heads kept | dense us | sparse us | speedup | dense graph us | sparse graph us | speedup graph |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["attention"]:
        lines.append(f"| {r['model']} | {r['usage']:.2f} | {r['heads_kept']}/{r['heads']} | {r['dense_us']:.1f} | "
                     f"{r['sparse_us']:.1f} | {r['speedup']:.2f}x | {r['dense_graph_us']:.1f} | "
                     f"{r['sparse_graph_us']:.1f} | {r['speedup_graph']:.2f}x |")
    lines += ["", "Fused SAE -> steer -> gate (one launch, keep mask included) against one dense block "
              "(norm1 + attention + norm2 + MLP, residuals):", "",
              "| model | SAE | gate us | block us | share | gate graph us | block graph us | share graph "
              "| gate cold graph us | block cold graph us | share cold graph |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["gate"]:
        lines.append(f"| {r['model']} | {r['sae']} | {r['gate_us']:.1f} | {r['block_us']:.1f} | {100 * r['share']:.1f}% | "
                     f"{r['gate_graph_us']:.1f} | {r['block_graph_us']:.1f} | {100 * r['share_graph']:.1f}% | "
                     f"{r['gate_cold_graph_us']:.1f} | {r['block_cold_graph_us']:.1f} | "
                     f"{100 * r['share_cold_graph']:.1f}% |")
    lines += ["", "Cold graph columns: L2 flushed before each replayed call (`graph_timed_cold`), as inside a "
              "forward, where a block's weights pass through L2 between two gates."]
    return "\n".join(lines) + "\n"


# Which options each mode takes ("table": no mode flag, the table); the others are refused.
MODE_OPTIONS = {
    "table": ("json", "md"),
    "breakdown": ("json",),
    "host": ("json", "repeats"),
    "warm_up": ("jobs", "seconds"),
    "sweep": (),
    "gate_sweep": (),
    "profile": (),
}
OPTIONS = ("json", "md", "jobs", "seconds", "repeats")  # (each the dest of its --flag)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked before any work: one mode at most, only the options that mode
    takes, and report paths that can be written (the parser's usage error otherwise)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the measurements as JSON (the table, --breakdown, --host)")
    parser.add_argument("--md", help="write the RESULTS.md section as markdown (the table only)")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--sweep", action="store_true", help="time alternative attention tile configurations")
    modes.add_argument("--breakdown", action="store_true", help="time each kernel of the dense and sparse branch")
    modes.add_argument("--gate-sweep", action="store_true", help="time alternative tiles and warps of the fused gate")
    modes.add_argument("--profile", action="store_true",
                       help="launch the gate and both branches once each for `ncu --profile-from-start off`")
    modes.add_argument("--warm-up", action="store_true",
                       help="only compile every mode's kernels into Triton's cache, in parallel processes")
    modes.add_argument("--host", action="store_true",
                       help="time each launch's host cost (what eager calls pay before the GPU runs anything); "
                            "without CUDA, compiled for sm_90 and not launched")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes of --warm-up (default: one fewer than the CPUs, at most 16)")
    parser.add_argument("--seconds", type=float, default=None, help="time limit of --warm-up (default 60)")
    parser.add_argument("--repeats", type=int, default=None, help=f"calls --host times per launch (default {HOST_REPEATS})")
    args = parser.parse_args(argv)
    args.mode = next((mode for mode in MODE_OPTIONS if mode != "table" and getattr(args, mode)), "table")
    given = [name for name in OPTIONS if getattr(args, name) is not None]
    wrong = ["--" + name for name in given if name not in MODE_OPTIONS[args.mode]]
    if wrong:
        mode = "the table (no mode option)" if args.mode == "table" else "--" + args.mode.replace("_", "-")
        parser.error(f"{', '.join(wrong)} does not apply to {mode}")
    args.jobs = max(1, min(16, (os.cpu_count() or 2) - 1)) if args.jobs is None else args.jobs
    args.seconds = 60.0 if args.seconds is None else args.seconds
    args.repeats = HOST_REPEATS if args.repeats is None else args.repeats
    if args.jobs < 1 or not 0 < args.seconds < math.inf or args.repeats < 1:  # (nan and inf too)
        parser.error(f"--jobs and --repeats must be at least 1 and --seconds positive and finite "
                     f"(got {args.jobs}, {args.repeats} and {args.seconds})")
    from headsteer.bench.harness import check_report_paths
    from headsteer.runtime.errors import InputError

    try:
        check_report_paths([("--" + name, getattr(args, name)) for name in ("json", "md") if getattr(args, name)])
    except InputError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.host:
        return host_main(args.repeats, args.json, argv)
    if not torch.cuda.is_available():
        print("headsteer.bench.kernels: no CUDA device; the Triton kernel timings are GPU-only, nothing measured.")
        return 0
    if args.warm_up:
        warm_up(args.jobs, args.seconds)
    elif args.profile:
        profile_launches()
    elif args.sweep:
        sweep()
    elif args.gate_sweep:
        gate_sweep()
    elif args.breakdown:
        results = breakdown()  # (prints its table row by row)
        if args.json:
            write_text_atomic(args.json, json.dumps(results, indent=2))
    else:
        table_main(args, argv)
    return 0


def table_main(args: argparse.Namespace, argv: list[str] | None) -> None:
    """The issue's table: printed, and written to --json/--md when given."""
    device = torch.cuda.get_device_name()
    date, command = run_stamp(argv)
    results = run_benchmark()
    text = markdown(results, device, date, command)
    print(text)
    if args.json:
        write_text_atomic(args.json, json.dumps(dict(device=device, date=date, command=command, **results), indent=2))
    if args.md:
        write_text_atomic(args.md, text)


def run_stamp(argv: list[str] | None) -> tuple[str, str]:
    """(UTC date, the command line) that a measured table is recorded with."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python -m headsteer.bench.kernels " + " ".join(argv if argv is not None else sys.argv[1:])
    return date, command.strip()


def host_main(repeats: int, json_path: str | None, argv: list[str] | None) -> int:
    """`--host`: `host_costs` on the GPU, or without one inside `compile_only` on CPU tensors."""
    global DEVICE

    from headsteer.bench.harness import cpu_name
    from headsteer.kernels.aot import compile_only

    cuda = torch.cuda.is_available()
    host = f"{cpu_name()} ({os.cpu_count()} CPUs)"
    device = f"{torch.cuda.get_device_name()}, host {host}" if cuda else f"{host}, no GPU"
    if cuda:
        rows = host_costs(repeats)
    else:
        DEVICE = "cpu"  # (CPU tensors stand in for CUDA ones: `compile_only` compiles, nothing runs)
        with compile_only():
            rows = host_costs(repeats)
    if json_path:
        date, command = run_stamp(argv)
        write_text_atomic(json_path, json.dumps(dict(
            device=device, date=date, command=command, torch=torch.__version__,
            triton=__import__("triton").__version__, launched=cuda, host=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

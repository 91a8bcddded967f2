"""FLOP accounting for a timm VisionTransformer, and the ideal speed-up of skipping pruned heads.

Counts multiply-adds as 2 FLOPs, for the matrix products only (patch embedding, per block the QKV
projection, the two attention products, the output projection and the MLP's linear layers, the
attention-pool head of `global_pool="map"` models (its linears and its latent queries' attention)
and the classifier head). Norms, activations, softmax and residual adds are not counted; neither is
the head gate or the SAE (a few [B, D] products per gated block), so the unpruned gated model
has exactly the FLOPs of timm dense and its ideal speed-up is 1.0.

A pruned head skips its QKV rows (2*N*D*3d), its attention (2*N*N*d for q k^T and again for
the product with v) and its output-projection columns (2*N*d*D_out), per sample and block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn as nn


@dataclass
class ViTFlops:
    """FLOPs of one sample through a timm VisionTransformer at one image size."""

    tokens: int
    patch_embed: int
    blocks: list = field(default_factory=list)  # per block: dict(qkv, attn, proj, mlp, head_flops)
    head: int = 0
    pool: int = 0  # the attention-pool head (global_pool="map"), 0 without one

    @property
    def total(self) -> int:
        """Dense FLOPs per sample."""
        return self.patch_embed + self.pool + self.head + sum(b["qkv"] + b["attn"] + b["proj"] + b["mlp"] for b in self.blocks)

    def head_flops(self, block: int) -> int:
        """FLOPs one head of block `block` costs per sample (what pruning it saves)."""
        return self.blocks[block]["head_flops"]


def _linear_flops(module: nn.Module, rows: int) -> int:
    return sum(2 * rows * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def patch_size(vit: nn.Module) -> tuple[int, int]:
    """(patch_h, patch_w) of timm VisionTransformer `vit` (timm stores an int or a pair)."""
    patch = vit.patch_embed.patch_size
    return tuple(int(p) for p in patch) if isinstance(patch, (tuple, list)) else (int(patch),) * 2


def _num_patches(vit: nn.Module, img_size: Sequence[int]) -> tuple[int, int]:
    """(number of patch tokens, in_chans * patch_h * patch_w) at `img_size`."""
    embed = vit.patch_embed
    patch = patch_size(vit)
    stride = embed.proj.stride if isinstance(embed.proj, nn.Conv2d) else patch
    if getattr(embed, "dynamic_img_pad", False):  # timm pads each side up to a multiple of the patch
        img_size = [-(-int(s) // int(p)) * int(p) for s, p in zip(img_size, patch)]
    grid = [(int(s) - int(p)) // int(st) + 1 for s, p, st in zip(img_size, patch, stride)]
    in_chans = embed.proj.in_channels if isinstance(embed.proj, nn.Conv2d) else 3
    return grid[0] * grid[1], in_chans * int(patch[0]) * int(patch[1])


def vit_flops(vit: nn.Module, img_size: Optional[Sequence[int]] = None) -> ViTFlops:
    """Dense per-sample FLOPs of timm VisionTransformer `vit` at `img_size` (default: its own)."""
    if img_size is None:
        img_size = tuple(vit.patch_embed.img_size)
    elif isinstance(img_size, int):
        img_size = (img_size, img_size)
    patches, patch_dim = _num_patches(vit, img_size)
    embed_dim = vit.embed_dim
    tokens = patches + int(getattr(vit, "num_prefix_tokens", 1))
    counts = ViTFlops(tokens=tokens, patch_embed=2 * patches * patch_dim * embed_dim)
    for block in vit.blocks:
        attn = block.attn
        heads = attn.num_heads
        qkv_out = attn.qkv.out_features
        head_dim = qkv_out // (3 * heads)
        in_dim = attn.qkv.in_features
        out_dim = attn.proj.out_features
        n = tokens
        qkv = 2 * n * in_dim * qkv_out
        scores = 2 * 2 * n * n * head_dim * heads  # q k^T and attn @ v
        proj = 2 * n * heads * head_dim * out_dim
        head_flops = 2 * n * in_dim * 3 * head_dim + 2 * 2 * n * n * head_dim + 2 * n * head_dim * out_dim
        counts.blocks.append(
            dict(qkv=qkv, attn=scores, proj=proj, mlp=_linear_flops(block.mlp, n), head_flops=head_flops, heads=heads)
        )
    counts.pool = _attention_pool_flops(vit, tokens, patches)
    head = getattr(vit, "head", None)
    counts.head = _linear_flops(head, 1) if isinstance(head, nn.Module) else 0
    return counts


def _attention_pool_flops(vit: nn.Module, tokens: int, patches: int) -> int:
    """timm's AttentionPoolLatent (`vit.attn_pool`): q on the latent queries, kv on the pooled
    tokens, q k^T and (.)v between them, then proj and the MLP on the latent queries."""
    pool = getattr(vit, "attn_pool", None)
    if pool is None:
        return 0
    keys = tokens if getattr(vit, "pool_include_prefix", False) else patches
    queries = int(pool.latent_len)
    flops = _linear_flops(pool.kv, keys) + 2 * 2 * queries * keys * pool.num_heads * pool.head_dim
    for name in ("q", "proj", "mlp"):
        module = getattr(pool, name, None)
        if isinstance(module, nn.Module):
            flops += _linear_flops(module, queries)
    return flops


def skipped_flops(counts: ViTFlops, head_mask: torch.Tensor, gate_blocks: Sequence[int]) -> int:
    """FLOPs not computed over the whole batch, given the measured head_mask [B, L_gated, H]."""
    if head_mask.numel() == 0:
        return 0
    pruned = (~head_mask.bool()).sum(dim=(0, 2)).tolist()  # per gated block, over samples and heads
    return int(sum(int(n) * counts.head_flops(block) for n, block in zip(pruned, gate_blocks)))


def ideal_speedup(counts: ViTFlops, head_mask: Optional[torch.Tensor], gate_blocks: Sequence[int], batch: int) -> float:
    """Dense FLOPs / FLOPs left after skipping the pruned heads of `head_mask` (1.0 when None)."""
    dense = counts.total * batch
    if head_mask is None:
        return 1.0
    return dense / (dense - skipped_flops(counts, head_mask, gate_blocks))


__all__ = ["ViTFlops", "vit_flops", "patch_size", "skipped_flops", "ideal_speedup"]

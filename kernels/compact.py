"""Compact attention in plain torch: only the heads each sample keeps are computed.

Samples are grouped by how many heads they keep. Within a group every sample's Q/K/V rows and
output-projection columns are gathered from head-major copies of the weights into per-sample
slices, so the whole group runs as three batched matrix products and one fused attention call,
never a loop over heads. A group that keeps every head takes the dense path, a group that keeps
none returns the projection bias, and a group whose samples share one head set uses a single
weight slice. This path synchronizes with the host (it reads the mask to size the work), which is
free on the CPU; the Triton backend is the sync-free path for CUDA.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

Norm = Optional[Callable[[torch.Tensor], torch.Tensor]]


def head_major_weights(
    qkv_weight: torch.Tensor, qkv_bias: Optional[torch.Tensor], proj_weight: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Rearrange timm's weights so each head's slice is contiguous and can be gathered by index.

    Returns qkv_heads [H, 3*d, D] (rows q|k|v of head h), qkv_bias_heads [H, 3*d] or None, and
    proj_heads [H, d, D_out] (the transposed output-projection columns of head h)."""
    in_dim = qkv_weight.shape[1]
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    qkv_heads = qkv_weight.view(3, num_heads, head_dim, in_dim).transpose(0, 1).reshape(num_heads, 3 * head_dim, in_dim)
    qkv_bias_heads = None
    if qkv_bias is not None:
        qkv_bias_heads = qkv_bias.view(3, num_heads, head_dim).transpose(0, 1).reshape(num_heads, 3 * head_dim)
    proj_heads = proj_weight.t().reshape(num_heads, head_dim, proj_weight.shape[0]).contiguous()
    return qkv_heads.contiguous(), qkv_bias_heads, proj_heads


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_norm: Norm, k_norm: Norm) -> torch.Tensor:
    """[b, K, N, d] each -> head outputs laid out [b, N, K*d] for the output projection."""
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    heads = F.scaled_dot_product_attention(q, k, v)
    batch, kept, tokens, head_dim = heads.shape
    return heads.transpose(1, 2).reshape(batch, tokens, kept * head_dim)


def dense_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, q_norm: Norm = None, k_norm: Norm = None):
    """Every head, as timm's fused Attention computes it."""
    batch, tokens, _ = x.shape
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    qkv = F.linear(x, qkv_weight, qkv_bias).view(batch, tokens, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return F.linear(_attend(q, k, v, q_norm, k_norm), proj_weight, proj_bias)


def _runs(heads: list) -> list:
    """Sorted head indices -> [(start, stop), ...] runs of consecutive heads."""
    runs, start, last = [], heads[0], heads[0]
    for head in heads[1:]:
        if head != last + 1:
            runs.append((start, last + 1))
            start = head
        last = head
    runs.append((start, last + 1))
    return runs


def _head_runs_attention(x, runs, head_major, proj_bias, q_norm: Norm, k_norm: Norm):
    """One head set shared by all samples x [b, N, D], given as runs of consecutive heads: each
    run's head-major weights are a contiguous view, so nothing is gathered; per run one QKV GEMM
    over b*N rows, one attention call, and its output-projection columns accumulated in place.
    At batch 1 this saves the weight copy (up to 1.5 MB per block for vit_small), which is a few
    percent of the whole block there."""
    qkv_heads, qkv_bias_heads, proj_heads = head_major
    batch, tokens, _ = x.shape
    head_dim = proj_heads.shape[1]
    out = None
    for start, stop in runs:
        kept = stop - start
        width = kept * 3 * head_dim
        bias = None if qkv_bias_heads is None else qkv_bias_heads[start:stop].reshape(width)
        qkv = F.linear(x, qkv_heads[start:stop].reshape(width, -1), bias)
        q, k, v = qkv.view(batch, tokens, kept, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)
        heads = _attend(q, k, v, q_norm, k_norm).reshape(batch * tokens, kept * head_dim)
        weight = proj_heads[start:stop].reshape(kept * head_dim, -1)
        if out is None:
            out = torch.mm(heads, weight) if proj_bias is None else torch.addmm(proj_bias.to(heads.dtype), heads, weight)
        else:
            out.addmm_(heads, weight)
    return out.view(batch, tokens, -1)


def _kept_heads_attention(x, head_lists, head_major, proj_bias, q_norm: Norm, k_norm: Norm):
    """Attention over the heads listed per sample in head_lists (b lists of K sorted head
    indices, K the same for every sample) for the samples x [b, N, D]."""
    qkv_heads, qkv_bias_heads, proj_heads = head_major
    batch, tokens, _ = x.shape
    kept = len(head_lists[0])
    head_dim = proj_heads.shape[1]
    shared = all(heads == head_lists[0] for heads in head_lists)
    if shared:
        runs = _runs(head_lists[0])
        if len(runs) <= 2:
            return _head_runs_attention(x, runs, head_major, proj_bias, q_norm, k_norm)
    # index_select copies whole contiguous [3d, D] / [d, D_out] head slices: about twice as fast
    # as advanced indexing (aten::index), and it is the only weight traffic beyond the GEMMs.
    flat = head_lists[0] if shared else [h for heads in head_lists for h in heads]
    index = torch.tensor(flat, dtype=torch.long, device=x.device)
    width = kept * 3 * head_dim
    qkv_weight = qkv_heads.index_select(0, index)
    qkv_bias = qkv_bias_heads.index_select(0, index) if qkv_bias_heads is not None else None
    proj_weight = proj_heads.index_select(0, index)
    if shared:
        # One head set for the whole group: a single weight slice and plain GEMMs over b*N rows.
        qkv = F.linear(x, qkv_weight.view(width, -1), None if qkv_bias is None else qkv_bias.view(width))
    elif qkv_bias is not None:  # per-sample gathered rows, one batched product
        qkv = torch.baddbmm(qkv_bias.view(batch, 1, width), x, qkv_weight.view(batch, width, -1).transpose(1, 2))
    else:
        qkv = torch.bmm(x, qkv_weight.view(batch, width, -1).transpose(1, 2))
    q, k, v = qkv.view(batch, tokens, kept, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)
    heads = _attend(q, k, v, q_norm, k_norm)  # [b, N, K*d]
    if shared:
        out = torch.matmul(heads, proj_weight.view(kept * head_dim, -1))
        return out.add_(proj_bias) if proj_bias is not None else out
    proj = proj_weight.view(batch, kept * head_dim, -1)  # per-sample gathered columns
    if proj_bias is not None:
        return torch.baddbmm(proj_bias.view(1, 1, -1), heads, proj)
    return torch.bmm(heads, proj)


def compact_head_attention(
    x: torch.Tensor,
    keep: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    num_heads: int,
    q_norm: Norm = None,
    k_norm: Norm = None,
    head_major: Optional[tuple] = None,
) -> torch.Tensor:
    """Attention branch computing only kept heads; equals `reference.head_attention(x, keep, ...)`.

    x [B, N, D], keep bool [B, H]. head_major: `head_major_weights(...)` of these weights, passed
    in by callers that cache it.

    The mask is read to the host once ([B, H] bools) and grouped in Python: on the CPU that is
    cheaper than the dozen tiny tensor ops (unique, nonzero, comparisons) it replaces, which at
    batch 1 cost as much as a pruned head."""
    batch, tokens, _ = x.shape
    if keep.dtype != torch.bool or tuple(keep.shape) != (batch, num_heads):
        # (another shape would silently drop heads, or leave samples' rows uninitialized)
        raise ValueError(f"keep must be a bool [B, H] = [{batch}, {num_heads}] mask, "
                         f"got {keep.dtype} {list(keep.shape)}")
    rows = keep.tolist()
    groups: dict = {}
    for sample, row in enumerate(rows):
        heads = [h for h, kept in enumerate(row) if kept]
        groups.setdefault(len(heads), ([], []))
        groups[len(heads)][0].append(sample)
        groups[len(heads)][1].append(heads)
    if len(groups) == 1 and num_heads in groups:
        return dense_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, q_norm, k_norm)
    if head_major is None:
        head_major = head_major_weights(qkv_weight, qkv_bias, proj_weight, num_heads)
    out_dim = proj_weight.shape[0]
    out = None if len(groups) == 1 else x.new_empty(batch, tokens, out_dim)
    for count, (samples, head_lists) in groups.items():
        index = None if out is None else torch.tensor(samples, dtype=torch.long, device=x.device)
        xs = x if index is None else x.index_select(0, index)
        if count == 0:
            bias = proj_bias if proj_bias is not None else x.new_zeros(out_dim)
            y = bias.to(x.dtype).expand(xs.shape[0], tokens, out_dim)
        elif count == num_heads:
            y = dense_attention(xs, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, q_norm, k_norm)
        else:
            y = _kept_heads_attention(xs, head_lists, head_major, proj_bias, q_norm, k_norm)
        if index is None:
            # (a copy: `.contiguous()` of the bias's [1, 1, D] view would be proj_bias itself)
            return y.clone(memory_format=torch.contiguous_format) if count == 0 else y
        out.index_copy_(0, index, y.to(out.dtype))
    return out

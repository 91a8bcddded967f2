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


def _kept_heads_attention(x, head_index, head_major, proj_bias, q_norm: Norm, k_norm: Norm):
    """Attention over the heads listed in head_index [b, K] (sorted) for the samples x [b, N, D]."""
    qkv_heads, qkv_bias_heads, proj_heads = head_major
    batch, tokens, _ = x.shape
    kept = head_index.shape[1]
    head_dim = proj_heads.shape[1]
    shared = bool((head_index == head_index[:1]).all())
    if shared:
        # One head set for the whole group: a single weight slice and plain GEMMs over b*N rows.
        index = head_index[0]
        bias = qkv_bias_heads[index].reshape(-1) if qkv_bias_heads is not None else None
        qkv = F.linear(x, qkv_heads[index].reshape(kept * 3 * head_dim, -1), bias)
    else:
        weight = qkv_heads[head_index].reshape(batch, kept * 3 * head_dim, -1)  # per-sample gathered rows
        if qkv_bias_heads is not None:
            bias = qkv_bias_heads[head_index].reshape(batch, 1, kept * 3 * head_dim)
            qkv = torch.baddbmm(bias, x, weight.transpose(1, 2))
        else:
            qkv = torch.bmm(x, weight.transpose(1, 2))
    q, k, v = qkv.view(batch, tokens, kept, 3, head_dim).permute(3, 0, 2, 1, 4).unbind(0)
    heads = _attend(q, k, v, q_norm, k_norm)  # [b, N, K*d]
    if shared:
        return F.linear(heads, proj_heads[head_index[0]].reshape(kept * head_dim, -1).t(), proj_bias)
    proj = proj_heads[head_index].reshape(batch, kept * head_dim, -1)  # per-sample gathered columns
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
    in by callers that cache it."""
    if bool(keep.all()):
        return dense_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, q_norm, k_norm)
    if head_major is None:
        head_major = head_major_weights(qkv_weight, qkv_bias, proj_weight, num_heads)
    batch, tokens, _ = x.shape
    out_dim = proj_weight.shape[0]
    counts = keep.sum(dim=1)
    groups = counts.unique().tolist()
    out = None if len(groups) == 1 else x.new_empty(batch, tokens, out_dim)
    for count in groups:
        rows = None if out is None else (counts == count).nonzero().squeeze(1)
        xs = x if rows is None else x.index_select(0, rows)
        if count == 0:
            y = (proj_bias if proj_bias is not None else x.new_zeros(out_dim)).expand(xs.shape[0], tokens, out_dim)
        elif count == num_heads:
            y = dense_attention(xs, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, q_norm, k_norm)
        else:
            group_keep = keep if rows is None else keep.index_select(0, rows)
            head_index = group_keep.nonzero()[:, 1].view(xs.shape[0], int(count))
            y = _kept_heads_attention(xs, head_index, head_major, proj_bias, q_norm, k_norm)
        if rows is None:
            return y.contiguous() if count == 0 else y
        out.index_copy_(0, rows, y.to(out.dtype) if count else y.contiguous())
    return out

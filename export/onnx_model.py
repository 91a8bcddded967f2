"""An export-friendly view of a GatedViT: the same math as `kernels/reference.py`, written with
ops that ONNX exporters trace into clean, static graphs (and that the TensorRT ONNX parser reads).

`ExportableGatedViT(model, attention)` wraps a GatedViT (sharing its weights, copying nothing but
head-major weight views) and has the ONNX contract's signature:

    forward(pixel_values [B,3,H,W], steer_scale [B,S], steer_shift [B,S]) -> (logits [B,C], head_mask [B,L,H] bool)

Two attention variants for the gated blocks:

* ``masked``: every head is computed, pruned heads are multiplied by 0 (`reference.head_attention`).
  Static shapes except the batch; every op is one TensorRT parses.
* ``sparse``: only kept (sample, head) pairs are computed. `NonZero` over the [B, H] keep mask
  gives P (sample, head) pairs; the sample index gathers each pair's tokens, the head index
  gathers its head-major Q/K/V rows and output-projection slice; one batched matmul per stage
  runs over the P pairs; each pair's projected output is scattered (ScatterND, no
  reduction: the pair indices are unique) into a [B*H, N, D] zero buffer that is summed over
  heads. No loop over data, no host sync. The scatter uses ``reduction="none"`` because the
  TensorRT parser rejects ScatterND reductions.

Threshold gating only (`keep = gate_logits > 0`): a head budget is not part of the ONNX contract.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from headsteer.kernels import reference
from headsteer.runtime.errors import InputError

ATTENTION_VARIANTS = ("masked", "sparse")
COMPUTE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _norm_or_none(module: nn.Module):
    return None if isinstance(module, nn.Identity) else module


def sae_encode_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """TopK activation written with ONNX TopK + ScatterElements (the reference uses a rank count,
    which costs an [S, S] comparison per sample). ONNX TopK keeps the lower index on ties, as the
    reference does."""
    _, index = torch.topk(pre, k, dim=-1, largest=True, sorted=True)
    chosen = torch.zeros_like(pre).scatter(-1, index, torch.ones_like(index, dtype=pre.dtype))
    return torch.where(chosen > 0, F.relu(pre), torch.zeros_like(pre))


def sparse_head_attention(
    x: torch.Tensor,
    keep: torch.Tensor,
    qkv_heads: torch.Tensor,
    qkv_bias_heads: Optional[torch.Tensor],
    proj_heads: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    q_norm=None,
    k_norm=None,
) -> torch.Tensor:
    """Attention over kept (sample, head) pairs only; equals `reference.head_attention(x, keep, ...)`.

    x [B, N, D]; keep bool [B, H]; qkv_heads [H, 3d, D] (rows q|k|v of head h), qkv_bias_heads
    [H, 3d] or None, proj_heads [H, d, D_out] (from `kernels.compact.head_major_weights`)."""
    batch, tokens, _ = x.shape
    num_heads, three_d, _ = qkv_heads.shape
    head_dim = three_d // 3
    out_dim = proj_heads.shape[2]
    # NonZero over a float mask (TensorRT's NonZero takes FP32/FP16): [P, 2] (sample, head) pairs
    # in row-major order; their flat indices b*H+h are unique.
    index = torch.nonzero(keep.to(torch.float32))
    sample, head = index[:, 0], index[:, 1]
    pairs = sample * num_heads + head
    xs = x.index_select(0, sample)  # [P, N, D]
    qkv = torch.bmm(xs, qkv_heads.index_select(0, head).transpose(1, 2))  # [P, N, 3d]
    if qkv_bias_heads is not None:
        qkv = qkv + qkv_bias_heads.index_select(0, head).unsqueeze(1)
    q, k, v = qkv[..., :head_dim], qkv[..., head_dim : 2 * head_dim], qkv[..., 2 * head_dim :]
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    scores = torch.bmm(q * head_dim**-0.5, k.transpose(1, 2))  # [P, N, N]
    heads = torch.bmm(scores.softmax(dim=-1), v)  # [P, N, d]
    y = torch.bmm(heads, proj_heads.index_select(0, head))  # [P, N, D_out]
    # Unique pair indices: a plain ScatterND into a [B*H, N, D_out] buffer, then a sum over heads.
    # (Summed in fp32: also keeps the graph valid for bf16 backbones, ConstantOfShape has no bf16.)
    buffer = torch.zeros(batch * num_heads, tokens, out_dim, dtype=torch.float32, device=x.device)
    buffer = buffer.index_put((pairs,), y.float())
    out = buffer.view(batch, num_heads, tokens, out_dim).sum(dim=1).to(x.dtype)
    if proj_bias is not None:
        out = out + proj_bias
    return out


class ExportableGatedViT(nn.Module):
    """GatedViT forward with the ONNX contract's signature; see the module docstring."""

    def __init__(self, model: nn.Module, attention: str = "masked", compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if attention not in ATTENTION_VARIANTS:
            raise InputError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        if compute_dtype not in COMPUTE_DTYPES.values():
            raise InputError(f"compute dtype must be one of {sorted(COMPUTE_DTYPES)}, got {compute_dtype}")
        self.compute_dtype = compute_dtype
        half = any(tensor.is_floating_point() and tensor.dtype != torch.float32 for tensor in (*model.parameters(), *model.buffers()))
        if half or compute_dtype != torch.float32:
            # The graph is float32 (inputs, SAEs, gates) whatever dtype the model was in: a copy
            # of an fp16/bf16 model is cast to fp32 first (the exporter cannot trace float32
            # inputs into half weights). Mixed precision for strongly typed engines: the backbone
            # in fp16/bf16, the SAEs and gates (a few [B, D] products deciding the mask) stay fp32
            # so decisions do not flip.
            model = copy.deepcopy(model).float()
        if compute_dtype != torch.float32:
            model.vit.to(compute_dtype)
            model.vit.patch_embed.float()  # ONNX Conv (opset < 22) has no bfloat16: patchify in fp32
        self.model = model.eval()
        self.attention = attention
        self._head_major = {}
        if attention == "sparse":
            from headsteer.kernels.compact import head_major_weights

            for index in model.gate_blocks:
                attn = model.vit.blocks[index].attn
                with torch.no_grad():
                    qkv, qkv_bias, proj = head_major_weights(attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.num_heads)
                # Registered as buffers so the exporter stores them as initializers.
                self.register_buffer(f"qkv_heads_{index}", qkv.detach().clone(), persistent=False)
                if qkv_bias is not None:
                    self.register_buffer(f"qkv_bias_heads_{index}", qkv_bias.detach().clone(), persistent=False)
                self.register_buffer(f"proj_heads_{index}", proj.detach().clone(), persistent=False)
                self._head_major[index] = qkv_bias is not None

    def _gate(self, index: int, e: torch.Tensor, steer_scale: torch.Tensor, steer_shift: torch.Tensor) -> torch.Tensor:
        model = self.model
        gate = model.gates[str(index)]
        g = e
        if str(index) in model.saes:
            sae = model.saes[str(index)]
            start = model.sae_offsets[model.sae_blocks.index(index)]
            scale = steer_scale[:, start : start + sae.width]
            shift = steer_shift[:, start : start + sae.width]
            pre = (e - sae.decoder_bias) @ sae.encoder_weight.t() + sae.encoder_bias
            if sae.activation == "topk":
                z = sae_encode_topk(pre, int(sae.k))
            elif sae.activation == "relu":
                z = F.relu(pre)
            else:  # jumprelu
                z = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
            g = reference.steer_gate_input(e, z, sae.decoder_weight, sae.decoder_bias, scale, shift, model.steer_mode)
        return reference.gate_logits(g, **gate.kernel_params())

    def _attention(self, index: int, x: torch.Tensor, keep: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        q_norm, k_norm = _norm_or_none(attn.q_norm), _norm_or_none(attn.k_norm)
        if self.attention == "masked":
            return reference.head_attention(
                x, keep.to(x.dtype), attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, attn.num_heads,
                q_norm=q_norm, k_norm=k_norm,
            )
        qkv_bias = getattr(self, f"qkv_bias_heads_{index}") if self._head_major[index] else None
        return sparse_head_attention(
            x, keep, getattr(self, f"qkv_heads_{index}"), qkv_bias, getattr(self, f"proj_heads_{index}"), attn.proj.bias,
            q_norm=q_norm, k_norm=k_norm,
        )

    def forward(self, pixel_values: torch.Tensor, steer_scale: torch.Tensor, steer_shift: torch.Tensor):
        model = self.model
        vit = model.vit
        x = vit.patch_embed(pixel_values).to(self.compute_dtype)
        x = vit._pos_embed(x)
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        has_class_token = getattr(vit, "cls_token", None) is not None
        gated = set(model.gate_blocks)
        masks = []
        for index, block in enumerate(vit.blocks):
            if index not in gated:
                x = block(x)
                continue
            e = reference.decision_vector(x, vit.num_prefix_tokens, has_class_token).float()
            keep = self._gate(index, e, steer_scale, steer_shift) > 0
            masks.append(keep)
            branch = self._attention(index, block.norm1(x), keep, block.attn)
            x = x + block.drop_path1(block.ls1(branch))
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        logits = vit.forward_head(vit.norm(x)).float()
        if masks:
            head_mask = torch.stack(masks, dim=1)
        else:
            head_mask = torch.zeros(pixel_values.shape[0], 0, model.num_heads, dtype=torch.bool, device=pixel_values.device)
        return logits, head_mask

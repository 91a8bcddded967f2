"""Backend dispatch: one place that maps a backend name to the function computing each kernel."""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef

from headsteer.kernels import compact, reference

BACKENDS = ("reference", "compact", "triton")

# Head-major weight copies for the compact backend, per attention module, rebuilt whenever the
# weights change (a Parameter's _version counts its in-place updates: optimizer steps, loads).
# Writes through `param.data` (e.g. `p.data.mul_(...)`) bypass that counter and are not seen:
# update weights in place under torch.no_grad() instead. Storages are told apart by identity, not
# by address (new weights can land at the old address with the same version count, e.g.
# `.half().float()` on CUDA): the entry holds weak references to them, so a freed storage's id is
# not handed to another while it is cached.
_HEAD_MAJOR_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _norm_or_none(module: nn.Module):
    return None if isinstance(module, nn.Identity) else module


def triton_available(device: torch.device) -> bool:
    """Triton runs compiled on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _require_triton(tensor: torch.Tensor) -> None:
    if not triton_available(tensor.device):
        raise RuntimeError(
            "the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 to interpret kernels on the CPU); "
            "use backend='compact' on the CPU"
        )


def _head_major(attn: nn.Module) -> tuple:
    qkv, proj, bias = attn.qkv.weight, attn.proj.weight, attn.qkv.bias
    sources = (qkv, proj) if bias is None else (qkv, proj, bias)
    if (torch.is_grad_enabled() and any(w.requires_grad for w in sources)) or any(w.is_inference() for w in sources):
        # Built per call, uncached: (1) autograd through the compact path, where the copies must
        # carry gradients back to the weights (cached ones, built without grad, silently dropped
        # them); (2) weights created or moved inside torch.inference_mode are inference tensors,
        # which have no version counter, so an in-place update could not be seen.
        return compact.head_major_weights(qkv, bias, proj, attn.num_heads)
    # (the head-major copies include the qkv bias, so its updates count too: e.g. a bias-only step)
    key = (qkv.untyped_storage()._cdata, qkv.data_ptr(), qkv._version,
           proj.untyped_storage()._cdata, proj.data_ptr(), proj._version, qkv.dtype, qkv.device,
           None if bias is None else (bias.untyped_storage()._cdata, bias.data_ptr(), bias._version, bias.dtype))
    cached = _HEAD_MAJOR_CACHE.get(attn)
    if cached is None or cached[0] != key:
        # Normal tensors even when first built under torch.inference_mode (Engine's warm-up):
        # inference tensors cannot be saved for backward, so a later grad-mode call with an
        # input that requires grad (a saliency map) would fail on them.
        pins = [StorageWeakRef(w.untyped_storage()) for w in sources]  # (no other storage gets their ids)
        with torch.inference_mode(False), torch.no_grad():
            head_major = compact.head_major_weights(qkv, attn.qkv.bias, proj, attn.num_heads)
        cached = (key, head_major, pins)
        _HEAD_MAJOR_CACHE[attn] = cached
    return cached[1]


def _block_update(branch: torch.Tensor, residual: torch.Tensor, layer_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """`residual + branch * layer_scale`, the operations (and so the bits) of timm's
    `x + drop_path1(ls1(branch))` at inference."""
    return residual + (branch if layer_scale is None else branch * layer_scale)


def head_attention(
    backend: str,
    x: torch.Tensor,
    keep: torch.Tensor,
    head_weight: Optional[torch.Tensor],
    attn: nn.Module,
    training: bool = False,
    residual: Optional[torch.Tensor] = None,
    layer_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The attention branch of one gated block (timm `Attention` module `attn`) on input x [B, N, D].

    keep is the bool mask [B, H]; head_weight its float form (straight-through in training,
    where every backend falls back to the differentiable reference), or None for keep as 0/1.
    With `residual` it returns `residual + branch * layer_scale` (layer_scale None: 1), i.e. a
    pre-norm block's update at inference, which the triton backend adds inside its output
    projection; the other backends compute it as timm does, so they stay bit-exact."""
    if layer_scale is not None and residual is None:
        raise ValueError("layer_scale scales the branch added to a residual; pass residual too")
    if residual is not None and not (backend == "triton" and not training):
        return _block_update(head_attention(backend, x, keep, head_weight, attn, training), residual, layer_scale)
    q_norm, k_norm = _norm_or_none(attn.q_norm), _norm_or_none(attn.k_norm)
    args = (attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias, attn.num_heads)
    # keep itself is the 0/1 weight of the masked dense paths (reference.head_attention casts it).
    head_weight = keep if head_weight is None else head_weight
    if training:  # (timm's dropouts: on the attention probabilities and the branch output)
        return attn.proj_drop(reference.head_attention(x, head_weight, *args, q_norm=q_norm, k_norm=k_norm,
                                                       attn_drop=attn.attn_drop))
    if backend == "reference":
        return reference.head_attention(x, head_weight, *args, q_norm=q_norm, k_norm=k_norm)
    if backend == "compact":
        return compact.compact_head_attention(x, keep, *args, q_norm=q_norm, k_norm=k_norm, head_major=_head_major(attn))
    if backend == "triton":
        _require_triton(x)
        head_dim = attn.qkv.weight.shape[0] // (3 * attn.num_heads)
        if not all(
            norm is None or (isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (head_dim,))
            for norm in (q_norm, k_norm)
        ):
            # The kernel fuses LayerNorm q/k norms only; others take the masked dense path,
            # which stays free of host synchronization.
            branch = reference.head_attention(x, head_weight, *args, q_norm=q_norm, k_norm=k_norm)
            return branch if residual is None else _block_update(branch, residual, layer_scale)
        from headsteer.kernels.triton_head_attention import triton_head_attention

        return triton_head_attention(x, keep, *args, q_norm=q_norm, k_norm=k_norm, residual=residual,
                                     layer_scale=layer_scale)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def sae_steer_gate(
    backend: str,
    e: torch.Tensor,
    gate_params: dict,
    sae_params: Optional[dict],
    steer_scale: Optional[torch.Tensor],
    steer_shift: Optional[torch.Tensor],
    mode: str,
    budget: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAE -> steer -> gate for one block: (gate logits [B, H], keep [B, H] bool).

    reference runs the spec; compact computes the same thing with less work (no SAE at all under
    identity steering in "preserve-error" mode, where g = e exactly); triton fuses it into one
    launch."""
    if backend == "triton":
        _require_triton(e)
        from headsteer.kernels.triton_sae_gate import triton_sae_steer_gate

        return triton_sae_steer_gate(e, gate_params, sae_params, steer_scale, steer_shift, mode, budget)
    if backend == "compact":
        return fast_sae_steer_gate(e, gate_params, sae_params, steer_scale, steer_shift, mode, budget)
    if backend == "reference":
        return reference.sae_steer_gate(e, gate_params, sae_params, steer_scale, steer_shift, mode, budget)
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


# Below this many elements GELU is written out with erf. On the CPU, torch's fused F.gelu opens a
# parallel region even for a gate's [B, 96] hidden layer: with 2 threads that took 7.8 ms instead
# of 7 us per call on a machine whose other core was busy (the region waits until its second
# thread is scheduled), while mul/add/erf stay single-threaded at this size. Same function (GELU,
# erf form); results differ from F.gelu by float rounding only (<= 2e-6 here).
_SMALL_GELU = 1 << 16


def _gelu(h: torch.Tensor) -> torch.Tensor:
    if h.device.type == "cpu" and h.numel() <= _SMALL_GELU:
        # 16-bit inputs are computed in fp32 and rounded once, as F.gelu does: four ops each
        # rounded to bf16 moved gate logits by up to 0.03 and flipped keep decisions. (fp32 and
        # fp64 stay in their own precision.)
        wide = h.float() if h.dtype in (torch.float16, torch.bfloat16) else h
        return (wide * 0.5 * (1.0 + torch.erf(wide * 0.7071067811865476))).to(h.dtype)
    return F.gelu(h)


def gate_logits(g, norm_weight, norm_bias, norm_eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> torch.Tensor:
    """`reference.gate_logits` (LayerNorm -> Linear -> GELU(erf) -> Linear) with `_gelu`."""
    hidden = F.layer_norm(g, (g.shape[-1],), norm_weight, norm_bias, norm_eps)
    hidden = _gelu(F.linear(hidden, fc1_weight, fc1_bias))
    return F.linear(hidden, fc2_weight, fc2_bias)


def fast_sae_steer_gate(
    e: torch.Tensor,
    gate_params: dict,
    sae_params: Optional[dict],
    steer_scale: Optional[torch.Tensor],
    steer_shift: Optional[torch.Tensor],
    mode: str,
    budget: Optional[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.sae_steer_gate` without its slow parts: the same operations, except GELU written
    out with erf on small CPU tensors (logits equal to float rounding, <= 2e-6)."""
    g = e
    identity = steer_scale is None and steer_shift is None and mode == "preserve-error"
    if sae_params is not None and not identity:  # identity steering: g = e + W_dec (z - z) = e
        z = reference.sae_encode(
            e, sae_params["enc_weight"], sae_params["enc_bias"], sae_params["dec_bias"], sae_params["activation"],
            k=sae_params.get("k"), threshold=sae_params.get("threshold"),
        )
        g = reference.steer_gate_input(e, z, sae_params["dec_weight"], sae_params["dec_bias"], steer_scale, steer_shift, mode)
    logits = gate_logits(g, **gate_params)
    return logits, reference.keep_from_logits(logits, budget)

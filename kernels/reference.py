"""Pure-torch definition of every headsteer kernel: the spec each fast path is tested against.

Shapes: B samples, N tokens, D model width, H heads of size d, S SAE latents, G gate hidden width.
Nothing here is fast; everything here is obvious. The `reference` backend of
`headsteer.runtime.GatedViT` is built from these functions.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

SAE_ACTIVATIONS = ("topk", "relu", "jumprelu")
STEER_MODES = ("preserve-error", "reconstruct")


def decision_vector(x: torch.Tensor, num_prefix_tokens: int, has_class_token: bool) -> torch.Tensor:
    """The gate's view of the residual stream [B, N, D] -> [B, D].

    The class token (first prefix token) when the model has one, else the mean over patch tokens
    (register tokens excluded)."""
    if has_class_token:
        return x[:, 0]
    return x[:, num_prefix_tokens:].mean(dim=1)


def sae_encode(
    e: torch.Tensor,
    enc_weight: torch.Tensor,
    enc_bias: torch.Tensor,
    dec_bias: torch.Tensor,
    activation: str,
    k: Optional[int] = None,
    threshold: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """SAE latents `z = act(W_enc (e - b_dec) + b_enc)`, [B, D] -> [B, S].

    enc_weight is [S, D]. TopK keeps the k largest pre-activations (ties: lower latent index
    first) and applies ReLU to them; JumpReLU keeps pre-activations above a per-latent threshold."""
    pre = (e - dec_bias) @ enc_weight.t() + enc_bias
    if activation == "relu":
        return F.relu(pre)
    if activation == "topk":
        if k is None or not 0 <= k <= pre.shape[-1]:
            raise ValueError(f"topk SAE needs 0 <= k <= {pre.shape[-1]}, got {k}")
        keep = topk_mask(pre, k)
        return torch.where(keep, F.relu(pre), torch.zeros_like(pre))
    if activation == "jumprelu":
        if threshold is None:
            raise ValueError("jumprelu SAE needs a per-latent threshold")
        return torch.where(pre > threshold, pre, torch.zeros_like(pre))
    raise ValueError(f"unknown SAE activation {activation!r}; expected one of {SAE_ACTIVATIONS}")


def sae_decode(z: torch.Tensor, dec_weight: torch.Tensor, dec_bias: torch.Tensor) -> torch.Tensor:
    """`x_hat = W_dec z + b_dec`; dec_weight is [S, D] (one unit-norm row per latent)."""
    return z @ dec_weight + dec_bias


def steer_gate_input(
    e: torch.Tensor,
    z: torch.Tensor,
    dec_weight: torch.Tensor,
    dec_bias: torch.Tensor,
    steer_scale: Optional[torch.Tensor],
    steer_shift: Optional[torch.Tensor],
    mode: str = "preserve-error",
) -> torch.Tensor:
    """Gate input from steered latents `z' = z * steer_scale + steer_shift`.

    "preserve-error": `g = e + W_dec (z' - z)`, so identity steering gives exactly `e`.
    "reconstruct": `g = W_dec z' + b_dec`. Steering vectors of another float dtype than z (fp32
    rows steering a bf16 model) steer in the wider of the two; z' is rounded once to z's dtype."""
    steered = z
    if steer_scale is not None:
        steered = steered * steer_scale
    if steer_shift is not None:
        steered = steered + steer_shift
    steered = steered.to(z.dtype)
    if mode == "preserve-error":
        return e + (steered - z) @ dec_weight
    if mode == "reconstruct":
        return sae_decode(steered, dec_weight, dec_bias)
    raise ValueError(f"unknown steering mode {mode!r}; expected one of {STEER_MODES}")


def gate_logits(
    g: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    norm_eps: float,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
) -> torch.Tensor:
    """Head gate `LayerNorm -> Linear(D, G) -> GELU(erf) -> Linear(G, H)`, [B, D] -> [B, H]."""
    hidden = F.layer_norm(g, (g.shape[-1],), norm_weight, norm_bias, norm_eps)
    hidden = F.gelu(F.linear(hidden, fc1_weight, fc1_bias))
    return F.linear(hidden, fc2_weight, fc2_bias)


def heads_for_budget(budget: float, num_heads: int) -> int:
    """Exactly `round(budget * H)` heads, rounding halves up (0.5 -> 1), as every backend must;
    computed in Python floats whatever number type the budget is, so every path agrees (numpy
    float32 arithmetic rounds np.float32(5 / 12) * 6 to 2.5, 3 heads, where the same budget as a
    Python float, the Engine's, gives 2.4999999, 2 heads)."""
    budget = float(budget)
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"head budget must be in [0, 1], got {budget}")
    return int(math.floor(budget * num_heads + 0.5))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest entries of each row, ties broken toward the lower index.

    A stable descending sort keeps equal entries in index order, so the first k of it are the k
    largest with ties going to the lower index. (Kernels compute the same selection without a
    sort, e.g. by counting for each entry how many entries beat it.)"""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    k = max(0, min(k, scores.shape[-1]))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return mask.scatter_(-1, order, True)


def keep_from_logits(logits: torch.Tensor, budget: Optional[float] = None) -> torch.Tensor:
    """Inference keep mask [B, H] (bool): `logits > 0`, or the `round(budget*H)` largest logits."""
    if budget is None:
        return logits > 0
    return topk_mask(logits, heads_for_budget(budget, logits.shape[-1]))


def sae_steer_gate(
    e: torch.Tensor,
    gate_params: dict,
    sae_params: Optional[dict] = None,
    steer_scale: Optional[torch.Tensor] = None,
    steer_shift: Optional[torch.Tensor] = None,
    mode: str = "preserve-error",
    budget: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAE -> steer -> gate for one gated block: decision vectors [B, D] -> (logits [B, H], keep).

    gate_params: norm_weight, norm_bias, norm_eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias.
    sae_params (None for a gated block without an SAE, where g = e): enc_weight [S, D],
    enc_bias [S], dec_weight [S, D], dec_bias [D], activation, k, threshold."""
    g = e
    if sae_params is not None:
        z = sae_encode(
            e,
            sae_params["enc_weight"],
            sae_params["enc_bias"],
            sae_params["dec_bias"],
            sae_params["activation"],
            k=sae_params.get("k"),
            threshold=sae_params.get("threshold"),
        )
        g = steer_gate_input(e, z, sae_params["dec_weight"], sae_params["dec_bias"], steer_scale, steer_shift, mode)
    logits = gate_logits(g, **gate_params)
    return logits, keep_from_logits(logits, budget)


def head_attention(
    x: torch.Tensor,
    head_weight: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    num_heads: int,
    q_norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    k_norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    attn_drop: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Masked dense attention branch: every head computed, head h of sample b scaled by
    `head_weight[b, h]` (the keep mask as 0/1, or a straight-through soft mask in training).

    x [B, N, D]; qkv_weight [3*H*d, D] in timm's (q|k|v, head, dim) row order; proj_weight
    [D_out, H*d]. Returns `sum_h w_bh softmax(q_h k_h^T / sqrt(d)) v_h W_o[:, h] + b_o`.
    attn_drop (training only: timm's `Attention.attn_drop`) is applied to the softmax
    probabilities, where timm's non-fused path applies it."""
    batch, tokens, _ = x.shape
    head_dim = qkv_weight.shape[0] // (3 * num_heads)
    qkv = F.linear(x, qkv_weight, qkv_bias).reshape(batch, tokens, 3, num_heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, N, d]
    if q_norm is not None:
        q = q_norm(q)
    if k_norm is not None:
        k = k_norm(k)
    scores = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    probs = scores.softmax(dim=-1)
    if attn_drop is not None:
        probs = attn_drop(probs)
    heads = probs @ v  # [B, H, N, d]
    heads = heads * head_weight.to(heads.dtype)[:, :, None, None]
    heads = heads.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)
    return F.linear(heads, proj_weight, proj_bias)

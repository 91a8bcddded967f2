"""`kernels/reference.py` (and the compact backend beside it) against ../shared/DESIGN.md's
formulas, recomputed here by hand: per sample and per head, in float64, with nothing taken from
`reference`. The other tests check every fast path against `reference`; these check `reference`
itself against the spec, so a slip there cannot pass everywhere at once.

Random inputs come from the per-test seed that tests/conftest.py sets."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from headsteer.kernels import compact, reference
from headsteer.kernels.dispatch import fast_sae_steer_gate

F64 = torch.float64


# -- hand computations of DESIGN.md "The model" ---------------------------------------------------
def hand_sae_encode(e, enc_w, enc_b, dec_b, activation, k=None, threshold=None):
    """`z = act(W_enc (e - b_dec) + b_enc)`, one sample and one latent at a time."""
    batch, width = e.shape[0], enc_w.shape[0]
    z = torch.zeros(batch, width, dtype=F64)
    enc_w, enc_b, dec_b, e = (t.tolist() for t in (enc_w, enc_b, dec_b, e))
    threshold = None if threshold is None else threshold.tolist()
    for b in range(batch):
        centered = [v - c for v, c in zip(e[b], dec_b)]
        pre = [sum(w * v for w, v in zip(enc_w[s], centered)) + enc_b[s] for s in range(width)]
        if activation == "relu":
            chosen = range(width)
        elif activation == "topk":  # the k largest, ties to the lower latent index, then ReLU
            chosen = sorted(range(width), key=lambda s: (-pre[s], s))[:k]
        for s in range(width):
            if activation == "jumprelu":
                z[b, s] = pre[s] if pre[s] > float(threshold[s]) else 0.0
            elif s in chosen:
                z[b, s] = max(pre[s], 0.0)
    return z


def hand_gate_logits(g, norm_w, norm_b, eps, fc1_w, fc1_b, fc2_w, fc2_b):
    """LayerNorm (biased variance) -> Linear -> GELU (erf form) -> Linear, one sample at a time."""
    out = torch.zeros(g.shape[0], fc2_w.shape[0], dtype=F64)
    g, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b = (t.tolist() for t in (g, norm_w, norm_b, fc1_w, fc1_b, fc2_w, fc2_b))
    for b, row in enumerate(g):
        mean = sum(row) / len(row)
        var = sum((v - mean) ** 2 for v in row) / len(row)
        normed = [(v - mean) / math.sqrt(var + eps) * norm_w[j] + norm_b[j] for j, v in enumerate(row)]
        hidden = []
        for weights, bias in zip(fc1_w, fc1_b):
            h = sum(w * v for w, v in zip(weights, normed)) + bias
            hidden.append(0.5 * h * (1.0 + math.erf(h / math.sqrt(2.0))))
        for h_, (weights, bias) in enumerate(zip(fc2_w, fc2_b)):
            out[b, h_] = sum(w * v for w, v in zip(weights, hidden)) + bias
    return out


def hand_keep(logits, budget=None):
    """`logits > 0`, or exactly round(b*H) heads (halves up) with the largest logits, ties to the
    lower head index."""
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    heads = logits.shape[1]
    for b in range(logits.shape[0]):
        row = [float(v) for v in logits[b]]
        if budget is None:
            chosen = [h for h in range(heads) if row[h] > 0]
        else:
            count = int(math.floor(budget * heads + 0.5))
            chosen = sorted(range(heads), key=lambda h: (-row[h], h))[:count]
        keep[b, chosen] = True
    return keep


def hand_attention(x, keep, qkv_w, qkv_b, proj_w, proj_b, num_heads):
    """`y = sum over kept h of softmax(q_h k_h^T / sqrt(d)) v_h W_o[:, h] + b_o`, head by head."""
    batch, tokens, _ = x.shape
    d = qkv_w.shape[0] // (3 * num_heads)
    y = torch.zeros(batch, tokens, proj_w.shape[0], dtype=F64)
    for b in range(batch):
        y[b] = proj_b if proj_b is not None else 0.0
        for h in range(num_heads):
            if not keep[b, h]:
                continue
            rows = [slice(part * num_heads * d + h * d, part * num_heads * d + (h + 1) * d) for part in range(3)]
            q, k, v = (x[b] @ qkv_w[r].T + (qkv_b[r] if qkv_b is not None else 0.0) for r in rows)
            scores = q @ k.T / math.sqrt(d)
            probs = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            probs = probs / probs.sum(dim=1, keepdim=True)
            y[b] += (probs @ v) @ proj_w[:, h * d : (h + 1) * d].T
    return y


# -- fixtures ---------------------------------------------------------------------------------------
def rand_sae(dim, width):
    return dict(
        enc_weight=torch.randn(width, dim, dtype=F64) / dim**0.5,
        enc_bias=0.3 * torch.randn(width, dtype=F64),
        dec_weight=F.normalize(torch.randn(width, dim, dtype=F64), dim=1),
        dec_bias=0.3 * torch.randn(dim, dtype=F64),
        threshold=0.4 * torch.randn(width, dtype=F64),
    )


def rand_gate(dim, hidden, heads):
    return dict(
        norm_weight=1 + 0.3 * torch.randn(dim, dtype=F64),
        norm_bias=0.3 * torch.randn(dim, dtype=F64),
        norm_eps=1e-5,
        fc1_weight=torch.randn(hidden, dim, dtype=F64) / dim**0.5,
        fc1_bias=0.3 * torch.randn(hidden, dtype=F64),
        fc2_weight=torch.randn(heads, hidden, dtype=F64) / hidden**0.5,
        fc2_bias=0.3 * torch.randn(heads, dtype=F64),
    )


# -- 3. SAE ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("activation,k", [("relu", None), ("jumprelu", None), ("topk", 0), ("topk", 1), ("topk", 5), ("topk", 12)])
def test_sae_encode_is_the_specs_formula(batch, activation, k):
    dim, width = 10, 12
    p = rand_sae(dim, width)
    e = torch.randn(batch, dim, dtype=F64)
    got = reference.sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], activation, k=k, threshold=p["threshold"])
    want = hand_sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], activation, k=k, threshold=p["threshold"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got != 0, want != 0)
    if activation == "topk":
        assert ((got != 0).sum(-1) <= k).all()


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])
def test_sae_topk_ties_go_to_the_lower_latent(k):
    """Duplicated encoder rows tie exactly; k cuts through each tie."""
    dim = 8
    p = rand_sae(dim, 6)
    p["enc_weight"] = torch.randn(3, dim, dtype=F64).repeat(2, 1)  # latent i ties latent i+3
    p["enc_bias"] = torch.tensor([0.5, 0.2, 0.9], dtype=F64).repeat(2)
    e = torch.randn(3, dim, dtype=F64)
    got = reference.sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], "topk", k=k)
    want = hand_sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], "topk", k=k)
    assert torch.equal(got != 0, want != 0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [3, 10, 21])
def test_sae_topk_ties_go_to_the_lower_latent_in_a_wide_sae(k):
    """SAEs are wide (4 D latents), and over 16 entries torch's default sort is not stable: the tie
    rule must hold there too. A zero encoder makes every pre-activation exactly b_enc, drawn from
    three values."""
    dim, width = 4, 48
    p = rand_sae(dim, width)
    p["enc_weight"] = torch.zeros(width, dim, dtype=F64)
    p["enc_bias"] = torch.tensor([0.25, 0.5, 1.0], dtype=F64)[torch.randint(0, 3, (width,))]
    e = torch.randn(2, dim, dtype=F64)
    got = reference.sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], "topk", k=k)
    assert torch.equal(got, hand_sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], "topk", k=k))


def test_sae_decode_and_unit_norm_decoder_rows():
    """`x_hat = W_dec z + b_dec` with W_dec's rows (one per latent) of unit norm, at init and after
    the projection training calls after each step."""
    from headsteer.runtime.gated_vit import SparseAutoencoder

    sae = SparseAutoencoder(16, 40, "topk", k=4)
    torch.testing.assert_close(sae.decoder_weight.norm(dim=1), torch.ones(40))
    with torch.no_grad():
        sae.decoder_weight.mul_(torch.rand(40, 1) * 3 + 0.1)
        sae.normalize_decoder_()
    torch.testing.assert_close(sae.decoder_weight.norm(dim=1), torch.ones(40))
    with torch.no_grad():  # a dead (all-zero) row stays zero, not NaN
        sae.decoder_weight[7] = 0.0
        sae.normalize_decoder_()
    assert torch.equal(sae.decoder_weight[7], torch.zeros(16)) and sae.decoder_weight.isfinite().all()
    z = torch.randn(3, 40, dtype=F64)
    w, b = sae.decoder_weight.detach().double(), sae.decoder_bias.detach().double() + torch.randn(16, dtype=F64)
    want = torch.stack([sum(z[n, s] * w[s] for s in range(40)) + b for n in range(3)])
    torch.testing.assert_close(reference.sae_decode(z, w, b), want)
    e = torch.randn(2, 16)
    x_hat, latents = sae(e)  # forward: (x_hat, z)
    assert torch.equal(latents, sae.encode(e)) and torch.equal(x_hat, sae.decode(latents))


# -- 4. steering -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["preserve-error", "reconstruct"])
@pytest.mark.parametrize("batch", [1, 3])
def test_steered_gate_input_is_the_specs_formula(mode, batch):
    dim, width = 9, 14
    p = rand_sae(dim, width)
    e = torch.randn(batch, dim, dtype=F64)
    z = F.relu(torch.randn(batch, width, dtype=F64))
    scale, shift = 3 * torch.rand(batch, width, dtype=F64), torch.randn(batch, width, dtype=F64)
    got = reference.steer_gate_input(e, z, p["dec_weight"], p["dec_bias"], scale, shift, mode)
    want = torch.zeros(batch, dim, dtype=F64)
    for b in range(batch):
        steered = [float(z[b, s]) * float(scale[b, s]) + float(shift[b, s]) for s in range(width)]
        if mode == "preserve-error":  # g = e + W_dec (z' - z)
            want[b] = e[b] + sum((steered[s] - float(z[b, s])) * p["dec_weight"][s] for s in range(width))
        else:  # g = W_dec z' + b_dec
            want[b] = sum(steered[s] * p["dec_weight"][s] for s in range(width)) + p["dec_bias"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identity_steering_gives_exactly_e_in_preserve_error_and_x_hat_in_reconstruct(dtype):
    """Identity steering is ones and zeros; "preserve-error" must then give e to the bit (an
    unsteered model behaves exactly as if the SAE were absent), passed as tensors or as None."""
    dim, width, batch = 12, 20, 5
    p = {key: value.to(dtype) for key, value in rand_sae(dim, width).items()}
    e = torch.randn(batch, dim, dtype=dtype) * 10
    z = reference.sae_encode(e, p["enc_weight"], p["enc_bias"], p["dec_bias"], "relu")
    ones, zeros = torch.ones(batch, width, dtype=dtype), torch.zeros(batch, width, dtype=dtype)
    for scale, shift in ((ones, zeros), (None, None), (ones, None), (None, zeros)):
        assert torch.equal(reference.steer_gate_input(e, z, p["dec_weight"], p["dec_bias"], scale, shift), e)
        got = reference.steer_gate_input(e, z, p["dec_weight"], p["dec_bias"], scale, shift, "reconstruct")
        assert torch.equal(got, reference.sae_decode(z, p["dec_weight"], p["dec_bias"]))


def test_fp32_steering_of_a_bfloat16_sae_rounds_the_steered_latents_once():
    """fp32 steering rows on a bf16 model: z' = z * scale + shift in fp32, rounded once to bf16;
    the gate input stays bf16 in both modes."""
    p = {key: value.bfloat16() for key, value in rand_sae(8, 12).items()}
    e, z = torch.randn(3, 8).bfloat16(), F.relu(torch.randn(3, 12)).bfloat16()
    scale, shift = 3 * torch.rand(3, 12), torch.randn(3, 12)
    steered = (z.float() * scale + shift).bfloat16()
    for mode, want in (("preserve-error", e + (steered - z) @ p["dec_weight"]),
                       ("reconstruct", steered @ p["dec_weight"] + p["dec_bias"])):
        got = reference.steer_gate_input(e, z, p["dec_weight"], p["dec_bias"], scale, shift, mode)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want), mode


# -- 2. gate and keep --------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
def test_gate_logits_are_layernorm_mlp_with_erf_gelu(batch):
    dim, hidden, heads = 12, 7, 5
    gate = rand_gate(dim, hidden, heads)
    g = 2 * torch.randn(batch, dim, dtype=F64) + 0.5
    want = hand_gate_logits(g, *gate.values())
    torch.testing.assert_close(reference.gate_logits(g, **gate), want, rtol=0, atol=1e-12)
    from headsteer.kernels.dispatch import gate_logits as fast_gate_logits

    torch.testing.assert_close(fast_gate_logits(g, **gate), want, rtol=0, atol=1e-12)


BUDGETS = [None, 0.0, 1 / 12, 0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9, 1.0]


@pytest.mark.parametrize("heads", [1, 2, 3, 4, 6, 12])
@pytest.mark.parametrize("batch", [1, 5])
def test_keep_rule_threshold_and_budget_with_ties(heads, batch):
    """Logits drawn from a few values, exact zeros among them (a zero logit is pruned: keep is
    `logits > 0`), so the budget's cut falls inside ties; both backends' keep rules must agree
    with the hand rule, including b = 0 (no head kept) and b = 1 (all kept)."""
    logits = torch.tensor([-1.0, 0.0, 0.0, 0.5, 2.0], dtype=F64)[torch.randint(0, 5, (batch, heads))]
    for budget in BUDGETS:
        want = hand_keep(logits, budget)
        assert torch.equal(reference.keep_from_logits(logits, budget), want), budget
        if budget is not None:
            assert (want.sum(-1) == int(math.floor(budget * heads + 0.5))).all()
    assert not reference.keep_from_logits(logits, 0.0).any()
    assert reference.keep_from_logits(logits, 1.0).all()


def test_topk_mask_clamps_k_to_the_row():
    scores = torch.tensor([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]])
    assert reference.topk_mask(scores, 5).all() and not reference.topk_mask(scores, -2).any()


@pytest.mark.parametrize("budget,heads,count", [(0.5, 1, 1), (0.25, 2, 1), (0.5, 3, 2), (1 / 6, 3, 1), (0.25, 6, 2), (0.75, 6, 5),
                                                (0.0, 6, 0), (1.0, 6, 6), (0.33, 6, 2), (0.34, 6, 2), (0.42, 6, 3)])
def test_heads_for_budget_rounds_halves_up(budget, heads, count):
    assert reference.heads_for_budget(budget, heads) == count


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("mode", ["preserve-error", "reconstruct"])
@pytest.mark.parametrize("budget", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 4])
def test_sae_steer_gate_end_to_end_by_hand(activation, mode, budget, batch):
    """SAE -> steer -> gate for one block, each step by hand, on the reference and compact paths."""
    dim, width, hidden, heads = 8, 10, 6, 4
    sae = dict(rand_sae(dim, width), activation=activation, k=3 if activation == "topk" else None)
    gate = rand_gate(dim, hidden, heads)
    e = torch.randn(batch, dim, dtype=F64)
    scale, shift = 3 * torch.rand(batch, width, dtype=F64), 0.5 * torch.randn(batch, width, dtype=F64)
    z = hand_sae_encode(e, sae["enc_weight"], sae["enc_bias"], sae["dec_bias"], activation, k=sae["k"], threshold=sae["threshold"])
    steered = z * scale + shift
    if mode == "preserve-error":
        g = e + (steered - z) @ sae["dec_weight"]
    else:
        g = steered @ sae["dec_weight"] + sae["dec_bias"]
    want_logits = hand_gate_logits(g, *gate.values())
    for run in (reference.sae_steer_gate, fast_sae_steer_gate):
        logits, keep = run(e, gate, sae, scale, shift, mode, budget)
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-10)
        assert torch.equal(keep, hand_keep(logits, budget))
    # A gated block without an SAE: g = e.
    for run in (reference.sae_steer_gate, fast_sae_steer_gate):
        logits, keep = run(e, gate, None, None, None, mode, budget)
        torch.testing.assert_close(logits, hand_gate_logits(e, *gate.values()), rtol=0, atol=1e-10)


# -- 5. attention ------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("mask", ["random", "none", "all", "one"])
@pytest.mark.parametrize("biases", [True, False])
def test_head_attention_is_the_sum_over_kept_heads(batch, mask, biases):
    heads, d, tokens, dim, out_dim = 4, 3, 5, 10, 7
    x = torch.randn(batch, tokens, dim, dtype=F64)
    qkv_w = torch.randn(3 * heads * d, dim, dtype=F64) / dim**0.5
    qkv_b = 0.3 * torch.randn(3 * heads * d, dtype=F64) if biases else None
    proj_w = torch.randn(out_dim, heads * d, dtype=F64) / (heads * d) ** 0.5
    proj_b = 0.3 * torch.randn(out_dim, dtype=F64) if biases else None
    keep = {
        "random": torch.rand(batch, heads) < 0.5,
        "none": torch.zeros(batch, heads, dtype=torch.bool),
        "all": torch.ones(batch, heads, dtype=torch.bool),
        "one": F.one_hot(torch.randint(0, heads, (batch,)), heads).bool(),
    }[mask]
    want = hand_attention(x, keep, qkv_w, qkv_b, proj_w, proj_b, heads)
    got = reference.head_attention(x, keep.to(F64), qkv_w, qkv_b, proj_w, proj_b, heads)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    got = compact.compact_head_attention(x, keep, qkv_w, qkv_b, proj_w, proj_b, heads)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if mask == "none":  # a pruned head contributes nothing: only the projection bias is left
        assert torch.equal(got, (proj_b if biases else torch.zeros(out_dim, dtype=F64)).expand_as(got))


def test_compact_never_reads_a_pruned_heads_weights():
    """"The fast backends must not compute a pruned head": NaN in every pruned head's Q/K/V rows
    and output-projection columns must not reach the compact path's output."""
    heads, d, tokens, dim = 4, 2, 3, 8
    keep = torch.tensor([[True, False, True, False], [True, False, True, False], [True, False, False, False]])
    x = torch.randn(3, tokens, dim, dtype=F64)
    qkv_w = torch.randn(3 * heads * d, dim, dtype=F64)
    qkv_b = torch.randn(3 * heads * d, dtype=F64)
    proj_w = torch.randn(dim, heads * d, dtype=F64)
    proj_b = torch.randn(dim, dtype=F64)
    want = hand_attention(x, keep, qkv_w, qkv_b, proj_w, proj_b, heads)
    pruned = [1, 3]  # never kept by any sample
    for h in pruned:
        for part in range(3):
            qkv_w[part * heads * d + h * d : part * heads * d + (h + 1) * d] = float("nan")
            qkv_b[part * heads * d + h * d : part * heads * d + (h + 1) * d] = float("nan")
        proj_w[:, h * d : (h + 1) * d] = float("nan")
    got = compact.compact_head_attention(x, keep, qkv_w, qkv_b, proj_w, proj_b, heads)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_heads_for_budget_counts_in_python_floats_for_any_number_type():
    """np.float32(5 / 12) keeps the heads its value does as a Python float (the Engine converts),
    not the 3 that numpy's float32 product (rounded to exactly 2.5) would give at H = 6."""
    import numpy as np

    for heads in range(1, 17):
        for twice in range(1, 2 * heads):
            budget = np.float32(twice / (2 * heads))
            assert reference.heads_for_budget(budget, heads) == reference.heads_for_budget(float(budget), heads)


def test_reference_refuses_arguments_the_spec_gives_no_meaning():
    """A topk SAE without k or with k outside [0, S], a jumprelu SAE without its threshold, an
    unknown activation or steering mode, a budget outside [0, 1]: ValueErrors naming the argument,
    not a TypeError from inside torch nor a result computed some other way."""
    p = rand_sae(6, 8)
    e = torch.randn(2, 6, dtype=F64)
    encode = (e, p["enc_weight"], p["enc_bias"], p["dec_bias"])
    for k in (None, -1, 9):
        with pytest.raises(ValueError, match=r"topk SAE needs 0 <= k <= 8, got"):
            reference.sae_encode(*encode, "topk", k=k)
    with pytest.raises(ValueError, match="jumprelu SAE needs a per-latent threshold"):
        reference.sae_encode(*encode, "jumprelu")
    with pytest.raises(ValueError, match="unknown SAE activation 'gelu'"):
        reference.sae_encode(*encode, "gelu")
    with pytest.raises(ValueError, match="unknown steering mode 'add'"):
        reference.steer_gate_input(e, torch.rand(2, 8, dtype=F64), p["dec_weight"], p["dec_bias"], None, None, "add")
    for budget in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="head budget must be in"):
            reference.heads_for_budget(budget, 6)

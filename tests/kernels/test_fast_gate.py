"""kernels/dispatch.py's fast SAE -> steer -> gate path (used by the compact backend) against the
spec in kernels/reference.py: identical logits and keep masks, ties included."""
import pytest
import torch

from headsteer.kernels import dispatch, reference


def _rank_count_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Independent oracle: entry i is kept when fewer than k entries beat it (larger, or equal
    at a lower index)."""
    n = scores.shape[-1]
    later, mine = scores.unsqueeze(-2), scores.unsqueeze(-1)
    index = torch.arange(n)
    earlier = index.view(1, n) < index.view(n, 1)
    beats = (later > mine) | ((later == mine) & earlier)
    return beats.sum(-1) < k


@pytest.mark.parametrize("rows,n,k", [(1, 7, 3), (5, 64, 16), (4, 1536, 16), (3, 6, 0), (3, 6, 6), (2, 5, 9)])
def test_topk_mask_matches_rank_count(rows, n, k):
    scores = torch.randn(rows, n)
    ties = torch.randint(-3, 4, (rows, n)).float()  # many exact ties: lower index must win
    for s in (scores, ties):
        assert torch.equal(reference.topk_mask(s, k), _rank_count_topk(s, k))


def _params(dim=24, heads=4, hidden=16, width=40, activation="topk", k=5):
    gate = dict(
        norm_weight=torch.randn(dim), norm_bias=torch.randn(dim), norm_eps=1e-6,
        fc1_weight=torch.randn(hidden, dim), fc1_bias=torch.randn(hidden),
        fc2_weight=torch.randn(heads, hidden), fc2_bias=torch.randn(heads),
    )
    dec = torch.nn.functional.normalize(torch.randn(width, dim), dim=1)
    sae = dict(enc_weight=torch.randn(width, dim), enc_bias=torch.randn(width), dec_weight=dec,
               dec_bias=torch.randn(dim), activation=activation, k=k if activation == "topk" else None,
               threshold=torch.rand(width))
    return gate, sae


@pytest.mark.parametrize("activation", ["topk", "relu", "jumprelu"])
@pytest.mark.parametrize("mode", ["preserve-error", "reconstruct"])
@pytest.mark.parametrize("budget", [None, 0.0, 0.5, 1.0])
@pytest.mark.parametrize("steering", ["none", "identity", "random"])
def test_fast_gate_matches_reference(activation, mode, budget, steering):
    gate, sae = _params(activation=activation)
    e = torch.randn(6, 24)
    scale = shift = None
    if steering == "identity":
        scale, shift = torch.ones(6, 40), torch.zeros(6, 40)
    elif steering == "random":
        scale, shift = torch.rand(6, 40) * 3, torch.randn(6, 40)
    want = reference.sae_steer_gate(e, gate, sae, scale, shift, mode, budget)
    got = dispatch.sae_steer_gate("compact", e, gate, sae, scale, shift, mode, budget)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], want[1])
    no_sae = dispatch.sae_steer_gate("compact", e, gate, None, None, None, mode, budget)
    want_no_sae = reference.sae_steer_gate(e, gate, None, None, None, mode, budget)
    assert torch.equal(no_sae[1], want_no_sae[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_gate_16bit_keeps_the_reference_heads(dtype):
    """On the CPU the compact gate writes GELU out with erf; in 16-bit each of its ops used to
    round to bf16/fp16 (F.gelu rounds once), moving logits enough to flip keep decisions and
    budget picks against the spec's. Logits near 0 (small fc2) make flips likely if it regresses."""
    dim, heads, hidden = 48, 6, 64
    for _ in range(20):
        gate = dict(
            norm_weight=torch.randn(dim), norm_bias=torch.randn(dim), norm_eps=1e-6,
            fc1_weight=torch.randn(hidden, dim) / dim**0.5, fc1_bias=torch.randn(hidden),
            fc2_weight=torch.randn(heads, hidden) / hidden**0.5, fc2_bias=torch.randn(heads) * 0.1,
        )
        gate = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in gate.items()}
        e = torch.randn(256, dim, dtype=dtype)
        for budget in (None, 0.5):
            want = reference.sae_steer_gate(e, gate, None, None, None, "preserve-error", budget)
            got = dispatch.sae_steer_gate("compact", e, gate, None, None, None, "preserve-error", budget)
            assert torch.equal(got[1], want[1])
            torch.testing.assert_close(got[0].float(), want[0].float(), atol=2 * torch.finfo(dtype).eps,
                                       rtol=2 * torch.finfo(dtype).eps)


def test_fast_gate_gelu_keeps_float64_precision():
    """Only 16-bit inputs are widened to fp32: fp64 logits (parity checks) stay fp64-exact, as
    F.gelu computes them, not rounded through fp32."""
    h = torch.randn(1000, dtype=torch.float64)
    got = dispatch._gelu(h)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.nn.functional.gelu(h), atol=1e-12, rtol=1e-12)


def test_unknown_backend_is_an_error():
    """As for head attention: a misspelt backend must not silently run the reference gate."""
    gate, sae = _params()
    with pytest.raises(ValueError, match="unknown backend 'compcat'"):
        dispatch.sae_steer_gate("compcat", torch.randn(2, 24), gate, sae, None, None, "preserve-error", None)


def _attention(dim=24, heads=4):
    from timm.models.vision_transformer import Attention

    return Attention(dim, num_heads=heads, qkv_bias=True).eval()


def test_head_attention_unknown_backend_is_an_error():
    attn = _attention()
    with pytest.raises(ValueError, match="unknown backend 'compcat'"):
        dispatch.head_attention("compcat", torch.randn(2, 5, 24), torch.ones(2, 4, dtype=torch.bool), None, attn)


def test_layer_scale_without_a_residual_is_refused():
    """layer_scale scales the branch added to a residual; alone it would be silently ignored."""
    attn = _attention()
    with pytest.raises(ValueError, match="pass residual too"):
        dispatch.head_attention("reference", torch.randn(2, 5, 24), torch.ones(2, 4, dtype=torch.bool), None, attn,
                                layer_scale=torch.full((24,), 0.5))


def test_triton_in_training_adds_the_residual_like_every_backend():
    """Training falls back to the differentiable reference on every backend, triton included (no CUDA
    needed): the update is still residual + branch * layer_scale."""
    attn = _attention()
    x, keep, residual, scale = torch.randn(2, 5, 24), torch.rand(2, 4) > 0.5, torch.randn(2, 5, 24), torch.rand(24)
    branch = dispatch.head_attention("reference", x, keep, None, attn, training=True)
    got = dispatch.head_attention("triton", x, keep, None, attn, training=True, residual=residual, layer_scale=scale)
    assert torch.equal(got, residual + branch * scale)


def test_triton_is_available_on_cuda_or_with_triton_interpret_1_only(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert dispatch.triton_available(torch.device("cuda", 0))
    assert not dispatch.triton_available(torch.device("cpu"))
    assert not dispatch.triton_available(torch.device("meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.triton_available(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.triton_available(torch.device("cpu"))


def test_the_triton_backend_without_cuda_or_interpreter_names_the_way_out(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gate, sae = _params()
    with pytest.raises(RuntimeError, match="needs CUDA tensors .*use backend='compact' on the CPU"):
        dispatch.sae_steer_gate("triton", torch.randn(2, 24), gate, sae, None, None, "preserve-error", None)
    with pytest.raises(RuntimeError, match="needs CUDA tensors .*use backend='compact' on the CPU"):
        dispatch.head_attention("triton", torch.randn(2, 5, 24), torch.ones(2, 4, dtype=torch.bool), None,
                                _attention())

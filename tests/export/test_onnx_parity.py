"""ONNX Runtime (CPU) against the PyTorch Engine: logits within 1e-4, identical head masks, for
batches 1, 3 and 16, identity steering, every per-class row of the steering table and random
steering vectors; both attention variants."""
from __future__ import annotations

import pytest
import torch

from headsteer.export.onnx_runner import OrtCallable, build_session
from headsteer.runtime.engine import Engine

from .conftest import CLASS_NAMES, make_model

ATOL = 1e-4
# A gate logit this close to 0 may legitimately flip between two float implementations; inputs
# are drawn so that none is (the check is on exact masks, so it is never loosened instead).
MARGIN = 1e-3
VARIANTS = ("masked", "sparse")
BATCHES = (1, 3, 16)


@pytest.fixture(scope="module")
def sessions(exported):
    return {variant: OrtCallable(build_session(path, ["CPUExecutionProvider"]), exported.model.steer_width) for variant, path in exported.onnx.items()}


@pytest.fixture(scope="module")
def torch_engine(exported):
    return Engine.load(exported.bundle, backend="compact")


def pixels_away_from_threshold(model, batch, scale, shift, seed):
    """(images, compact-backend output) with every gate logit (under this steering) at least
    MARGIN from 0."""
    generator = torch.Generator().manual_seed(seed)
    size = model.image_size
    pixels = torch.randn(batch, 3, *size, generator=generator)
    for _ in range(100):
        with torch.no_grad():
            out = model(pixels, scale, shift, backend="compact")
        bad = (out.gate_logits.abs() < MARGIN).flatten(1).any(dim=1)
        if not bool(bad.any()):
            return pixels, out
        pixels[bad] = torch.randn(int(bad.sum()), 3, *size, generator=generator)
    raise AssertionError("could not draw images away from the gate threshold")


def assert_parity(ort_out, torch_logits, torch_mask):
    logits, mask = ort_out
    assert logits.dtype == torch.float32 and mask.dtype == torch.bool
    assert logits.shape == torch_logits.shape and mask.shape == torch_mask.shape
    torch.testing.assert_close(logits, torch_logits.float(), atol=ATOL, rtol=0)
    assert torch.equal(mask, torch_mask), f"head masks differ at {(mask != torch_mask).nonzero().tolist()}"


def steering_cases(model, steering, batch, seed):
    """(label, scale, shift): identity, every class row, random vectors."""
    width = model.steer_width
    cases = [("identity", torch.ones(batch, width), torch.zeros(batch, width))]
    for row, name in enumerate(steering.class_names):
        cases.append((f"class {name}", steering.scale[row].expand(batch, -1).clone(), steering.shift[row].expand(batch, -1).clone()))
    generator = torch.Generator().manual_seed(seed)
    cases.append(("random", 3.0 * torch.rand(batch, width, generator=generator), torch.randn(batch, width, generator=generator)))
    return cases


@pytest.fixture(scope="module")
def torch_results(exported):
    """Per batch: (label, pixels, scale, shift, compact output) for every steering case, computed
    once and shared by both variants."""
    model, results = exported.model, {}
    for batch in BATCHES:
        results[batch] = []
        for index, (label, scale, shift) in enumerate(steering_cases(model, exported.steering, batch, seed=batch)):
            pixels, expected = pixels_away_from_threshold(model, batch, scale, shift, seed=100 * batch + index)
            results[batch].append((label, pixels, scale, shift, expected))
    return results


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", BATCHES)
def test_ort_matches_compact_for_every_steering(torch_results, sessions, variant, batch):
    run = sessions[variant]
    kept_fractions = []
    for label, pixels, scale, shift, expected in torch_results[batch]:
        try:
            assert_parity(run(pixels, scale, shift), expected.logits, expected.head_mask)
        except AssertionError as error:
            raise AssertionError(f"{variant}, batch {batch}, steering {label}: {error}") from None
        kept_fractions.append(expected.head_mask.float().mean().item())
    assert len(kept_fractions) == 2 + len(CLASS_NAMES)  # identity, every class row, random
    # Parity is not vacuous: heads are pruned, and not all of them.
    assert 0.05 < sum(kept_fractions) / len(kept_fractions) < 0.95, kept_fractions


@pytest.mark.parametrize("variant", VARIANTS)
def test_none_steering_is_identity(exported, sessions, variant):
    model = exported.model
    ones, zeros = torch.ones(3, model.steer_width), torch.zeros(3, model.steer_width)
    pixels, _ = pixels_away_from_threshold(model, 3, ones, zeros, seed=7)
    run = sessions[variant]
    explicit, implicit = run(pixels, ones, zeros), run(pixels, None, None)
    assert torch.equal(explicit[0], implicit[0]) and torch.equal(explicit[1], implicit[1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_onnxruntime_backend_matches_compact(exported, torch_engine, variant):
    engine = Engine.load(exported.bundle, backend="onnxruntime", onnx_path=exported.onnx[variant])
    assert engine.backend == "onnxruntime"
    batch = 16
    # Per-sample steering: each class, and unsteered samples, mixed in one batch.
    steer = [CLASS_NAMES[i % len(CLASS_NAMES)] if i % 3 else None for i in range(batch)]
    scale, shift = torch_engine.steering_vectors(steer, batch)
    pixels, _ = pixels_away_from_threshold(exported.model, batch, scale, shift, seed=11)
    got, expected = engine.predict(pixels, steer=steer), torch_engine.predict(pixels, steer=steer)
    assert_parity((got.logits, got.head_mask), expected.logits, expected.head_mask)
    assert got.class_names == expected.class_names
    with pytest.raises(Exception, match="budget"):
        engine.predict(pixels, budget=0.5)


def test_engine_exports_on_the_fly_and_caches(exported, tmp_path):
    cache = tmp_path / "cache"
    first = Engine.load(exported.bundle, backend="onnxruntime", attention="sparse", cache_dir=cache)
    files = sorted(cache.glob("*.onnx"))
    assert len(files) == 1 and files[0].name.endswith("-sparse.onnx")
    stamp = files[0].stat().st_mtime_ns
    second = Engine.load(exported.bundle, backend="onnxruntime", attention="sparse", cache_dir=cache)
    assert files[0].stat().st_mtime_ns == stamp  # reused, not re-exported
    assert first._runner.attention == second._runner.attention == "sparse"
    ones, zeros = torch.ones(3, exported.model.steer_width), torch.zeros(3, exported.model.steer_width)
    pixels, expected = pixels_away_from_threshold(exported.model, 3, ones, zeros, seed=5)
    got = second.predict(pixels)
    assert_parity((got.logits, got.head_mask), expected.logits, expected.head_mask)
    assert not any(p.name.startswith(".") for p in exported.bundle.iterdir())  # nothing written into the bundle


def test_sparse_with_no_kept_heads_and_all_kept_heads():
    """P = 0 pairs in one block and P = B*H in the other: the data-dependent graph's edge cases."""
    from headsteer.export import make_ort_callable

    model = make_model(seed=3)
    with torch.no_grad():
        model.gates["1"].fc2.bias.fill_(-50.0)  # block 1 prunes every head
        model.gates["2"].fc2.bias.fill_(50.0)  # block 2 keeps every head
    run = make_ort_callable(model, attention="sparse")
    for batch in (1, 4):
        pixels = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            expected = model(pixels, backend="compact")
        assert not expected.head_mask[:, 0].any() and expected.head_mask[:, 1].all()
        assert_parity(run(pixels), expected.logits, expected.head_mask)


def test_other_architecture_options():
    """No class token (mean-pooled decision vector), registers, q/k norm, ReLU SAE, reconstruct
    mode. Sparse only: the masked variant's attention is `reference.head_attention` itself, and the
    gate code is shared by both variants."""
    variant = "sparse"
    from headsteer.export import make_ort_callable

    model = make_model(
        seed=4,
        timm_kwargs=dict(
            img_size=32, patch_size=8, depth=2, num_classes=5, class_token=False, global_pool="avg",
            reg_tokens=2, qk_norm=True, no_embed_class=True,
        ),
        gate_blocks="all",
        sae_blocks=(1,),
        sae_activation="relu",
        steer_mode="reconstruct",
    )
    run = make_ort_callable(model, attention=variant)
    generator = torch.Generator().manual_seed(9)
    scale = 1.0 + torch.rand(3, model.steer_width, generator=generator)
    shift = 0.1 * torch.randn(3, model.steer_width, generator=generator)
    pixels, expected = pixels_away_from_threshold(model, 3, scale, shift, seed=13)
    assert_parity(run(pixels, scale, shift), expected.logits, expected.head_mask)


@pytest.mark.parametrize(
    "pixels,scale,match",
    [
        (torch.randn(3, 32, 32), None, r"pixel_values must be \[batch, 3, 32, 32\], got shape \[3, 32, 32\]"),
        (torch.randn(2, 3, 30, 32), None, r"pixel_values must be \[batch, 3, 32, 32\], got shape \[2, 3, 30, 32\]"),
        (torch.randn(2, 1, 32, 32), None, r"pixel_values must be \[batch, 3, 32, 32\]"),
        (torch.ones(2, 3, 32, 32, dtype=torch.int64), None, "pixel_values must be floating point, got torch.int64"),
        (torch.randn(2, 3, 32, 32), torch.ones(2, 128, dtype=torch.int32), "steer_scale must be floating point"),
        (torch.randn(2, 3, 32, 32), torch.ones(128), r"steer_scale must be \[batch, 128\], got shape \[128\]"),
        (torch.randn(2, 3, 32, 32), torch.ones(2, 64), r"steer_scale must be \[batch, 128\], got shape \[2, 64\]"),
        (torch.randn(2, 3, 32, 32), torch.ones(3, 128), r"steer_scale must be \[B, S_total\] = \[2, 128\]"),
    ],
)
def test_malformed_inputs_fail_before_onnxruntime_runs(sessions, monkeypatch, pixels, scale, match):
    """The callable the bench harness builds directly checks what Engine would have checked."""
    from headsteer.runtime.errors import InputError

    run = sessions["masked"]

    def no_run(*args, **kwargs):
        raise AssertionError("onnxruntime ran on a malformed input")

    monkeypatch.setattr(run.session, "run", no_run)
    with pytest.raises(InputError, match=match):
        run(pixels, scale)


def test_half_precision_model_exports_the_float32_contract():
    """A bf16 GatedViT exports as the contract's float32 graph (its weights widened exactly), and
    the original model is left as it was; a reduced-precision export of it keeps the SAEs and
    gates in fp32."""
    from headsteer.export import make_ort_callable
    from headsteer.export.onnx_model import ExportableGatedViT

    half = make_model(seed=6).to(torch.bfloat16)
    widened = make_model(seed=6).to(torch.bfloat16).float()
    run = make_ort_callable(half, attention="masked")
    ones, zeros = torch.ones(3, half.steer_width), torch.zeros(3, half.steer_width)
    pixels, expected = pixels_away_from_threshold(widened, 3, ones, zeros, seed=17)
    assert_parity(run(pixels), expected.logits, expected.head_mask)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    wrapper = ExportableGatedViT(half, "masked", torch.float16)
    deciding = [p.dtype for name, p in wrapper.model.named_parameters() if name.startswith(("gates.", "saes."))]
    assert deciding and set(deciding) == {torch.float32}
    assert wrapper.model.vit.blocks[0].attn.qkv.weight.dtype == torch.float16


@pytest.mark.parametrize("bad", ["pixel_values", "steer_scale", "steer_shift"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e300])
def test_non_finite_inputs_fail_before_onnxruntime_runs(sessions, monkeypatch, bad, value):
    """NaN/inf pixels or steering ran silently (NaN logits, every head pruned); Engine refuses
    them, and so does the callable the bench harness builds directly. A float64 value past
    float32's range is inf as fed."""
    from headsteer.runtime.errors import InputError

    run = sessions["masked"]
    monkeypatch.setattr(run.session, "run", lambda *args, **kwargs: pytest.fail("onnxruntime ran on a non-finite input"))
    inputs = dict(pixel_values=torch.randn(2, 3, 32, 32), steer_scale=torch.ones(2, 128), steer_shift=torch.zeros(2, 128))
    inputs = {name: tensor.double() for name, tensor in inputs.items()}
    inputs[bad][1, 0] = value
    with pytest.raises(InputError, match=f"{bad} holds NaN or infinite values"):
        run(inputs["pixel_values"], inputs["steer_scale"], inputs["steer_shift"])


def test_cache_tells_apart_bundles_that_share_weights(exported, tmp_path):
    """Two bundles of the same weights that differ in a setting outside the weights (steer_mode
    here; sae_k, the activation, class names are alike) are two graphs: the cache keyed them by
    the weight checksums alone and ran the first bundle's graph for the second."""
    from headsteer.runtime.bundle import save_bundle

    cache = tmp_path / "cache"
    model = make_model()
    preserve = save_bundle(model, tmp_path / "preserve", class_names=CLASS_NAMES)
    model.steer_mode = "reconstruct"
    reconstruct = save_bundle(model, tmp_path / "reconstruct", class_names=CLASS_NAMES)
    Engine.load(preserve, backend="onnxruntime", cache_dir=cache)
    engine = Engine.load(reconstruct, backend="onnxruntime", cache_dir=cache)
    assert len(list(cache.glob("*.onnx"))) == 2
    assert engine._runner.metadata["steer_mode"] == "reconstruct"
    ones, zeros = torch.ones(3, model.steer_width), torch.zeros(3, model.steer_width)
    pixels, expected = pixels_away_from_threshold(model, 3, ones, zeros, seed=21)
    got = engine.predict(pixels)
    assert_parity((got.logits, got.head_mask), expected.logits, expected.head_mask)


def test_jumprelu_sae_drops_latents_below_their_threshold():
    """JumpReLU keeps a latent only above its own threshold (ReLU would keep every positive one)."""
    from headsteer.export import make_ort_callable

    model = make_model(seed=8, sae_activation="jumprelu")
    with torch.no_grad():
        for sae in model.saes.values():
            sae.threshold.uniform_(0.0, 2.0)
    run = make_ort_callable(model, attention="masked")
    generator = torch.Generator().manual_seed(10)
    scale = 1.0 + 4.0 * torch.rand(16, model.steer_width, generator=generator)
    shift = torch.randn(16, model.steer_width, generator=generator)
    pixels, expected = pixels_away_from_threshold(model, 16, scale, shift, seed=19)
    assert_parity(run(pixels, scale, shift), expected.logits, expected.head_mask)
    for sae in model.saes.values():
        sae.activation = "relu"
    with torch.no_grad():
        relu = model(pixels, scale, shift, backend="compact")
    assert not torch.equal(relu.head_mask, expected.head_mask)  # (not vacuous: the thresholds decide some heads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_gate_logit_of_exactly_zero_prunes_the_head(variant):
    """keep = gate logit > 0: a logit of exactly 0 (zero output layer) prunes every head."""
    from headsteer.export import make_ort_callable

    model = make_model(seed=12)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.fc2.weight.zero_()
            gate.fc2.bias.zero_()
    logits, mask = make_ort_callable(model, attention=variant)(torch.randn(2, 3, 32, 32))
    assert mask.shape == (2, 2, 3) and not mask.any()


def test_an_ungated_model_gives_an_empty_head_mask_per_sample():
    from headsteer.export import make_ort_callable

    model = make_model(seed=14, gate_blocks=(), sae_blocks=())
    logits, mask = make_ort_callable(model)(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, len(CLASS_NAMES)) and mask.shape == (3, 0, model.num_heads)


def test_a_reduced_precision_export_leaves_the_callers_model_in_float32(tmp_path):
    from headsteer.export import to_onnx

    model = make_model(seed=15)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    to_onnx(model, tmp_path / "half.onnx", precision="fp16", write_steering=False)
    after = model.state_dict()
    assert all(after[name].dtype == value.dtype and torch.equal(after[name], value) for name, value in before.items())


@pytest.mark.parametrize("bias", [-1.0, 1.0])
def test_topk_sae_under_strong_steering(bias):
    """Steering 10x in reconstruct mode makes the gates read the TopK latents' values directly:
    each of the k chosen latents (all positive with bias +1), and only their positive part (ReLU;
    many of the k largest are negative with bias -1), decides heads here."""
    from headsteer.export import make_ort_callable

    model = make_model(seed=16, steer_mode="reconstruct")
    with torch.no_grad():
        for sae in model.saes.values():
            sae.encoder_bias.add_(bias)
    run = make_ort_callable(model, attention="masked")
    generator = torch.Generator().manual_seed(16)
    scale = 10.0 * torch.rand(16, model.steer_width, generator=generator)
    shift = torch.zeros(16, model.steer_width)
    pixels, expected = pixels_away_from_threshold(model, 16, scale, shift, seed=23)
    assert_parity(run(pixels, scale, shift), expected.logits, expected.head_mask)


def test_sparse_export_of_a_model_without_qkv_bias():
    from headsteer.export import make_ort_callable

    model = make_model(seed=18, timm_kwargs=dict(img_size=32, patch_size=8, depth=3, num_classes=5, qkv_bias=False))
    assert model.vit.blocks[1].attn.qkv.bias is None
    run = make_ort_callable(model, attention="sparse")
    ones, zeros = torch.ones(3, model.steer_width), torch.zeros(3, model.steer_width)
    pixels, expected = pixels_away_from_threshold(model, 3, ones, zeros, seed=25)
    assert_parity(run(pixels), expected.logits, expected.head_mask)

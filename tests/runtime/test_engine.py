"""Engine: preprocessing, steering lookup, validation before work, thread safety."""
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from headsteer.runtime import GatedViT, InputError
from headsteer.runtime.bundle import SteeringTable, save_bundle
from headsteer.runtime.engine import Engine
from tests.conftest import tiny_vit_kwargs

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    torch.manual_seed(0)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=4), gate_init_bias=0.0, sae_width=24, sae_k=3)
    with torch.no_grad():  # O(1) gate logits: head sets differ from sample to sample
        for gate in model.gates.values():
            gate.fc2.weight.mul_(20)
    names = ["ant", "bee", "cat", "dog"]
    steering = SteeringTable(names, torch.rand(4, model.steer_width) * 4, torch.randn(4, model.steer_width) * 2)
    return save_bundle(model, tmp_path_factory.mktemp("engine") / "bundle", class_names=names, steering=steering, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def engine(bundle_path):
    return Engine.load(bundle_path, backend="auto")


def test_auto_backend_on_cpu_is_compact(engine):
    assert engine.backend == "compact"


def test_predict_matches_model_and_steering_rows(engine):
    pixels = torch.randn(6, 3, 32, 32)
    table = engine.info.steering
    targets = ["cat", None, 1, "dog", None, "ant"]
    result = engine.predict(pixels, steer=targets)
    with torch.no_grad():
        scale, shift = table.rows(targets)
        expected = engine.model(pixels, scale, shift, backend="reference")
    torch.testing.assert_close(result.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.head_mask, expected.head_mask)
    # The compact path's per-sample grouping is exercised: head sets differ within the batch.
    assert len({tuple(row.flatten().tolist()) for row in result.head_mask}) > 1
    assert 0 < float(result.head_usage.mean()) < 1
    assert result.labels.tolist() == expected.logits.argmax(-1).tolist()
    assert result.class_names == [engine.class_names[i] for i in result.labels.tolist()]
    assert result.head_usage.shape == (6,) and result.block_usage.shape == (6, 2)
    same = engine.predict(pixels, steer="dog")
    by_index = engine.predict(pixels, steer=3)
    assert torch.equal(same.logits, by_index.logits)


def test_raw_images_are_resized_and_normalized(engine):
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    gray = np.random.default_rng(1).integers(0, 256, size=(32, 32), dtype=np.uint8)
    result = engine.predict([Image.fromarray(rgb), gray])
    pixels = engine.preprocess([rgb, gray])
    assert pixels.shape == (2, 3, 32, 32)
    expected_gray = (torch.from_numpy(gray).float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(pixels[1], expected_gray)
    torch.testing.assert_close(result.logits, engine.predict(pixels).logits)


@pytest.mark.parametrize(
    "images,kwargs,match",
    [
        (torch.randn(2, 3, 30, 32), {}, r"\[30, 32\] pixels; expected \[B, 3, 32, 32\]"),
        (torch.randn(2, 1, 32, 32), {}, "1 channels"),
        (torch.randn(3, 32, 32), {}, "must be"),
        (torch.ones(2, 3, 32, 32, dtype=torch.int64), {}, "floating point"),
        (torch.full((1, 3, 32, 32), float("nan")), {}, "NaN or infinite"),
        # (float64 past float32's range: infinite once cast for the model)
        (torch.full((1, 3, 32, 32), 1e300, dtype=torch.float64), {}, "NaN or infinite"),
        (torch.randn(2, 3, 32, 32), dict(steer_shift=torch.full((24,), -1e300, dtype=torch.float64)), "steer_shift holds NaN"),
        (torch.randn(2, 3, 32, 32), dict(steer="cow"), "unknown steering class 'cow'"),
        (torch.randn(2, 3, 32, 32), dict(steer=["ant"]), "1 steering targets for a batch of 2"),
        (torch.randn(2, 3, 32, 32), dict(steer=7), "out of range"),
        # (a negative index is not read from the end of the class list, as Python would)
        (torch.randn(2, 3, 32, 32), dict(steer=-1), r"steering class index -1 out of range \[0, 4\)"),
        (torch.randn(2, 3, 32, 32), dict(steer_scale=[1.0] * 24), r"steer_scale must be a float tensor \[B, 24\]"),
        ([], {}, "no images given"),
        (torch.empty(0, 3, 32, 32), {}, "empty batch"),
        (torch.randn(2, 3, 32, 32), dict(budget=2), "budget"),
        (np.zeros((8, 8, 3), dtype=np.float32), {}, "must be uint8"),
        ([np.zeros((8, 8, 5), dtype=np.uint8)], {}, "expected HxW"),
        ("cat.png", {}, "expected a PIL image"),
        # convert("RGB") would clip these to 8 bits: a 16-bit PNG turns near-white, a float image black
        (Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)), {}, "more than 8 bits per channel"),
        ([Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))], {}, "image 0 .*more than 8 bits"),
    ],
)
def test_bad_requests_fail_before_any_work(engine, monkeypatch, images, kwargs, match):
    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran on a bad request")

    monkeypatch.setattr(engine.model, "forward", no_forward)
    with pytest.raises(InputError, match=match):
        engine.predict(images, **kwargs)


@pytest.mark.parametrize("device,match", [("meta", "unknown device 'meta'"), ("mps", "unknown device 'mps'"),
                                          ("cuda:1", "cuda:1 was asked for but torch sees 1 CUDA device")])
def test_devices_other_than_cpu_and_present_gpus_fail_at_load(bundle_path, monkeypatch, device, match):
    """Checked before the bundle loads: a meta or mps device, or a GPU index past the last GPU,
    used to fail with a torch traceback inside the first forward (or the weights' transfer)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the count decides cuda:1
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr("headsteer.runtime.engine.load_bundle", lambda *a, **k: pytest.fail("the bundle loaded"))
    with pytest.raises(InputError, match=match):
        Engine.load(bundle_path, device=device)


def test_unknown_backend_and_missing_steering_table(bundle_path, tmp_path):
    with pytest.raises(InputError, match="unknown backend"):
        Engine.load(bundle_path, backend="warp-drive")
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=4))
    plain = Engine.load(save_bundle(model, tmp_path / "plain"))
    with pytest.raises(InputError, match="no steering table"):
        plain.predict(torch.randn(1, 3, 32, 32), steer="ant")
    pixels = torch.randn(2, 3, 32, 32)  # a per-sample list of no targets is no steering, table or not
    assert torch.equal(plain.predict(pixels, steer=[None, None]).logits, plain.predict(pixels).logits)


def test_concurrent_predictions_equal_sequential_ones(engine):
    torch.manual_seed(1)
    requests = [(torch.randn(int(b), 3, 32, 32), steer) for b, steer in zip(torch.randint(1, 6, (12,)), ["ant", None, "dog", 2] * 3)]
    expected = [engine.predict(pixels, steer=steer) for pixels, steer in requests]
    results, errors = [None] * len(requests), []

    def worker(index):
        try:
            for _ in range(3):
                results[index] = engine.predict(*requests[index][:1], steer=requests[index][1])
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, want in zip(results, expected):
        torch.testing.assert_close(got.logits, want.logits, atol=1e-6, rtol=1e-6)
        assert torch.equal(got.head_mask, want.head_mask)


def test_raw_steering_vectors_equal_table_rows(engine):
    pixels = torch.randn(3, 3, 32, 32)
    table = engine.info.steering
    by_name = engine.predict(pixels, steer="bee")
    by_vector = engine.predict(pixels, steer_scale=table.scale[1], steer_shift=table.shift[1])
    assert torch.equal(by_name.logits, by_vector.logits) and torch.equal(by_name.head_mask, by_vector.head_mask)
    only_scale = engine.predict(pixels, steer_scale=torch.ones(3, engine.steer_width))
    assert torch.equal(only_scale.logits, engine.predict(pixels).logits)
    with pytest.raises(InputError, match="not both"):
        engine.predict(pixels, steer="bee", steer_scale=table.scale[1])
    with pytest.raises(InputError, match=r"steer_shift must be \[3, 24\]"):
        engine.predict(pixels, steer_shift=torch.zeros(2, 24))
    with pytest.raises(InputError, match="NaN"):
        engine.predict(pixels, steer_scale=torch.full((24,), float("inf")))


def test_half_precision_engine_close_to_float32(bundle_path):
    full = Engine.load(bundle_path, backend="compact")
    half = Engine.load(bundle_path, backend="compact", dtype="bfloat16")
    pixels = torch.randn(4, 3, 32, 32)
    assert half.model.vit.patch_embed.proj.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half.predict(pixels, budget=1.0).logits, full.predict(pixels, budget=1.0).logits, atol=0.1, rtol=0.1)
    with pytest.raises(InputError, match="dtype"):
        Engine.load(bundle_path, dtype="int8")


@pytest.mark.parametrize("dtype,too_large,largest", [("float16", 65520.0, 65504.0), ("bfloat16", 3.4e38, 3.38e38)])
def test_pixels_past_the_engines_dtype_range_are_refused_before_the_forward(bundle_path, monkeypatch, dtype, too_large, largest):
    """Finite as float32 but infinite once cast to the engine's dtype (float16 rounds 65520 up to
    inf): the forward would return NaN logits and an arbitrary label. A value that stays finite in
    the dtype is the model's input, not refused (whatever its layers then make of it)."""
    engine = Engine.load(bundle_path, backend="reference", dtype=dtype)
    pixels = torch.randn(2, 3, 32, 32)
    assert engine.predict(pixels.index_fill(3, torch.tensor([5]), largest)).logits.shape == (2, 4)
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    limit = f"{torch.finfo(getattr(torch, dtype)).max:.6g}"
    with pytest.raises(InputError, match=re.escape(f"beyond {dtype}'s range (|x| > {limit})")):
        engine.predict(pixels.index_fill(3, torch.tensor([5]), -too_large))


@pytest.mark.parametrize("backend,dtype", [("compact", "bfloat16"), ("reference", "float16")])
def test_half_precision_engine_steers(bundle_path, backend, dtype):
    """Steering rows are float32 whatever the model's dtype; a bf16/fp16 engine steers with them
    (it used to fail in the SAE decode's matmul on mixed dtypes)."""
    full = Engine.load(bundle_path, backend=backend)
    half = Engine.load(bundle_path, backend=backend, dtype=dtype)
    pixels = torch.randn(4, 3, 32, 32)
    for request in (dict(steer="cat"), dict(steer=["dog", None, "ant", 1]), dict(steer_scale=torch.rand(24) * 2)):
        got, expected = half.predict(pixels, **request), full.predict(pixels, **request)
        torch.testing.assert_close(got.logits, expected.logits, atol=0.1, rtol=0.1)
        assert (got.head_mask == expected.head_mask).float().mean() > 0.9  # (near-threshold gates may flip)


def test_per_sample_targets_as_a_tensor_or_array(engine):
    """`steer=labels` (a 1-D integer tensor or array) means one target per sample, as a list does."""
    pixels = torch.randn(3, 3, 32, 32)
    expected = engine.predict(pixels, steer=[2, 0, 3]).logits
    for targets in (torch.tensor([2, 0, 3]), np.array([2, 0, 3])):
        assert torch.equal(engine.predict(pixels, steer=targets).logits, expected)
    assert torch.equal(engine.predict(pixels, steer=torch.tensor(2)).logits, engine.predict(pixels, steer=2).logits)
    # a 0-d tensor or array is one target for every sample, read as its Python scalar: a float or a
    # bool is refused as the scalar is (a 0-d float was a bare TypeError, a 0-d bool steered class 1)
    assert torch.equal(engine.predict(pixels, steer=np.array("dog")).logits, engine.predict(pixels, steer="dog").logits)
    for target in (torch.tensor(2.0), np.array(2.0), torch.tensor(True)):
        with pytest.raises(InputError, match="a steering target is a class name or index"):
            engine.predict(pixels, steer=target)
    with pytest.raises(InputError, match="must be 1-D"):
        engine.predict(pixels, steer=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(InputError, match="2 steering targets for a batch of 3"):
        engine.predict(pixels, steer=np.array([1, 2]))


def test_torch_backend_options_refused_before_loading(bundle_path, monkeypatch):
    import headsteer.runtime.engine as engine_module

    def no_load(*args, **kwargs):
        raise AssertionError("the bundle was loaded before the options were checked")

    monkeypatch.setattr(engine_module, "load_bundle", no_load)
    with pytest.raises(InputError, match="backend 'compact' takes no options"):
        Engine.load(bundle_path, backend="compact", providers=["CPUExecutionProvider"])
    # an exported model's precision is fixed at export: a 16-bit dtype is refused before the bundle loads
    with pytest.raises(InputError, match="backend 'onnxruntime' runs an exported model; choose its precision"):
        Engine.load(bundle_path, backend="onnxruntime", dtype="float16")


def test_cuda_graphs_need_the_triton_backend_on_cuda(bundle_path):
    with pytest.raises(InputError, match="cuda_graphs needs backend 'triton'"):
        Engine.load(bundle_path, backend="compact", cuda_graphs=True)


def test_more_bad_requests_are_clear_errors(bundle_path, engine, monkeypatch):
    with pytest.raises(InputError, match="unknown device 'foo'"):
        Engine.load(bundle_path, device="foo")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="backend 'triton' needs a CUDA device"):
        Engine.load(bundle_path, backend="triton")
    pixels = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match="budget"):
        engine.predict(pixels, budget=True)
    # numpy scalars are numbers too (one from a float32 array was refused as "not a number in [0, 1]")
    for budget, same in ((np.float32(0.5), 0.5), (np.int64(1), 1.0)):
        assert torch.equal(engine.predict(pixels, budget=budget).head_mask, engine.predict(pixels, budget=same).head_mask)
    with pytest.raises(InputError, match="budget"):
        engine.predict(pixels, budget=np.float32(1.5))
    with pytest.raises(InputError, match="expected HxW"):
        engine.predict([np.zeros((0, 8, 3), dtype=np.uint8)])
    assert torch.equal(engine.predict(pixels, steer=np.int64(1)).logits, engine.predict(pixels, steer="bee").logits)


@pytest.mark.parametrize(
    "backend,options,accepted",
    [("onnxruntime", dict(engine_path="model.plan"), "onnx_path"), ("tensorrt", dict(onnx_path="model.onnx", threads=2), "engine_path")],
)
def test_options_a_runner_does_not_take_are_clear_errors(bundle_path, backend, options, accepted):
    with pytest.raises(InputError, match=rf"backend '{backend}' does not take the option\(s\) \[.*'{sorted(options)[0]}'.*{accepted}"):
        Engine.load(bundle_path, backend=backend, **options)


def test_a_steering_index_is_a_class_of_the_bundle_not_a_table_row(tmp_path):
    """A table may list its rows in another order, or only some classes: steer=2 means the
    bundle's class 2 ("cat") wherever its row is, and a class without a row is refused."""
    torch.manual_seed(1)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=4), gate_init_bias=0.0, sae_width=24, sae_k=3)
    names = ["ant", "bee", "cat", "dog"]
    rows = ["dog", "cat", "ant"]  # reordered, and no row for "bee"
    steering = SteeringTable(rows, torch.rand(3, model.steer_width) * 4, torch.randn(3, model.steer_width) * 2)
    engine = Engine.load(save_bundle(model, tmp_path / "b", class_names=names, steering=steering), backend="compact")
    pixels = torch.randn(3, 3, 32, 32)
    by_name = engine.predict(pixels, steer=["cat", "dog", "ant"]).logits
    assert torch.equal(engine.predict(pixels, steer=[2, 3, 0]).logits, by_name)
    assert torch.equal(engine.predict(pixels, steer=torch.tensor([2, 3, 0])).logits, by_name)
    with pytest.raises(InputError, match=r"class 'bee' has no row in the steering table \(rows: dog, cat, ant\)"):
        engine.predict(pixels, steer=1)
    with pytest.raises(InputError, match=r"steering class index 4 out of range \[0, 4\)"):
        engine.predict(pixels, steer=4)


def test_auto_backend_picks_triton_only_for_16bit_on_cuda(monkeypatch):
    """"auto": triton on CUDA in fp16/bf16, compact for fp32 on CUDA and on the CPU, compact when
    triton cannot be imported; a named backend is kept as given. (Decided from the device and dtype
    alone, so this runs without a GPU.)"""
    import sys

    from headsteer.runtime.engine import resolve_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setitem(sys.modules, "triton", type(sys)("triton"))
    assert resolve_backend("auto", cuda, torch.float16) == "triton"
    assert resolve_backend("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_backend("auto", cuda, torch.float32) == "compact"
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert resolve_backend("auto", cpu, dtype) == "compact"
    for named in ("reference", "compact", "triton", "onnxruntime", "tensorrt"):
        assert resolve_backend(named, cpu, torch.float32) == named
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError
    assert resolve_backend("auto", cuda, torch.float16) == "compact"


def test_flipped_and_channel_reversed_arrays_are_read_like_their_copies(engine):
    """A uint8 array with a negative stride (OpenCV's BGR -> RGB `image[..., ::-1]`, np.fliplr, a
    batch flipped as one array) reads like its copy; torch.tensor refused it with a bare ValueError."""
    batch = np.random.default_rng(3).integers(0, 256, size=(2, 20, 24, 3), dtype=np.uint8)
    for view in (batch[0, :, :, ::-1], batch[0, :, ::-1], batch[:, ::-1], [batch[1, ::-1, :, 0]]):
        copy = [np.array(image) for image in view] if isinstance(view, list) else view.copy()
        assert torch.equal(engine.preprocess(view), engine.preprocess(copy))


@pytest.mark.parametrize("kwargs,match", [(dict(budget=2), "budget must be"), (dict(steer="ant", steer_shift=torch.zeros(24)), "not both")])
def test_request_options_are_checked_before_preprocessing(engine, monkeypatch, kwargs, match):
    """A bad budget or conflicting steering is refused before the images are resized and scanned."""
    monkeypatch.setattr(engine, "preprocess", lambda images: pytest.fail("the images were preprocessed"))
    with pytest.raises(InputError, match=match):
        engine.predict([np.zeros((64, 64, 3), dtype=np.uint8)], **kwargs)


def test_cuda_without_a_gpu_fails_at_load(bundle_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("headsteer.runtime.engine.load_bundle", lambda *a, **k: pytest.fail("the bundle loaded"))
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(InputError, match="device 'cuda' was asked for but torch sees no CUDA device"):
            Engine.load(bundle_path, device=device)


def test_input_errors_are_value_errors(engine):
    """InputError subclasses ValueError: a service that catches ValueError for bad requests still does."""
    with pytest.raises(ValueError, match="empty batch"):
        engine.predict(torch.empty(0, 3, 32, 32))


def test_a_one_channel_bundle_reads_pil_images_as_grayscale(tmp_path):
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=2, in_chans=1))
    engine = Engine.load(save_bundle(model, tmp_path / "gray", mean=(0.5,), std=(0.25,)), backend="compact")
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
    gray = np.array(image.convert("L"))
    pixels = engine.preprocess([image])
    assert pixels.shape == (1, 1, 32, 32)
    torch.testing.assert_close(pixels[0, 0], (torch.from_numpy(gray).float() / 255 - 0.5) / 0.25)
    assert engine.predict([image, gray]).logits.shape == (2, 2)


def test_raw_images_are_shrunk_as_the_training_data_is(engine):
    """A large raw image is resized as headsteer's data pipeline resizes (bilinear, antialiased), so
    the model serves the pictures it was trained on (without antialiasing a shrunk image aliases)."""
    from headsteer.runtime.data import _resize

    rgb = np.random.default_rng(5).integers(0, 256, size=(96, 80, 3), dtype=np.uint8)
    expected = engine.normalize(_resize(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, (32, 32)))
    torch.testing.assert_close(engine.preprocess([rgb]), expected)


def test_an_exported_model_gets_both_steering_vectors_and_no_budget(engine):
    """A runner (ONNX Runtime, TensorRT) takes steer_scale and steer_shift as inputs: a missing one is
    sent as identity; a head budget is not an input of an exported model and is refused before it runs."""
    calls = []

    def runner(pixels, scale, shift):
        calls.append((scale, shift))
        return torch.zeros(len(pixels), 4), torch.ones(len(pixels), 2, 3, dtype=torch.bool)

    exported = Engine(engine.model, engine.info, "onnxruntime", torch.device("cpu"), runner=runner)
    with pytest.raises(InputError, match="backend 'onnxruntime' runs an exported model; a head budget is not an input"):
        exported.predict(torch.randn(2, 3, 32, 32), budget=0.5)
    assert calls == []
    exported.predict(torch.randn(2, 3, 32, 32), steer_scale=torch.full((24,), 2.0))
    assert torch.equal(calls[-1][0], torch.full((2, 24), 2.0)) and torch.equal(calls[-1][1], torch.zeros(2, 24))
    exported.predict(torch.randn(2, 3, 32, 32), steer_shift=torch.full((24,), 0.5))
    assert torch.equal(calls[-1][0], torch.ones(2, 24)) and torch.equal(calls[-1][1], torch.full((2, 24), 0.5))


def test_auto_backend_in_engine_load_follows_the_dtype_asked_for(bundle_path, monkeypatch):
    """Engine.load hands its dtype to the "auto" choice: float16 on CUDA asks for triton, float32
    for compact. (Decided before the bundle loads, so no GPU is needed to see which.)"""
    import sys

    import headsteer.kernels.dispatch as dispatch

    class Loaded(Exception):
        pass

    def load_bundle(path, map_location):
        raise Loaded(str(map_location))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "triton", type(sys)("triton"))
    monkeypatch.setattr(dispatch, "triton_available", lambda device: False)
    monkeypatch.setattr("headsteer.runtime.engine.load_bundle", load_bundle)
    with pytest.raises(InputError, match="backend 'triton' needs a CUDA device"):
        Engine.load(bundle_path, device="cuda", dtype="float16")
    with pytest.raises(Loaded, match="cuda"):  # compact: straight on to loading the bundle
        Engine.load(bundle_path, device="cuda", dtype="float32")


def test_load_builds_the_compact_weight_cache_before_any_request(bundle_path):
    """Requests from several threads share nothing mutable because load runs one forward first:
    the compact backend's head-major weight copies exist before the first request arrives."""
    from headsteer.kernels.dispatch import _HEAD_MAJOR_CACHE

    engine = Engine.load(bundle_path, backend="compact")
    attentions = [block.attn for block in engine.model.vit.blocks]
    assert attentions and all(attn in _HEAD_MAJOR_CACHE for attn in attentions)


def test_per_sample_targets_given_as_scalars_are_read_as_their_values(engine):
    """A list of 0-d tensors (as from iterating a label tensor) reads each as its Python value: an
    integer one is a class index; a bool or a float one is refused as True or 2.0 are (a bool one
    steered class 1, a float one was a bare TypeError from operator.index)."""
    pixels = torch.randn(2, 3, 32, 32)
    expected = engine.predict(pixels, steer=[2, 0]).logits
    assert torch.equal(engine.predict(pixels, steer=list(torch.tensor([2, 0]))).logits, expected)
    for target in (torch.tensor(True), torch.tensor(2.0), np.float32(2.0), np.array(True)):
        with pytest.raises(InputError, match="a steering target is a class name or index"):
            engine.predict(pixels, steer=[target, None])

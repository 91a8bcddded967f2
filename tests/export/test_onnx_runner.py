"""ONNX Runtime session options (thread spinning) and the I/O-binding path of `OrtCallable`:
checked on the CPU provider here; the CUDA device-memory path only where a GPU and
onnxruntime-gpu are present."""
from __future__ import annotations

import onnxruntime as ort
import pytest
import torch

from headsteer.export.onnx_runner import NO_SPINNING, OrtCallable, build_session
from headsteer.runtime.engine import Engine

CPU = ["CPUExecutionProvider"]


def _config_entry(session, key):
    """A session config entry as ORT holds it, or None where ORT's default applies."""
    try:
        return session.get_session_options().get_session_config_entry(key)
    except RuntimeError:  # (ORT raises for a key that was never set)
        return None


def test_spinning_is_ort_default_unless_turned_off(exported):
    default = build_session(exported.onnx["masked"], CPU)
    quiet = build_session(exported.onnx["masked"], CPU, allow_spinning=False)
    for key in NO_SPINNING:
        assert _config_entry(default, key) is None
        assert _config_entry(quiet, key) == "0"


def test_engine_passes_allow_spinning_to_its_runner(exported):
    engine = Engine.load(exported.bundle, backend="onnxruntime", onnx_path=exported.onnx["masked"], allow_spinning=False)
    assert all(_config_entry(engine._runner.session, key) == "0" for key in NO_SPINNING)


def _inputs(model, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, *model.image_size, generator=generator)
    scale = 1.0 + torch.rand(batch, model.steer_width, generator=generator)
    shift = 0.1 * torch.randn(batch, model.steer_width, generator=generator)
    return pixels, scale, shift


@pytest.mark.parametrize("variant", ["masked", "sparse"])
def test_bound_run_equals_the_host_run(exported, variant):
    """`run_bound` (I/O binding on the inputs' memory, outputs written in place) gives exactly
    what `session.run` gives; on the CPU provider, since this machine may have no GPU."""
    run = OrtCallable(build_session(exported.onnx[variant], CPU), exported.model.steer_width)
    pixels, scale, shift = _inputs(exported.model)
    logits, mask = run(pixels, scale, shift)
    feeds = dict(pixel_values=pixels, steer_scale=scale, steer_shift=shift)
    bound_logits, bound_mask = run.run_bound(feeds, torch.device("cpu"))
    assert torch.equal(bound_logits, logits) and torch.equal(bound_mask, mask) and bound_mask.dtype == torch.bool
    assert not run.device_binding(pixels)  # CPU inputs and a CPU session take the host path


@pytest.mark.skipif(not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a CUDA GPU and onnxruntime-gpu (the device-memory I/O binding path)")
def test_cuda_inputs_stay_on_the_device(exported, monkeypatch):
    providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    run = OrtCallable(build_session(exported.onnx["masked"], providers), exported.model.steer_width)
    pixels, scale, shift = _inputs(exported.model)
    assert not run.device_binding(pixels)
    expected_logits, expected_mask = run(pixels, scale, shift)  # CPU inputs: the host path, same session
    monkeypatch.setattr(OrtCallable, "_host", staticmethod(lambda tensor: pytest.fail("copied to host")))
    cuda = [t.cuda() for t in (pixels, scale, shift)]
    assert run.device_binding(cuda[0])
    logits, mask = run(*cuda)
    assert logits.device.type == "cuda" and mask.device.type == "cuda"
    torch.testing.assert_close(logits.cpu(), expected_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask.cpu(), expected_mask)


def test_a_bf16_file_on_the_cpu_provider_is_a_clear_error(exported, tmp_path):
    """ORT's CPU provider has no bf16 kernel for some of the graph's ops: loading such a file names
    the file and its precision (and what to export instead) rather than only ORT's node."""
    from headsteer.export import to_onnx
    from headsteer.runtime.errors import InputError

    path = to_onnx(exported.bundle, tmp_path / "bf16.onnx", precision="bf16", write_steering=False)
    with pytest.raises(InputError, match=r"bf16\.onnx, exported with precision bf16: .*NOT_IMPLEMENTED.*--precision fp32"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=path)


def test_a_file_exported_from_other_weights_is_refused(exported, tmp_path):
    """A bundle of the same architecture, classes and steering width but other weights loaded
    another bundle's ONNX file and ran its weights, under this bundle's name. The file records
    the weights' checksum; the same weights with another steering table still load it."""
    from headsteer.runtime.bundle import save_bundle
    from headsteer.runtime.errors import BundleError

    from .conftest import CLASS_NAMES, make_model, make_steering

    other = make_model(seed=1)
    other_bundle = save_bundle(other, tmp_path / "other", class_names=CLASS_NAMES, steering=make_steering(other))
    with pytest.raises(BundleError, match=r"tiny_masked.onnx was exported from another model: its weights_sha256 is"):
        Engine.load(other_bundle, backend="onnxruntime", onnx_path=exported.onnx["masked"])
    same_weights = save_bundle(exported.model, tmp_path / "restreered", class_names=CLASS_NAMES,
                               steering=make_steering(exported.model, seed=2))
    Engine.load(same_weights, backend="onnxruntime", onnx_path=exported.onnx["sparse"])


def _with_metadata(exported, tmp_path, **changes):
    """A copy of the masked file whose headsteer metadata has `changes` (None: the key removed)."""
    import json

    import onnx

    proto = onnx.load(str(exported.onnx["masked"]))
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            props.pop("headsteer." + key)
        else:
            props["headsteer." + key] = json.dumps(value)
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    path = tmp_path / "edited.onnx"
    onnx.save(proto, str(path))
    return path


def test_a_file_without_headsteer_metadata_is_refused_as_such(exported, tmp_path):
    from headsteer.runtime.errors import BundleError

    path = _with_metadata(exported, tmp_path, **{key: None for key in (
        "format", "format_version", "class_names", "steer_width", "image_size", "gated_blocks")})
    with pytest.raises(BundleError, match="carries no headsteer metadata; export it with `headsteer export --format onnx`"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=path)


def test_a_file_gating_other_blocks_is_refused(exported, tmp_path):
    """Same number of gated blocks (head masks of the same shape), other blocks: another model."""
    from headsteer.runtime.errors import BundleError

    path = _with_metadata(exported, tmp_path, gated_blocks=[0, 2])
    with pytest.raises(BundleError, match=r"its gated_blocks is \[0, 2\], the bundle's is \[1, 2\]"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=path)


def test_the_runner_reports_the_attention_of_the_file_it_runs(exported):
    for variant in ("masked", "sparse"):
        engine = Engine.load(exported.bundle, backend="onnxruntime", onnx_path=exported.onnx[variant])
        assert engine._runner.attention == variant


def test_providers_must_name_at_least_one(exported):
    from headsteer.runtime.errors import InputError

    with pytest.raises(InputError, match="providers must name at least one ONNX Runtime execution provider"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=exported.onnx["masked"], providers=[])


def test_intra_op_threads_reach_the_session(exported):
    assert build_session(exported.onnx["masked"], CPU, intra_op_num_threads=1).get_session_options().intra_op_num_threads == 1


def test_default_providers_put_cuda_on_the_devices_gpu_first(monkeypatch):
    from headsteer.export.onnx_runner import default_providers
    from headsteer.export._common import MissingDependencyError

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert default_providers(torch.device("cuda", 1)) == [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]
    assert default_providers(torch.device("cpu")) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(MissingDependencyError, match="headsteer\\[gpu\\]"):
        default_providers(torch.device("cuda"))


def test_device_binding_only_for_pixels_on_the_sessions_gpu_and_static_outputs():
    """Which calls take the I/O-binding path, decided without a GPU: a stand-in session whose
    first provider is CUDA on GPU 1, and stand-in pixels that only carry a device."""
    from types import SimpleNamespace

    def session(head_mask_shape):
        value = lambda name, shape: SimpleNamespace(name=name, shape=shape)  # noqa: E731
        return SimpleNamespace(
            get_modelmeta=lambda: SimpleNamespace(custom_metadata_map={}),
            get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
            get_provider_options=lambda: {"CUDAExecutionProvider": {"device_id": "1"}},
            get_inputs=lambda: [value("pixel_values", ["batch", 3, 32, 32])],
            get_outputs=lambda: [value("logits", ["batch", 5]), value("head_mask", head_mask_shape)],
        )

    on = lambda device: SimpleNamespace(device=torch.device(device))  # noqa: E731
    run = OrtCallable(session(["batch", 2, 3]), 128)
    assert run.cuda_device_id == 1
    assert run.device_binding(on("cuda:1"))
    assert not run.device_binding(on("cuda:0")) and not run.device_binding(on("cpu"))
    assert not OrtCallable(session(["batch", "blocks", 3]), 128).device_binding(on("cuda:1"))


def test_an_export_on_the_fly_leaves_no_temporary_folder(exported, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    Engine.load(exported.bundle, backend="onnxruntime")
    assert list(tmp_path.iterdir()) == []


def test_the_cache_keeps_one_file_per_opset(exported, tmp_path):
    import onnx

    cache = tmp_path / "cache"
    for opset in (18, 20):
        Engine.load(exported.bundle, backend="onnxruntime", cache_dir=cache, opset=opset)
    versions = sorted(o.version for path in cache.glob("*.onnx") for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))
    assert versions == [18, 20]


def test_float64_and_float16_inputs_are_fed_as_float32(exported):
    run = OrtCallable(build_session(exported.onnx["masked"], CPU), exported.model.steer_width)
    pixels, scale, shift = _inputs(exported.model)
    logits, mask = run(pixels, scale, shift)
    wide_logits, wide_mask = run(pixels.double(), scale.double(), shift.double())
    assert torch.equal(wide_logits, logits) and torch.equal(wide_mask, mask)
    half = [t.half() for t in (pixels, scale, shift)]
    assert run(*half)[0].dtype == torch.float32

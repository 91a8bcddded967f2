"""Bundle round trip and the clear errors a damaged or foreign bundle must give."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from headsteer.runtime import BundleError, GatedViT, InputError
from headsteer.runtime.bundle import CONFIG_FILE, FORMAT_VERSION, WEIGHTS_FILE, SteeringTable, load_bundle, save_bundle
from tests.conftest import tiny_vit_kwargs


def _model(**kwargs):
    return GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(), gate_init_bias=0.0, sae_width=24, sae_k=3, **kwargs).eval()


def _steering(model, classes=7):
    names = [f"class{i}" for i in range(classes)]
    return SteeringTable(names, torch.rand(classes, model.steer_width) * 3, torch.randn(classes, model.steer_width), [{"alpha": 2.0}] * classes)


@pytest.fixture
def bundle(tmp_path):
    model = _model(sae_blocks="all")
    steering = _steering(model)
    path = save_bundle(model, tmp_path / "bundle", class_names=steering.class_names, steering=steering, mean=(0.5,) * 3, std=(0.25,) * 3)
    return model, steering, path


def test_round_trip_is_bit_identical(bundle):
    model, steering, path = bundle
    loaded, info = load_bundle(path)
    pixels = torch.randn(5, 3, 32, 32)
    scale, shift = steering.rows(["class1", None, 3, "class6", 0])
    with torch.no_grad():
        for backend in ("reference", "compact"):
            a = model(pixels, scale, shift, backend=backend)
            b = loaded(pixels, scale, shift, backend=backend)
            assert torch.equal(a.logits, b.logits) and torch.equal(a.head_mask, b.head_mask)
    assert info.class_names == steering.class_names and info.mean == (0.5,) * 3
    assert torch.equal(info.steering.scale, steering.scale) and info.steering.info == steering.info
    assert loaded.config() == model.config()


def test_save_leaves_no_temporary_files_and_refuses_to_clobber(bundle, tmp_path):
    model, _, path = bundle
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with pytest.raises(BundleError, match="already exists"):
        save_bundle(model, path)
    save_bundle(model, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import headsteer.runtime.bundle as bundle_module

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(bundle_module, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(_model(), tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG_FILE).read_text())
    config.update(changes)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    return config


def test_newer_format_version_is_refused(bundle):
    _, _, path = bundle
    _edit_config(path, format_version=FORMAT_VERSION + 1)
    with pytest.raises(BundleError, match="newer than this headsteer supports"):
        load_bundle(path)


def test_truncated_weights_are_detected(bundle):
    _, _, path = bundle
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(path)


def test_corrupt_json_and_missing_files(bundle, tmp_path):
    _, _, path = bundle
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nowhere")
    (path / "steering.safetensors").unlink()
    with pytest.raises(BundleError, match="steering.safetensors is missing"):
        load_bundle(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(path)


def _rewrite_weights(path, edit):
    state = load_file(path / WEIGHTS_FILE)
    edit(state)
    save_file(state, path / WEIGHTS_FILE)
    import hashlib

    config = json.loads((path / CONFIG_FILE).read_text())
    config["files"][WEIGHTS_FILE] = hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(config))


def test_missing_tensor_is_named(bundle):
    _, _, path = bundle
    _rewrite_weights(path, lambda state: state.pop("gates.1.fc2.bias"))
    with pytest.raises(BundleError, match=r"missing tensors \['gates.1.fc2.bias'\]"):
        load_bundle(path)


def test_shape_mismatch_is_named(bundle):
    _, _, path = bundle
    _rewrite_weights(path, lambda state: state.update({"saes.1.encoder_bias": torch.zeros(99)}))
    with pytest.raises(BundleError, match=r"saes.1.encoder_bias .* shape \[99\]; the model expects \[24\]"):
        load_bundle(path)


def test_config_mismatched_with_weights(bundle):
    _, _, path = bundle
    config = json.loads((path / CONFIG_FILE).read_text())
    config["model"]["sae_width"] = 30
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(BundleError, match="shape"):
        load_bundle(path)


def test_save_validates_before_writing(tmp_path):
    model = _model()
    with pytest.raises(InputError, match="class names"):
        save_bundle(model, tmp_path / "b", class_names=["a", "b"])
    with pytest.raises(InputError, match="steer_width"):
        save_bundle(model, tmp_path / "b", steering=SteeringTable(["a"], torch.ones(1, 3), torch.zeros(1, 3)))
    instance_model = GatedViT.from_timm(model.vit)
    with pytest.raises(BundleError, match="from_timm\\(name"):
        save_bundle(instance_model, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_steering_table_lookup_errors():
    table = SteeringTable(["cat", "dog"], torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(InputError, match="unknown steering class 'cow'.*cat, dog"):
        table.rows(["cow"])
    with pytest.raises(InputError, match="out of range"):
        table.rows([2])
    with pytest.raises(InputError, match="shape"):
        SteeringTable(["cat"], torch.ones(2, 4), torch.zeros(2, 4))


def test_bundle_gets_the_usual_folder_mode(bundle):
    import os

    _, _, path = bundle
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o777 & ~umask)

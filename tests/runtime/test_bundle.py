"""Bundle round trip and the clear errors a damaged or foreign bundle must give."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save, save_file

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


def _replace_weights_file(path, data: bytes):
    """Write `data` as the weights file and record its checksum, as a hand-made bundle would."""
    import hashlib

    (path / WEIGHTS_FILE).write_bytes(data)
    config = json.loads((path / CONFIG_FILE).read_text())
    config["files"][WEIGHTS_FILE] = hashlib.sha256(data).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _rewrite_weights(path, edit):
    """Edit the weights' tensors in place and record the new file's checksum."""
    state = load_file(path / WEIGHTS_FILE)
    edit(state)
    _replace_weights_file(path, save(state))


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
    width = model.steer_width
    with pytest.raises(InputError, match=r"rows for classes the model does not have: \['zebra'\]"):
        save_bundle(model, tmp_path / "b", steering=SteeringTable(["1", "zebra"], torch.ones(2, width), torch.zeros(2, width)))
    instance_model = GatedViT.from_timm(model.vit)
    with pytest.raises(BundleError, match="from_timm\\(name"):
        save_bundle(instance_model, tmp_path / "b")
    # (a bundle steers and reports by class name: names it would load as anything else, or two
    # classes one name cannot tell apart, were written and then refused by load or ambiguous)
    with pytest.raises(InputError, match=r"class names must be strings.*int 0"):
        save_bundle(model, tmp_path / "b", class_names=range(model.vit.num_classes))
    with pytest.raises(InputError, match=r"class names must be unique.*repeated: \['a'\]"):
        save_bundle(model, tmp_path / "b", class_names=["a"] * 2 + [str(i) for i in range(model.vit.num_classes - 2)])
    # a bare string of one character per class was read as that many one-letter names
    letters = "abcdefghijklmnopqrstuvwxyz"[:model.vit.num_classes]
    with pytest.raises(InputError, match=r"class names must be a list of strings, got the single str 'abcdefg'"):
        save_bundle(model, tmp_path / "b", class_names=letters)
    headless = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=0))
    with pytest.raises(InputError, match=r"no classifier head \(timm num_classes=0"):
        save_bundle(headless, tmp_path / "b")  # (Engine.predict raised IndexError on its bundle)
    assert list(tmp_path.iterdir()) == []


def test_steering_table_lookup_errors():
    table = SteeringTable(["cat", "dog"], torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(InputError, match="unknown steering class 'cow'.*cat, dog"):
        table.rows(["cow"])
    with pytest.raises(InputError, match="out of range"):
        table.rows([2])
    with pytest.raises(InputError, match="shape"):
        SteeringTable(["cat"], torch.ones(2, 4), torch.zeros(2, 4))
    with pytest.raises(InputError, match=r"class names must be unique .*repeated: \['cat'\]"):
        SteeringTable(["cat", "dog", "cat"], torch.ones(3, 4), torch.zeros(3, 4))
    with pytest.raises(InputError, match=r"steering table class names must be a list of strings, got the single str 'ab'"):
        SteeringTable("ab", torch.ones(2, 4), torch.zeros(2, 4))
    # a negative index is refused, not read from the end of the table as Python would
    with pytest.raises(InputError, match=r"steering class index -1 out of range \[0, 2\)"):
        table.rows([-1])
    # scale and shift are both [rows, S_total]: 1-D rows, or a shift of another width, are refused
    with pytest.raises(InputError, match="shape"):
        SteeringTable(["cat", "dog"], torch.ones(2), torch.zeros(2))
    with pytest.raises(InputError, match="shape"):
        SteeringTable(["cat", "dog"], torch.ones(2, 4), torch.zeros(2, 3))


def test_steering_table_takes_numpy_and_torch_integer_indices():
    import numpy as np

    table = SteeringTable(["cat", "dog"], torch.rand(2, 4), torch.rand(2, 4))
    for index in (np.int64(1), torch.tensor(1)):
        scale, shift = table.rows([index])
        assert torch.equal(scale[0], table.scale[1]) and torch.equal(shift[0], table.shift[1])
    for target in (torch.tensor(True), torch.tensor(1.0), np.True_):  # (a 0-d bool tensor was read as row 1)
        with pytest.raises(InputError, match="a steering target is a class name or index"):
            table.rows([target])


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_bundle_gets_the_usual_folder_and_file_modes(tmp_path, umask):
    """Folder and files get the modes a plain mkdir/open would give under the process umask (set
    here, so the check can fail whatever umask the test runner has): mkdtemp makes 0700, and
    safetensors writes 0600, which a server under another account could not read."""
    import os

    model = _model(sae_blocks="all")
    previous = os.umask(umask)
    try:
        steering = _steering(model)
        path = save_bundle(model, tmp_path / "bundle", class_names=steering.class_names, steering=steering)
    finally:
        os.umask(previous)
    assert (path.stat().st_mode & 0o777) == (0o777 & ~umask)
    for name in ("headsteer.json", "model.safetensors", "steering.safetensors"):
        assert ((path / name).stat().st_mode & 0o777) == (0o666 & ~umask), name


# -- a corrupt or inconsistent headsteer.json is a BundleError naming the field, at load time ------
@pytest.fixture(scope="module")
def pristine_bundle(tmp_path_factory):
    model = _model(sae_blocks="all")
    steering = _steering(model)
    root = tmp_path_factory.mktemp("pristine")
    return save_bundle(model, root / "bundle", class_names=steering.class_names, steering=steering, mean=(0.5,) * 3, std=(0.25,) * 3)


def _set(*keys, value):
    """An edit that sets config[keys[0]][keys[1]]... to `value`."""
    def edit(config):
        section = config
        for key in keys[:-1]:
            section = section[key]
        section[keys[-1]] = value
    return edit


def _drop(*keys):
    """An edit that deletes config[keys[0]][keys[1]]..."""
    def edit(config):
        section = config
        for key in keys[:-1]:
            section = section[key]
        del section[keys[-1]]
    return edit


CORRUPT_HEADERS = {
    # sections of the wrong type or missing (were AttributeError / KeyError / TypeError)
    "files a list": (_set("files", value=[WEIGHTS_FILE]), r"files must be an object"),
    "model a list": (_set("model", value=[1]), r"model must be an object"),
    "no timm_name": (_drop("model", "timm_name"), r"model.timm_name must be a timm model name, got nothing"),
    "timm_kwargs a list": (_set("model", "timm_kwargs", value=[]), r"model.timm_kwargs must be an object"),
    "unknown model key": (_set("model", "pretrained_file", value="/tmp/x.pth"), r"model must be free of unknown keys \['pretrained_file'\]"),
    "downloading timm_kwargs": (_set("model", "timm_kwargs", "pretrained", value=True), r"model.timm_kwargs must be free of \['pretrained'\]"),
    "no mean": (_drop("normalization", "mean"), r"normalization.mean must be a list of numbers, got nothing"),
    "no steering classes": (_drop("steering", "classes"), r"steering.classes must be a list"),
    "steering file unlisted": (_set("steering", "file", value="other.safetensors"), r"steering.file must be one of the checksummed files"),
    "image_size a string": (_set("image_size", value="32"), r"image_size must be \[height, width\]"),
    "no in_chans": (_drop("in_chans"), r"lacks the required key 'in_chans'"),
    # files outside the bundle, or malformed digests and SAE sites (were read, hashed, or a KeyError in `info`)
    "file outside the bundle": (_set("files", "../elsewhere.safetensors", value="0" * 64), r"files must be free of names other than"),
    "absolute file": (_set("files", "/etc/hostname", value="0" * 64), r"files must be free of names other than"),
    "no weights checksum": (_drop("files", WEIGHTS_FILE), r"files must be an object listing model.safetensors"),
    "digest not hex": (_set("files", WEIGHTS_FILE, value="x" * 64), r"files.model.safetensors must be a sha256 digest"),
    "no sae_sites": (_drop("sae_sites"), r"lacks the required key 'sae_sites'"),
    "sae site without block": (_drop("sae_sites", 0, "block"), r"sae_sites must be a list of \{block, width"),
    "sae site k a string": (_set("sae_sites", 1, "k", value="3"), r"sae_sites must be a list of \{block, width"),
    # steering rows a name cannot pick unambiguously, or for classes the model lacks
    "repeated steering class": (_set("steering", "classes", 1, value="class0"), r"steering.classes must be free of repeated names, found \['class0'\]"),
    "repeated class name": (lambda c: c.update(class_names=["class0"] * 2 + c["class_names"][2:], steering=None),
                            r"class_names must be free of repeated names, found \['class0'\]"),
    "foreign steering class": (_set("steering", "classes", 2, value="zebra"), r"steering.classes must be names among class_names, found \['zebra'\]"),
    "steering info short": (_set("steering", "info", value=[{}]), r"steering.info must be a list with one entry per steering row \(7\) or none"),
    "format_version a bool": (_set("format_version", value=True), r"no integer format_version"),
    # more sections of the wrong type (were AttributeError / TypeError), and fields a bare check would miss
    "normalization a list": (_set("normalization", value=[0.5, 0.25]), r"normalization must be an object with mean and std"),
    "mean holds a bool": (_set("normalization", "mean", value=[True, 0.5, 0.5]), r"normalization.mean must be a list of numbers"),
    "digest too short": (_set("files", WEIGHTS_FILE, value="0" * 63), r"files.model.safetensors must be a sha256 digest \(64 lowercase hex digits\)"),
    "steering file a list": (_set("steering", "file", value=["steering.safetensors"]), r"steering.file must be one of the checksummed files"),
    "extra a list": (_set("extra", value=["note"]), r"extra must be an object"),
    "empty timm_name": (_set("model", "timm_name", value=""), r"model.timm_name must be a timm model name"),
    # shape fields of the wrong form, named as such (not as a mismatch like "num_heads is 3, but ... has 3",
    # nor a TypeError from list(5)), also where only the header is read (`headsteer info`)
    "gated_blocks a number": (_set("gated_blocks", value=1), r"gated_blocks must be a list of block indices"),
    "image_size of three numbers": (_set("image_size", value=[32, 32, 3]), r"image_size must be \[height, width\]"),
    "num_heads a string": (_set("num_heads", value="3"), r"num_heads must be a positive head count"),
    "in_chans 0": (lambda c: c.update(in_chans=0, normalization=dict(mean=[], std=[])), r"in_chans must be a positive channel count"),
    # timm_kwargs that would unpickle a checkpoint or fetch a config (each of FETCHING_TIMM_KWARGS)
    "unpickling timm_kwargs": (_set("model", "timm_kwargs", "checkpoint_path", value="/tmp/x.pth"),
                               r"model.timm_kwargs must be free of \['checkpoint_path'\]"),
    "config-fetching timm_kwargs": (_set("model", "timm_kwargs", "pretrained_cfg_overlay", value={"file": "/tmp/x.bin"}),
                                    r"model.timm_kwargs must be free of \['pretrained_cfg_overlay'\]"),
    # a model section timm or GatedViT refuses (was timm's AssertionError / InputError)
    "num_heads not dividing width": (_set("model", "timm_kwargs", "num_heads", value=5), r"model section .* cannot be built: AssertionError"),
    "img_size of one number": (_set("model", "timm_kwargs", "img_size", value=[32]), r"model section .* cannot be built: IndexError"),
    "patch_size 0": (_set("model", "timm_kwargs", "patch_size", value=0), r"model section .* cannot be built: ZeroDivisionError"),
    "gate block out of range": (_set("model", "gate_blocks", value=[7]), r"model section .* cannot be built: .*gate_blocks index 7"),
    # normalization that would fail or give NaN at predict time
    "mean of 2 values": (_set("normalization", "mean", value=[0.1, 0.2]), r"normalization mean needs one value per input channel \(3\)"),
    "std of zeros": (_set("normalization", "std", value=[0, 0, 0]), r"normalization std must be positive"),
    "std not finite": (_set("normalization", "std", value=[float("nan"), 1.0, 1.0]), r"normalization std must be finite"),
    # header fields the Engine and exporters trust, differing from the model built
    "headless model": (lambda c: (c.update(class_names=[], steering=None), c["model"]["timm_kwargs"].update(num_classes=0)),
                       r"class_names must be a non-empty list of class names"),
    "class names short": (lambda c: c.update(class_names=["a", "b", "c"], steering=None),
                          r"class_names \(count\) is 3, but the model it describes has 7"),
    "sae site width": (_set("sae_sites", 0, "width", value=16), r"sae_sites is .*, but the model it describes has"),
    "steer_width": (_set("steer_width", value=5), r"steer_width is 5, but the model it describes has 48"),
    "image_size": (_set("image_size", value=[16, 16]), r"image_size is \[16, 16\], but the model it describes has \[32, 32\]"),
    "in_chans": (lambda c: c.update(in_chans=1, normalization=dict(mean=[0.5], std=[0.25])), r"in_chans is 1, but the model it describes has 3"),
    "num_heads": (_set("num_heads", value=4), r"num_heads is 4, but the model it describes has 3"),
    "gated_blocks": (_set("gated_blocks", value=[0]), r"gated_blocks is \[0\], but the model it describes has \[0, 1\]"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_HEADERS))
def test_corrupt_header_is_a_bundle_error_naming_the_field(pristine_bundle, tmp_path, case):
    import shutil

    from headsteer.runtime.engine import Engine

    edit, match = CORRUPT_HEADERS[case]
    path = tmp_path / "bundle"
    shutil.copytree(pristine_bundle, path)
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(BundleError, match=match) as raised:
        load_bundle(path)
    if "cannot be built" not in match and "format_version" not in match:
        assert str(path / CONFIG_FILE) in str(raised.value)
    with pytest.raises(BundleError, match=match):
        Engine.load(path, backend="compact")  # fails in load, so no predict can ever run on it


REQUIRED_KEYS = ("model", "image_size", "in_chans", "normalization", "class_names", "num_heads", "gated_blocks",
                 "sae_sites", "files", "steer_width")


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_each_required_header_key_missing_is_named(pristine_bundle, tmp_path, key):
    """A header without any one of its required keys is a BundleError naming that key (a key the
    check forgot was a bare KeyError from deep inside loading)."""
    import shutil

    path = tmp_path / "bundle"
    shutil.copytree(pristine_bundle, path)
    config = json.loads((path / CONFIG_FILE).read_text())
    del config[key]
    (path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(BundleError, match=rf"lacks the required key '{key}'"):
        load_bundle(path)


def test_a_folder_without_a_header_or_with_a_non_object_header_is_not_a_bundle(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BundleError, match=r"empty has no headsteer.json; not a headsteer bundle"):
        load_bundle(empty)
    for header in ("[]", '"headsteer-bundle"', "null"):
        (empty / CONFIG_FILE).write_text(header)
        with pytest.raises(BundleError, match=r"headsteer.json is not a headsteer-bundle file"):
            load_bundle(empty)


def test_pristine_bundle_loads(pristine_bundle):
    """The corrupt-header cases above start from a bundle that loads."""
    model, info = load_bundle(pristine_bundle)
    assert len(info.class_names) == model.vit.num_classes == 7 and info.std == (0.25,) * 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mean=(0.5, 0.5)), r"normalization mean needs one value per input channel \(3\)"),
        (dict(std=(0.0, 0.0, 0.0)), r"normalization std must be positive"),
        (dict(std=(0.2, -0.1, 0.2)), r"normalization std must be positive"),
        (dict(mean=(float("inf"), 0.5, 0.5)), r"normalization mean must be finite"),
        (dict(std=("a", "b", "c")), r"normalization std must be a sequence of numbers"),
        (dict(mean=0.5), r"normalization mean must be a sequence of numbers"),
    ],
)
def test_save_refuses_bad_normalization_before_writing(tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        save_bundle(_model(), tmp_path / "b", **kwargs)
    assert list(tmp_path.iterdir()) == []


# -- overwriting a bundle cut short between its two renames keeps the old one ----------------------
@pytest.mark.parametrize("interruption", [KeyboardInterrupt, OSError])
def test_interrupted_overwrite_puts_the_old_bundle_back(bundle, tmp_path, monkeypatch, interruption):
    import headsteer.runtime.files as files_module

    model, _, path = bundle
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_replace, calls = files_module.os.replace, []

    def replace_cut_after_the_old_one_moved(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old bundle is aside, the new one not yet in place
            raise interruption("interrupted")
        return real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", replace_cut_after_the_old_one_moved)
    with pytest.raises(interruption):
        save_bundle(model, path, overwrite=True)
    monkeypatch.setattr(files_module.os, "replace", real_replace)
    assert len(calls) >= 2  # it was cut after the old bundle moved aside
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]  # no staging or hidden old copy left
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    load_bundle(path)


def test_a_path_ending_in_dot_dot_names_its_folder(tmp_path):
    """`b/c/..` is the folder b: the bundle is staged beside b, not beside a folder named ".."."""
    model = _model()
    save_bundle(model, tmp_path / "b" / "c" / "..")
    assert load_bundle(tmp_path / "b")[0].steer_width == model.steer_width
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# -- overwrite replaces a bundle or an empty folder, never anything else ---------------------------
def test_overwrite_refuses_what_is_not_a_bundle(tmp_path):
    """overwrite=True swaps the whole folder out and deletes it: a file, a folder holding other
    things, or files beside a bundle would be lost, so they are refused and left as they were."""
    model = _model()
    notes = tmp_path / "project"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match=r"project is a folder that is not a headsteer bundle"):
        save_bundle(model, notes, overwrite=True)
    assert (notes / "notes.txt").read_text() == "keep me"
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"checkpoint")
    with pytest.raises(InputError, match=r"weights.pt exists and is not a folder"):
        save_bundle(model, weights, overwrite=True)
    assert weights.read_bytes() == b"checkpoint"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"dangling exists and is not a folder"):
        save_bundle(model, dangling)
    bundle = save_bundle(model, tmp_path / "bundle")
    (bundle / "README.md").write_text("my notes")
    with pytest.raises(InputError, match=r"holds files beside its bundle \(\['README.md'\]"):
        save_bundle(model, bundle, overwrite=True)
    assert (bundle / "README.md").read_text() == "my notes"
    (bundle / "README.md").unlink()
    save_bundle(model, bundle, overwrite=True)  # a bundle, and an empty folder, are replaced
    (tmp_path / "empty").mkdir()
    save_bundle(model, tmp_path / "empty", overwrite=True)
    assert load_bundle(tmp_path / "empty")[0].steer_width == model.steer_width


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_mistyped_tensor_is_named(bundle, dtype):
    """load_state_dict casts silently: integers or booleans would become weights."""
    _, _, path = bundle
    _rewrite_weights(path, lambda state: state.update({"saes.1.encoder_bias": state["saes.1.encoder_bias"].to(dtype)}))
    with pytest.raises(BundleError, match=rf"tensor saes.1.encoder_bias .* is {dtype}; the model expects torch.float32"):
        load_bundle(path)


def test_float64_weights_of_older_bundles_load_rounded_and_out_of_range_ones_are_refused(bundle):
    """Bundles saved before save_bundle refused float64 models hold float64 weights: they load as
    .float() rounds them; a value float32 cannot hold (it would load as inf) is refused."""
    _, _, path = bundle
    model, _ = load_bundle(path)
    wide = model.state_dict()["saes.1.encoder_bias"].double() + 1e-12
    _rewrite_weights(path, lambda state: state.update({"saes.1.encoder_bias": wide}))
    assert torch.equal(load_bundle(path)[0].state_dict()["saes.1.encoder_bias"], wide.float())
    wide[0] = 1e300
    _rewrite_weights(path, lambda state: state.update({"saes.1.encoder_bias": wide}))
    with pytest.raises(BundleError, match=r"saes.1.encoder_bias .* holds 1 non-finite value"):
        load_bundle(path)


@pytest.mark.parametrize("name", ["steer_scale", "steer_shift"])
def test_save_refuses_steering_rows_float32_cannot_hold(tmp_path, name):
    model = _model()
    wide = torch.ones(1, model.steer_width, dtype=torch.float64)
    wide[0, 0] = 1e300  # finite in float64, inf once saved as float32
    usual = torch.ones_like(wide) if name == "steer_shift" else torch.zeros_like(wide)
    scale, shift = (wide, usual) if name == "steer_scale" else (usual, wide)
    with pytest.raises(InputError, match=f"{name} holds 1 non-finite"):
        save_bundle(model, tmp_path / "bundle", class_names=[str(i) for i in range(model.vit.num_classes)],
                    steering=SteeringTable(["0"], scale, shift))
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_weights_a_float32_model_would_round(tmp_path):
    with pytest.raises(InputError, match=r"torch.float64; a bundle loads into a float32 model"):
        save_bundle(_model().double(), tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_round_trip_exactly(tmp_path, dtype):
    """A half-precision model's weights load (into the float32 model) with their exact values."""
    model = _model().to(dtype)
    loaded, _ = load_bundle(save_bundle(model, tmp_path / "bundle"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].to(dtype), tensor), name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_named(bundle, tmp_path, value):
    """A NaN or infinite weight gives NaN logits, or a NaN gate logit that silently prunes its heads:
    loading refuses it, and saving refuses to write it."""
    model, _, path = bundle

    def poison(state):
        state["gates.1.fc2.bias"][1] = value

    _rewrite_weights(path, poison)
    with pytest.raises(BundleError, match=r"tensor gates.1.fc2.bias in .* holds 1 non-finite value"):
        load_bundle(path)
    with torch.no_grad():
        model.gates["1"].fc2.bias[1] = value
    with pytest.raises(InputError, match=r"weight gates.1.fc2.bias holds 1 non-finite value"):
        save_bundle(model, tmp_path / "poisoned")
    assert not (tmp_path / "poisoned").exists()


def _rewrite_steering(path, edit):
    import hashlib

    rows = load_file(path / "steering.safetensors")
    edit(rows)
    save_file(rows, path / "steering.safetensors")
    config = json.loads((path / CONFIG_FILE).read_text())
    config["files"]["steering.safetensors"] = hashlib.sha256((path / "steering.safetensors").read_bytes()).hexdigest()
    (path / CONFIG_FILE).write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda rows: rows.update(steer_scale=torch.tensor(1.0)), r"steer_scale must be \[7, 48\] \(one row per class in steering.classes, steer_width wide\), has shape \[\]"),
        (lambda rows: rows.update(steer_shift=torch.zeros(48)), r"steer_shift must be \[7, 48\] .*, has shape \[48\]"),
        (lambda rows: rows.update(steer_scale=rows["steer_scale"][:5]), r"steer_scale must be \[7, 48\] .*, has shape \[5, 48\]"),
        (lambda rows: rows.update(steer_scale=rows["steer_scale"].long()), r"steer_scale must be float32, is torch.int64"),
        (lambda rows: rows["steer_shift"].__setitem__((2, 3), float("nan")), r"steer_shift holds 1 non-finite value"),
        (lambda rows: rows["steer_scale"].__setitem__((0, 0), float("inf")), r"steer_scale holds 1 non-finite value"),
        (lambda rows: rows.pop("steer_shift"), r"must hold exactly steer_scale and steer_shift, has \['steer_scale'\]"),
        (lambda rows: rows.update(note=torch.zeros(1)), r"must hold exactly steer_scale and steer_shift, has \['note', 'steer_scale', 'steer_shift'\]"),
        (lambda rows: rows.update(steer_shift=rows["steer_shift"].double()), r"steer_shift must be float32, is torch.float64"),
    ],
)
def test_malformed_steering_table_is_named(bundle, edit, match):
    """A scalar table was an IndexError; integer or NaN rows loaded and steered silently wrong."""
    _, _, path = bundle
    _rewrite_steering(path, edit)
    with pytest.raises(BundleError, match=match) as raised:
        load_bundle(path)
    assert "steering.safetensors" in str(raised.value)


def test_save_refuses_a_non_finite_steering_table(tmp_path):
    model = _model()
    steering = _steering(model)
    steering.shift[3, 1] = float("nan")
    with pytest.raises(InputError, match=r"steering table steer_shift holds 1 non-finite value"):
        save_bundle(model, tmp_path / "bundle", class_names=steering.class_names, steering=steering)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE, "steering.safetensors"])
def test_bundle_files_may_be_links_to_regular_files_only(bundle, tmp_path, name, capsys):
    """A bundle file that links to a regular file loads, as in the Hugging Face Hub cache (a
    snapshot folder of relative links into blobs/), DVC or git-annex: the checksum still checks
    the content; a bundle folder that is itself a link loads; overwriting replaces the link and
    leaves its target alone. A link to a device (whose read never ends), a folder or nothing is a
    BundleError naming the file, in load and in `headsteer info`."""
    import shutil

    from headsteer.runtime.bundle import read_bundle_config
    from headsteer.runtime.cli import main as cli_main

    model, steering, path = bundle
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    shutil.copy(path / name, blobs / name)
    (path / name).unlink()
    (path / name).symlink_to(os.path.relpath(blobs / name, path))
    assert load_bundle(path)[1].class_names == steering.class_names
    if name != CONFIG_FILE:  # (the header holds the checksums of the other two)
        saved = (blobs / name).read_bytes()
        (blobs / name).write_bytes(saved + b" ")  # a link's content is checked too
        with pytest.raises(BundleError, match=rf"{name} does not match its recorded checksum"):
            load_bundle(path)
    for target in ("/dev/zero", str(blobs), str(tmp_path / "nowhere")):
        (path / name).unlink()
        (path / name).symlink_to(target)
        for load in (load_bundle, read_bundle_config):
            with pytest.raises(BundleError, match=rf"bundle file {path / name} is not a regular file"):
                load(path)
        assert cli_main(["info", str(path)]) == 2
        assert f"{path / name} is not a regular file" in capsys.readouterr().err
    save_bundle(model, path, class_names=steering.class_names, steering=steering, overwrite=True)
    assert not (path / name).is_symlink() and (blobs / name).is_file()
    linked = tmp_path / "latest"
    linked.symlink_to(path, target_is_directory=True)
    assert load_bundle(linked)[1].class_names == steering.class_names



def test_extra_metadata_round_trips(tmp_path):
    extra = {"data": {"spec": "digits", "split_seed": 3}, "stages": [{"recipe": "gates", "accuracy": 0.5}]}
    assert load_bundle(save_bundle(_model(), tmp_path / "with", extra=extra))[1].extra == extra
    assert load_bundle(save_bundle(_model(), tmp_path / "without"))[1].extra == {}


def test_a_zero_or_negative_mean_is_a_valid_normalization(tmp_path):
    """Only std divides: mean (0, 0, 0) with std (1, 1, 1) means "no normalization", and a negative
    mean is a shift like any other."""
    for name, mean in (("zero", (0.0, 0.0, 0.0)), ("negative", (-0.5, 0.0, 0.5))):
        info = load_bundle(save_bundle(_model(), tmp_path / name, mean=mean, std=(1.0, 1.0, 1.0)))[1]
        assert info.mean == mean and info.std == (1.0, 1.0, 1.0)


def test_a_model_without_saes_round_trips_with_steer_width_zero(tmp_path):
    model = _model(sae_blocks=())
    loaded, info = load_bundle(save_bundle(model, tmp_path / "bundle"))
    assert loaded.steer_width == info.config["steer_width"] == 0 and info.config["sae_sites"] == []
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(pixels, backend="compact").logits, model(pixels, backend="compact").logits)


def test_weights_that_are_not_safetensors_are_a_bundle_error(bundle):
    """The checksum matches (it was recorded for these bytes), but the file is no safetensors file."""
    _, _, path = bundle
    _replace_weights_file(path, b"\x80\x04not a safetensors file, perhaps a pickle")
    with pytest.raises(BundleError, match=rf"cannot read {path / WEIGHTS_FILE}"):
        load_bundle(path)


def test_unexpected_tensor_is_named(bundle):
    _, _, path = bundle
    _rewrite_weights(path, lambda state: state.update({"head.extra_bias": torch.zeros(3)}))
    with pytest.raises(BundleError, match=r"missing tensors \[\], unexpected tensors \['head.extra_bias'\]"):
        load_bundle(path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("extra a list", r"extra must be a dict of JSON metadata, got list"),
        ("extra with a numpy number", r"extra cannot be stored as JSON \(Object of type float32 is not JSON serializable\)"),
        ("steering info for one row", r"steering table info has 1 entries for 7 rows; give one per row or none"),
        ("steering info with a numpy number", r"steering table info cannot be stored as JSON \(Object of type float32"),
    ],
)
def test_save_refuses_metadata_load_would_refuse_before_writing(bundle, case, match):
    """These were written, and then load_bundle refused the bundle (extra not an object, info for
    only some rows), or json.dumps failed with a bare TypeError after the weights were written (a
    numpy metric in a report); with overwrite=True the old bundle was already at stake. Each is
    now refused before anything is written, and the old bundle stays."""
    import numpy as np

    model, steering, path = bundle
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    kwargs = dict(class_names=steering.class_names, steering=steering, overwrite=True)
    if case == "extra a list":
        kwargs.update(extra=["trained on digits"])
    elif case == "extra with a numpy number":
        kwargs.update(extra={"accuracy": np.float32(0.75)})
    elif case == "steering info for one row":
        kwargs.update(steering=SteeringTable(steering.class_names, steering.scale, steering.shift, [{"alpha": 2.0}]))
    else:
        info = [{"alpha": np.float32(2.0)}] * len(steering.class_names)
        kwargs.update(steering=SteeringTable(steering.class_names, steering.scale, steering.shift, info))
    with pytest.raises(InputError, match=match):
        save_bundle(model, path, **kwargs)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["bundle"]


def test_save_refuses_timm_kwargs_that_fetch_weights(tmp_path):
    """A model built with timm's own local-weights idiom (pretrained=True plus a pretrained_cfg_overlay
    file) was saved with those kwargs, which load_bundle refuses (loading never unpickles): the
    bundle could never be loaded. Saving refuses it and names the way that works."""
    import timm

    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", **tiny_vit_kwargs()).state_dict(), weights)
    timm_kwargs = dict(tiny_vit_kwargs(), pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=timm_kwargs)
    with pytest.raises(InputError, match=r"timm_kwargs hold \['pretrained', 'pretrained_cfg_overlay'\].*pretrained_file="):
        save_bundle(model, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    local = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(), pretrained_file=weights)
    load_bundle(save_bundle(local, tmp_path / "bundle"))  # the way the message names


def test_save_refuses_a_model_configuration_json_cannot_store_before_writing(tmp_path):
    """A numpy integer in timm_kwargs or a GatedViT option (num_classes=np.int64(...), as from
    len(np.unique(labels))) builds a model fine, but json.dumps failed on it with a bare TypeError
    after the weights were written."""
    import numpy as np

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=np.int64(7)), sae_width=8, sae_k=2)
    with pytest.raises(InputError, match=r"model's configuration .* cannot be stored as JSON \(Object of type int64"):
        save_bundle(model, tmp_path / "bundle")
    assert list(tmp_path.iterdir()) == []

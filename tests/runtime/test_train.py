"""Training recipes on a tiny ViT and a few steps: they learn, they repeat, they resume from bundles."""
import copy
import json
import pickle
import re

import pytest
import torch
import torch.nn.functional as F

from headsteer.runtime import train as T
from headsteer.runtime.bundle import load_bundle, save_bundle
from headsteer.runtime.cli import main as cli_main
from headsteer.runtime.data import Splits, load_data
from headsteer.runtime.errors import InputError
from headsteer.runtime.gated_vit import SparseAutoencoder

TINY = dict(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=6, mlp_ratio=1.0, num_classes=10)
SIZE = ["--image-size", "8", "--patch-size", "4", "--embed-dim", "24", "--depth", "2", "--mlp-ratio", "1"]


@pytest.fixture(scope="module")
def splits():
    return load_data("digits", image_size=8, seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_backbone(seed=0):
    return T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY), seed=seed)


def test_backbone_loss_decreases_and_repeats(splits):
    config = T.BackboneConfig(epochs=4, lr=3e-3, warmup_epochs=1, seed=3)
    a, stage = T.train_backbone(tiny_backbone(3), splits, config, progress=False)
    assert stage["loss"][-1] < stage["loss"][0]
    assert 0.0 <= stage["val_accuracy"] <= 1.0
    b, stage_b = T.train_backbone(tiny_backbone(3), splits, config, progress=False)
    assert stage_b["loss"] == stage["loss"]
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    c, stage_c = T.train_backbone(tiny_backbone(4), splits, T.BackboneConfig(epochs=1, seed=4), progress=False)
    assert stage_c["loss"][0] != stage["loss"][0]


def test_usage_loss_and_noise_schedule():
    weight = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]])  # block usages 0.5, 1.0
    assert T.usage_loss(weight, 0.75, "model") == pytest.approx(0.0)
    assert T.usage_loss(weight, 0.75, "block") == pytest.approx(0.25)
    with pytest.raises(InputError):
        T.usage_loss(weight, 0.75, "sample")
    schedule = [T.noise_schedule(e, 10, 0.5) for e in range(10)]
    assert schedule[:5] == [1.0] * 5 and schedule[-1] == 0.0
    assert all(x >= y for x, y in zip(schedule, schedule[1:]))


def test_gates_move_usage_toward_target(splits):
    model = T.add_gates(tiny_backbone())
    assert model.gate_blocks == [0, 1] and not model.sae_blocks
    config = T.GateConfig(epochs=3, target_usage=0.5, lr=2e-2, seed=1)
    model, stage = T.train_gates(model, splits, config, progress=False)
    # gates start keeping ~95% of heads; the usage loss pulls the (train-mode) usage down
    assert stage["train_usage"][-1] < stage["train_usage"][0]
    assert 0.0 <= stage["val_head_usage"] <= 1.0 and len(stage["val_block_usage"]) == 2
    # the gates' own straight-through is restored after training
    assert "straight_through" not in vars(model.gates["0"])
    frozen_before = {k: v.clone() for k, v in model.vit.state_dict().items()}
    model, _ = T.train_gates(model, splits, T.GateConfig(epochs=1, freeze_backbone=True), progress=False)
    for k, v in model.vit.state_dict().items():
        assert torch.equal(v, frozen_before[k]), f"frozen backbone weight {k} changed"


def test_sae_metrics_and_decision_vectors(splits):
    gated = T.add_gates(tiny_backbone())
    model, stage = T.train_sae(gated, splits, "all", T.SAEConfig(width=48, k=4, epochs=30), progress=False)
    assert model.sae_blocks == [0, 1] and stage["sae_blocks"] == [0, 1]
    # the class token entering block 0 is the same for every image: nothing to explain there
    assert stage["sites"]["0"]["fve"] is None
    assert stage["val"]["fve"] == stage["sites"]["1"]["fve"]
    assert 0.3 < stage["sites"]["1"]["fve"] <= 1.0
    for site in stage["sites"].values():
        assert site["l0"] == pytest.approx(4.0, abs=0.01)
        assert 0.0 <= site["dead_fraction"] < 1.0
    for sae in model.saes.values():
        torch.testing.assert_close(sae.decoder_weight.norm(dim=1), torch.ones(48))
    # the hooked decision vectors are exactly what the SAE sees inside the forward
    images = splits.val.images[:16]
    e = T.decision_vectors(model, splits.val.subset(range(16)), splits.mean, splits.std, [0, 1])
    out = model(T.normalize(images, splits.mean, splits.std), return_latents=True)
    for block in (0, 1):
        torch.testing.assert_close(model.saes[str(block)].encode(e[block]), out.latents[block])
    # gates and backbone carried over unchanged
    for key, value in gated.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_cli_recipes_chain_and_resume(tmp_path, capsys):
    b1, b2, b3, b4, b5 = (str(tmp_path / n) for n in ("backbone", "gates", "sae", "steer", "backbone2"))
    assert cli_main(["train", "backbone", "--out", b1, "--epochs", "1", "--no-progress", *SIZE]) == 0
    assert cli_main(["train", "gates", "--from", b1, "--out", b2, "--epochs", "1", "--no-progress"]) == 0
    assert cli_main(["train", "sae", "--from", b2, "--out", b3, "--epochs", "3", "--width", "48", "--k", "4",
                     "--no-progress"]) == 0
    assert cli_main(["train", "steering", "--from", b3, "--out", b4, "--seed", "3", "--no-progress"]) == 0
    model, info = load_bundle(b4)
    assert [s["recipe"] for s in info.extra["stages"]] == ["backbone", "gates", "sae", "steering"]
    assert info.extra["stages"][-1]["config"]["seed"] == 3  # the random-latent control's draws
    assert model.sae_blocks == [1] and model.gate_blocks == [0, 1]
    assert info.steering is not None and info.steering.scale.shape == (10, 48)
    assert len(info.steering.info) == 10 and "latents" in info.steering.info[0]
    # resume: continue the backbone of a bundle; its weights are the starting point
    start, _ = load_bundle(b1)
    assert cli_main(["train", "backbone", "--from", b1, "--out", b5, "--epochs", "1", "--lr", "1e-5",
                     "--no-progress"]) == 0
    resumed, info5 = load_bundle(b5)
    assert [s["recipe"] for s in info5.extra["stages"]] == ["backbone", "backbone"]
    drift = max((a - b).abs().max() for a, b in zip(start.vit.state_dict().values(), resumed.vit.state_dict().values())
                if a.is_floating_point())
    assert 0 < drift < 0.05  # continued from b1 with a tiny step, not re-initialised
    json.dumps(info5.extra)  # what the bundle stores is plain JSON


def test_cli_errors(tmp_path):
    assert cli_main(["train", "sae", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    b1 = str(tmp_path / "b1")
    assert cli_main(["train", "backbone", "--out", b1, "--epochs", "1", "--no-progress", *SIZE]) == 0
    # steering needs an SAE
    assert cli_main(["train", "steering", "--from", b1, "--out", str(tmp_path / "s")]) == 2


# -- the split a bundle was trained on, what --out may replace, options that must not be ignored ----
@pytest.fixture(scope="module")
def seed3_backbone(tmp_path_factory):
    """A tiny backbone bundle trained with --seed 3: its data was split with seed 3."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("seed3") / "backbone"
    try:
        argv = ["train", "backbone", "--out", str(path), "--seed", "3", "--epochs", "1", "--no-progress", *SIZE]
        assert cli_main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return str(path)


@pytest.fixture
def stopped_data(monkeypatch):
    """load_data replaced by a stub that records the image size a command asks for and stops it there
    (an InputError): the list of sizes, empty if the command stopped before loading data."""
    sizes = []

    def stop(spec, *, image_size=None, seed=0, **kwargs):
        sizes.append(image_size)
        raise InputError("stopped before loading data")

    monkeypatch.setattr(T, "load_data", stop)
    return sizes


@pytest.fixture
def data_calls(monkeypatch):
    """The (spec, image_size, seed) of every load_data call the recipes make."""
    calls, real = [], T.load_data

    def recording(spec, *, image_size=None, seed=0, **kwargs):
        calls.append((spec, image_size, seed))
        return real(spec, image_size=image_size, seed=seed, **kwargs)

    monkeypatch.setattr(T, "load_data", recording)
    return calls


def test_continuing_splits_with_the_recorded_seed(seed3_backbone, data_calls, tmp_path):
    assert load_bundle(seed3_backbone)[1].extra["data"] == {"spec": "digits", "split_seed": 3}
    out = tmp_path / "gates"
    assert cli_main(["train", "gates", "--from", seed3_backbone, "--out", str(out), "--seed", "1", "--epochs", "1",
                     "--no-progress"]) == 0
    assert [seed for _, _, seed in data_calls] == [3]  # --seed 1 seeds training only
    extra = load_bundle(out)[1].extra
    assert extra["data"] == {"spec": "digits", "split_seed": 3} and extra["stages"][-1]["config"]["seed"] == 1
    # naming the recorded split seed is fine
    assert cli_main(["train", "backbone", "--from", seed3_backbone, "--out", str(tmp_path / "b2"), "--split-seed", "3",
                     "--epochs", "1", "--no-progress"]) == 0
    assert [seed for _, _, seed in data_calls] == [3, 3]


def test_another_split_seed_is_refused_before_work(seed3_backbone, data_calls, tmp_path, capsys):
    out = tmp_path / "gates"
    assert cli_main(["train", "gates", "--from", seed3_backbone, "--out", str(out), "--split-seed", "0"]) == 2
    assert "split made with seed 3" in capsys.readouterr().err
    assert data_calls == [] and not out.exists()


def test_a_bundle_recording_no_split_seed_splits_with_seed_as_before(tmp_path, data_calls, capsys):
    """A bundle saved without a record (e.g. through the API) and without training stages: the
    recipe splits with --seed, as recipes did before bundles recorded their split, and says so."""
    source = tmp_path / "unrecorded"
    save_bundle(tiny_backbone(), source, class_names=[str(c) for c in range(10)])
    assert cli_main(["train", "backbone", "--from", str(source), "--out", str(tmp_path / "b"), "--seed", "7",
                     "--epochs", "1", "--no-progress"]) == 0
    assert [seed for _, _, seed in data_calls] == [7]
    assert "split seed 7: default 7: the bundle records no split seed" in capsys.readouterr().out


def test_class_names_must_match_the_bundle(tmp_path, data_calls, capsys):
    source, out = tmp_path / "renamed", tmp_path / "out"
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    save_bundle(tiny_backbone(), source, class_names=names, extra=dict(data=dict(spec="digits", split_seed=0)))
    assert cli_main(["train", "backbone", "--from", str(source), "--out", str(out), "--epochs", "1",
                     "--no-progress"]) == 2
    assert "'zero'" in capsys.readouterr().err and not out.exists()
    save_bundle(tiny_backbone(), source, class_names=[*map(str, range(9)), "nine"], overwrite=True,
                extra=dict(data=dict(spec="digits", split_seed=0)))
    assert cli_main(["train", "backbone", "--from", str(source), "--out", str(out), "--epochs", "1",
                     "--no-progress"]) == 2
    assert "the bundle's class 9 is 'nine' but the data's is '9'" in capsys.readouterr().err and not out.exists()


def test_out_is_new_empty_or_a_bundle(tmp_path, data_calls, capsys):
    train = ["train", "backbone", "--epochs", "1", "--no-progress", *SIZE, "--out"]
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    a_file = tmp_path / "file.txt"
    a_file.write_text("precious")
    for out in (folder, folder / "sub" / "..", a_file, a_file / "bundle"):
        assert cli_main([*train, str(out)]) == 2, out
        assert str(out) in capsys.readouterr().err
    assert (folder / "notes.txt").read_text() == "precious" and (folder / "sub").is_dir()
    assert a_file.read_text() == "precious" and data_calls == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main([*train, str(empty)]) == 0  # an empty folder is written into
    assert cli_main([*train, str(empty), "--seed", "1"]) == 0  # a bundle is replaced
    assert load_bundle(empty)[1].extra["stages"][0]["config"]["seed"] == 1
    (empty / "model.onnx").write_text("an export kept beside the bundle")
    loads = len(data_calls)
    assert cli_main([*train, str(empty)]) == 2  # replacing the bundle would delete it
    assert "holds files beside its bundle (['model.onnx'])" in capsys.readouterr().err
    assert (empty / "model.onnx").is_file() and len(data_calls) == loads


def test_out_is_never_the_current_folder_or_above(tmp_path, data_calls, capsys, monkeypatch):
    """Saving replaces the bundle's whole folder: `--out .` (an empty current folder) crashed after
    training on the rename of ".", and a folder above would be replaced with everything in it."""
    train = ["train", "backbone", "--epochs", "1", "--no-progress", *SIZE, "--out"]
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for out in (".", str(work), "..", "sub/../.."):
        assert cli_main([*train, out]) == 2, out
        assert "is the current folder or one above it" in capsys.readouterr().err
    assert data_calls == [] and list(work.iterdir()) == []
    assert cli_main([*train, "sub/../b"]) == 0 and (work / "b" / "headsteer.json").is_file()


def test_jumprelu_sae_is_refused_not_trained_as_relu(tmp_path, data_calls, capsys):
    argv = ["train", "sae", "--from", str(tmp_path / "any"), "--out", str(tmp_path / "o"), "--activation", "jumprelu"]
    assert cli_main(argv) == 2
    assert "JumpReLU SAEs are supported for inference" in capsys.readouterr().err and data_calls == []
    with pytest.raises(InputError, match="JumpReLU"):
        T.train_sae_on(SparseAutoencoder(8, 16, "jumprelu"), torch.randn(32, 8), T.SAEConfig(activation="jumprelu"),
                       progress=False)


@pytest.fixture
def vit_checkpoint(tmp_path):
    """A timm test_vit checkpoint (width 64, depth 6, 2 heads, 16 px patches, 160 px): not the digits ViT."""
    import timm

    torch.manual_seed(0)
    path = tmp_path / "test_vit.pth"
    state = timm.create_model("test_vit").state_dict()
    torch.save(state, path)
    return path, state


def test_pretrained_file_keeps_the_timm_architecture(vit_checkpoint, tmp_path, data_calls):
    path, state = vit_checkpoint
    out = tmp_path / "b"
    assert cli_main(["train", "backbone", "--timm-name", "test_vit", "--pretrained-file", str(path), "--image-size",
                     "32", "--epochs", "1", "--lr", "1e-7", "--out", str(out), "--no-progress"]) == 0
    model, _ = load_bundle(out)
    assert model.timm_kwargs == dict(img_size=32, num_classes=10)  # only what was given
    assert (model.embed_dim, len(model.vit.blocks), model.num_heads) == (64, 6, 2)
    torch.testing.assert_close(model.vit.blocks[5].mlp.fc2.weight, state["blocks.5.mlp.fc2.weight"], atol=1e-4, rtol=0)
    assert data_calls[-1][1] == (32, 32)


def test_pretrained_file_image_size_and_load_errors_before_data(vit_checkpoint, tmp_path, stopped_data, capsys):
    path, _ = vit_checkpoint
    sizes = stopped_data
    train = ["train", "backbone", "--timm-name", "test_vit", "--out", str(tmp_path / "b"), "--pretrained-file"]
    assert cli_main([*train, str(path)]) == 2
    assert sizes == [(160, 160)]  # the data is loaded at the checkpoint model's own size
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    for argv in ([*train, str(path), "--embed-dim", "72", "--num-heads", "6"], [*train, str(corrupt)]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert "cannot load" in err and len(err) < 1000, err  # torch's 80 lines of size mismatches are cut short
    assert sizes == [(160, 160)] and not (tmp_path / "b").exists()


def test_pretrained_file_that_is_no_checkpoint_names_the_file_and_the_formats(vit_checkpoint, tmp_path, data_calls,
                                                                              capsys):
    """A file that is not a checkpoint (an image, an empty or truncated file, a pickled object) is a short
    InputError naming it and the formats read, not torch's unpickling text ("retry with
    weights_only=False", which a user cannot act on: headsteer never unpickles)."""
    from PIL import Image

    path, state = vit_checkpoint
    png = tmp_path / "notes.png"
    Image.new("RGB", (8, 8)).save(png)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:2000])
    optimizer = tmp_path / "optimizer.pth"
    torch.save({"opt": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)}, optimizer)
    bad_safetensors = tmp_path / "bad.safetensors"
    bad_safetensors.write_bytes(b"not safetensors")
    number = tmp_path / "number.pth"  # a pickle torch's legacy reader takes for a bad magic number
    number.write_bytes(pickle.dumps(7, protocol=2))
    train = ["train", "backbone", "--timm-name", "test_vit", "--out", str(tmp_path / "b"), "--pretrained-file"]
    for bad in (png, empty, truncated, optimizer, bad_safetensors, number):
        assert cli_main([*train, str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"cannot load {bad}: not a checkpoint" in err and ".safetensors" in err and "torch.save" in err, err
        assert "weights_only" not in err and "allowlist" not in err and len(err) < 500, err
    assert data_calls == [] and not (tmp_path / "b").exists()


def test_pretrained_file_of_other_keys_is_refused_before_training(vit_checkpoint, tmp_path, stopped_data, capsys):
    """timm drops the checkpoint's head for --num-classes and then loads non-strictly, so a file of other
    keys ({"a": ...}, a ResNet) only logged "Unexpected keys" and training started from random weights
    while the bundle recorded the file. It is refused, naming the file and the keys, before any data
    loads; the same model's weights still load bare, under 'state_dict' and as .safetensors."""
    import timm
    from safetensors.torch import save_file

    path, state = vit_checkpoint
    sizes = stopped_data
    other = tmp_path / "other.pth"
    torch.save({"a": torch.zeros(1)}, other)
    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), resnet)
    train = ["train", "backbone", "--timm-name", "test_vit", "--out", str(tmp_path / "b"), "--pretrained-file"]
    keys = len(state) - 2  # head.weight, head.bias aside
    for bad, unexpected in ((other, "1 unexpected (a)"), (resnet, " unexpected (conv1")):
        assert cli_main([*train, str(bad)]) == 2
        err = capsys.readouterr().err
        assert f"cannot load {bad} into timm test_vit" in err and f"{keys} missing (cls_token, " in err, err
        assert unexpected in err and "stopped before loading data" not in err, err
        assert err.count("cannot load") == 1, err  # headsteer's own error is not wrapped again
    assert sizes == [] and not (tmp_path / "b").exists()
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state}, wrapped)
    safetensors = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, safetensors)
    for good in (path, wrapped, safetensors):
        assert cli_main([*train, str(good)]) == 2
        assert "stopped before loading data" in capsys.readouterr().err
    assert sizes == [(160, 160)] * 3


@pytest.mark.parametrize("argv, message", [
    (["backbone", "--num-heads", "0"], "--num-heads must be positive"),
    (["backbone", "--embed-dim", "-8"], "--embed-dim must be positive"),
    (["backbone", "--patch-size", "32"], "--patch-size 32 is larger"),
    (["backbone", "--from", "SRC", "--embed-dim", "24", "--timm-name", "vit_small_patch16_224"], "--embed-dim"),
    (["backbone", "--from", "SRC", "--pretrained-file", "x.pth"], "--pretrained-file cannot change"),
    (["sae", "--from", "SRC", "--width", "-4", "--activation", "relu"], "width must be at least 1"),
    (["sae", "--from", "SRC", "--width", "0"], "width must be at least 1"),
    (["sae", "--from", "SRC", "--k", "0"], "--k must be at least 1"),
    (["sae", "--from", "SRC"], "has no head gates"),
    (["gates", "--from", "SRC", "--target-usage", "1.5"], "--target-usage"),
    (["gates", "--from", "SRC", "--lr", "nan"], "--lr must be a finite number"),
    (["gates", "--from", "SRC", "--usage-weight", "nan"], "--usage-weight must be a finite number"),
    (["gates", "--from", "SRC", "--usage-weight", "inf"], "--usage-weight must be a finite number"),
    (["backbone", "--lr", "inf"], "--lr must be a finite number"),
    (["backbone", "--mlp-ratio", "nan"], "--mlp-ratio must be a finite number"),
    (["gates", "--from", "SRC", "--seed", str(10**17)], "--seed must be an integer in [0, 2**32 - 1]"),
    (["gates", "--from", "SRC", "--seed", "-1"], "--seed must be an integer in [0, 2**32 - 1]"),
    (["backbone", "--split-seed", "-1"], "--split-seed must be an integer in [0, 2**32 - 1]"),
    (["gates", "--from", "SRC", "--target-usage", "0"], "--target-usage must be in (0, 1]"),
    (["gates", "--from", "SRC", "--usage-weight", "-1"], "--usage-weight must be >= 0"),
    (["gates", "--from", "SRC", "--lr", "0"], "--lr must be positive, got 0.0"),
    (["backbone", "--depth", "0"], "--depth must be positive"),
    (["backbone", "--embed-dim", "25"], "--embed-dim 25 is not divisible by --num-heads 6"),
    (["backbone", "--pretrained-file", "missing.pth"], "--pretrained-file missing.pth does not exist"),
])
def test_bad_options_are_refused_before_work(argv, message, seed3_backbone, data_calls, tmp_path, capsys):
    argv = [seed3_backbone if a == "SRC" else a for a in argv]
    assert cli_main(["train", *argv, "--out", str(tmp_path / "o"), "--epochs", "1", "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert data_calls == [] and not (tmp_path / "o").exists()


def test_steering_takes_no_training_options(seed3_backbone, tmp_path):
    with pytest.raises(SystemExit):
        cli_main(["train", "steering", "--from", seed3_backbone, "--out", str(tmp_path / "o"), "--epochs", "5"])


def test_add_gates_uses_gate_init_bias():
    for bias in (-5.0, 3.0):
        model = T.add_gates(tiny_backbone(), gate_init_bias=bias)
        for gate in model.gates.values():
            assert torch.equal(gate.fc2.bias, torch.full_like(gate.fc2.bias, bias))
    kept = T.add_gates(tiny_backbone(), gate_blocks=[1])
    grown = T.add_gates(kept, gate_blocks=[0, 1], gate_init_bias=-5.0)  # an existing gate is carried over
    assert torch.equal(grown.gates["1"].fc2.bias, kept.gates["1"].fc2.bias)
    assert torch.equal(grown.gates["0"].fc2.bias, torch.full((6,), -5.0))
    moved = T.add_gates(kept, gate_blocks=[0])  # gated at exactly the blocks asked for
    assert moved.gate_blocks == [0]


@pytest.mark.parametrize("blocks, match", [("7", "index 7 is out of range"), ("abc", "must be 'all', 'none'"),
                                           ("0", r"block\(s\) \[0\] have no head gate")])
def test_sae_blocks_are_checked_before_the_data_loads(tmp_path, data_calls, capsys, blocks, match):
    source = tmp_path / "gated"
    model = T.add_gates(tiny_backbone(), gate_blocks=[1])  # 2 blocks, block 0 ungated
    save_bundle(model, source, class_names=[str(c) for c in range(10)], extra=dict(data=dict(spec="digits", split_seed=0)))
    argv = ["train", "sae", "--from", str(source), "--out", str(tmp_path / "o"), "--sae-blocks", blocks]
    assert cli_main(argv) == 2
    assert re.search(match, capsys.readouterr().err) and data_calls == []


def test_a_non_square_bundle_trains_on_images_of_its_size(tmp_path):
    """A bundle of 8 x 12 images trains on 8 x 12 images (the data used to be made square)."""
    splits = load_data("digits", image_size=(8, 12), seed=0)
    model = T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, img_size=(8, 12)), seed=0)
    path = T.save_stage(model, tmp_path / "wide", splits, {})
    out = tmp_path / "gated"
    assert cli_main(["train", "gates", "--from", str(path), "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    assert load_bundle(out)[0].image_size == (8, 12)


def test_image_size_not_a_multiple_of_the_patch_size_is_refused(vit_checkpoint, tmp_path, data_calls, capsys):
    """timm floors the patch grid, so --image-size 15 with 4 px patches trained on 12 x 12 crops of the
    images; it is refused before any data is loaded (from scratch, and with a checkpoint whose patch size
    is the timm model's own), per side for (height, width) sizes, unless dynamic_img_pad pads the images."""
    out = ["--out", str(tmp_path / "b")]
    assert cli_main(["train", "backbone", "--image-size", "15", *out]) == 2
    err = capsys.readouterr().err
    assert "--image-size 15 is not a multiple of --patch-size 4" in err and "crop" in err, err
    assert cli_main(["train", "backbone", "--image-size", "16", "--patch-size", "3", *out]) == 2
    assert "--image-size 16 is not a multiple of --patch-size 3" in capsys.readouterr().err
    path, _ = vit_checkpoint  # test_vit: 16 px patches
    assert cli_main(["train", "backbone", "--timm-name", "test_vit", "--pretrained-file", str(path),
                     "--image-size", "40", *out]) == 2
    assert "image size (40, 40) is not a multiple of the patch size (16, 16)" in capsys.readouterr().err
    assert data_calls == [] and not (tmp_path / "b").exists()
    with pytest.raises(InputError, match=r"image size \(8, 10\) is not a multiple of the patch size \(4, 4\)"):
        T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, img_size=(8, 10)), seed=0)
    padded = T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, img_size=(8, 10), dynamic_img_pad=True,
                                                      dynamic_img_size=True), seed=0)
    assert padded.image_size == (8, 10)


def test_gates_recipe_init_follows_seed_not_the_global_rng(seed3_backbone, tmp_path):
    """`train gates` adds new gates, drawn from --seed: the same arguments give the same weights
    whatever ran before in the process (the gates were drawn from the global RNG as it stood)."""
    states = []
    for n in range(2):
        torch.manual_seed(100 + n)
        out = tmp_path / f"g{n}"
        assert cli_main(["train", "gates", "--from", seed3_backbone, "--out", str(out), "--epochs", "1",
                         "--no-progress"]) == 0
        states.append(load_bundle(out)[0].state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_sae_init_follows_config_seed_not_the_global_rng(splits):
    """train_sae draws its new SAEs from config.seed: the same config gives the same SAE whatever
    the global RNG held (the SAE's decoder was drawn from it before the seed was set)."""
    gated = T.add_gates(tiny_backbone())
    states = []
    for n in range(2):
        torch.manual_seed(100 + n)
        model, _ = T.train_sae(gated, splits, (-1,), T.SAEConfig(width=48, k=4, epochs=1, seed=5), progress=False)
        states.append(model.state_dict())
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_gates_recipe_keeps_a_gated_bundles_gates_and_saes(tmp_path):
    """Continuing a bundle gated at some blocks (AdaViT leaves the first ungated) with an SAE keeps
    both: the recipe gated every block and dropped the SAE, while a fully gated bundle kept its SAE."""
    model = T.rebuild(tiny_backbone(), gate_blocks=[1], sae_blocks=[1], sae_width=48, sae_activation="topk", sae_k=4)
    source, out = tmp_path / "src", tmp_path / "out"
    save_bundle(model, source, class_names=[str(c) for c in range(10)], extra=dict(data=dict(spec="digits", split_seed=0)))
    assert cli_main(["train", "gates", "--from", str(source), "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    trained, _ = load_bundle(out)
    assert (trained.gate_blocks, trained.sae_blocks) == ([1], [1])
    assert torch.equal(trained.saes["1"].decoder_weight, model.saes["1"].decoder_weight)


# -- helpers, schedules and the backbone recipe's own arithmetic --------------------------------------
def small_splits(splits, train=64, val=16):
    """The first `train` training and `val` validation images of `splits`: one or two batches."""
    return Splits(splits.train.subset(range(train)), splits.val.subset(range(val)), splits.test.subset(range(val)),
                  splits.mean, splits.std)


def record_batch_seeds(dataset):
    """Replace `dataset.batches` by one that records the shuffle seed of every call."""
    seeds, real = [], dataset.batches

    def batches(batch_size, *, shuffle=False, seed=0):
        seeds.append(seed)
        return real(batch_size, shuffle=shuffle, seed=seed)

    dataset.batches = batches
    return seeds


@pytest.fixture
def optimizers(monkeypatch):
    """Every AdamW the recipes make, each recording its groups' learning rates at every step."""
    made = []

    class Recording(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.lrs = []
            made.append(self)

        def step(self, closure=None):
            self.lrs.append([group["lr"] for group in self.param_groups])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    return made


def test_normalize_uses_each_channels_mean_and_std():
    out = T.normalize(torch.ones(2, 3, 4, 4), (0.5, 0.25, 0.0), (0.25, 0.5, 2.0))
    assert out[:, 0].eq(2.0).all() and out[:, 1].eq(1.5).all() and out[:, 2].eq(0.5).all()


def test_random_shift_reaches_every_offset_with_zero_fill():
    images = torch.zeros(300, 1, 5, 5)
    images[:, :, 2, 2] = 1.0
    out = T.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert {tuple(map(int, (o[0] == 1).nonzero()[0])) for o in out} == {(r, c) for r in range(5) for c in range(5)}
    assert out.sum() == 300 and set(out.unique().tolist()) == {0.0, 1.0}
    assert T.random_shift(images, 0, torch.Generator()) is images


def test_cosine_lr_warms_up_then_decays_to_zero_and_stays_there():
    lrs = [T.cosine_lr(step, 10, 1.0, 2) for step in range(12)]
    assert lrs[:3] == [0.5, 1.0, 1.0]
    assert lrs[6] == pytest.approx(0.5)  # halfway through the decay
    assert lrs[10] == pytest.approx(0.0, abs=1e-12) and lrs[11] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_patch_grid_problem_names_the_crop_and_the_next_multiple():
    assert T.patch_grid_problem(16, 4) is None and T.patch_grid_problem((8, 12), 4) is None
    assert T.patch_grid_problem(15, 4, dynamic_img_pad=True) is None
    problem = T.patch_grid_problem(15, 4)
    assert "crop every image to (12, 12)" in problem and "e.g. 16)" in problem, problem
    assert "e.g. (8, 12)" in T.patch_grid_problem((8, 10), 4)


def test_evaluate_model_counts_and_keeps_the_models_mode(splits):
    model = T.add_gates(tiny_backbone(), gate_blocks=[1], gate_init_bias=-5.0)  # every head of block 1 pruned
    val = splits.val.subset(range(20))
    model.train()
    result = T.evaluate_model(model, val, splits.mean, splits.std, batch_size=7)
    assert model.training
    logits = model.eval()(T.normalize(val.images, splits.mean, splits.std)).logits
    assert result["accuracy"] == int((logits.argmax(-1) == val.labels).sum()) / 20
    assert result["head_usage"] == 0.0 and result["block_usage"] == [0.0]
    dense = T.evaluate_model(tiny_backbone(), val, splits.mean, splits.std)
    assert set(dense) == {"accuracy"}  # no gate, no usage


def test_rebuild_changes_the_sae_width_and_activation_keeping_the_rest():
    model = T.rebuild(tiny_backbone(), gate_blocks=[1], sae_blocks=[1], sae_width=48, sae_activation="topk", sae_k=4)
    wider = T.rebuild(model, sae_width=96)
    assert (wider.saes["1"].width, wider.sae_k) == (96, 4)
    relu = T.rebuild(model, sae_activation="relu")
    assert relu.sae_k is None and relu.saes["1"].activation == "relu"
    assert torch.equal(relu.saes["1"].decoder_weight, model.saes["1"].decoder_weight)
    assert torch.equal(wider.gates["1"].fc2.weight, model.gates["1"].fc2.weight)


def test_new_backbone_without_a_file_does_not_blame_a_checkpoint():
    with pytest.raises(Exception) as info:
        T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, embed_dim=25), seed=0)
    assert "cannot load" not in str(info.value) and "None" not in str(info.value)
    assert T.new_backbone("test_vit", {}).embed_dim == 64  # empty kwargs: the timm model's own, not the digits ViT's


def test_rebuild_needs_a_timm_name():
    from headsteer.runtime.errors import BundleError
    from headsteer.runtime.gated_vit import GatedViT

    bare = GatedViT(tiny_backbone().vit, gate_blocks="none", sae_blocks="none")
    with pytest.raises(BundleError, match="not built from a timm model name"):
        T.rebuild(bare, gate_blocks="all")


def test_backbone_loss_is_the_label_smoothed_cross_entropy_of_shifted_images(splits):
    data = small_splits(splits)
    start = tiny_backbone()
    expected = F.cross_entropy(start.vit(T.normalize(data.train.images, data.mean, data.std)), data.train.labels,
                               label_smoothing=0.1)
    config = T.BackboneConfig(epochs=1, batch_size=64, max_shift=0)
    model, stage = T.train_backbone(copy.deepcopy(start), data, config, progress=False)
    assert stage["loss"][0] == pytest.approx(expected.item(), rel=1e-5)
    assert not model.training  # returned in eval mode
    _, shifted = T.train_backbone(copy.deepcopy(start), data, T.BackboneConfig(epochs=1, batch_size=64), progress=False)
    assert shifted["loss"][0] != pytest.approx(expected.item(), rel=1e-3)


def test_backbone_decays_only_matrices_and_follows_the_cosine_schedule(splits, optimizers):
    data = small_splits(splits)
    seeds = record_batch_seeds(data.train)
    config = T.BackboneConfig(epochs=2, batch_size=32, lr=1e-3, warmup_epochs=1, seed=2)
    start, modes = tiny_backbone().eval(), []  # e.g. loaded from a bundle
    start.vit.blocks[0].norm1.register_forward_pre_hook(lambda norm, _: modes.append(norm.training))
    model, _ = T.train_backbone(start, data, config, progress=False)
    assert modes[:4] == [True] * 4  # trained in training mode (dropout, drop-path), validated in eval mode
    (optimizer,) = optimizers
    decay, no_decay = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.vit.parameters() if p.dim() >= 2}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.vit.parameters() if p.dim() < 2}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    assert [lr for lr, _ in optimizer.lrs] == pytest.approx([T.cosine_lr(s, 4, 1e-3, 2) for s in range(4)])
    assert len(seeds) == 2 and seeds[0] != seeds[1]  # a new data order each epoch


def test_a_model_with_other_outputs_or_image_size_is_refused(splits):
    with pytest.raises(InputError, match="12 outputs but the data has 10 classes"):
        T.train_backbone(T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, num_classes=12)), splits, progress=False)
    with pytest.raises(InputError, match=r"takes \(12, 12\) images but the data is \(8, 8\)"):
        T.train_backbone(T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, img_size=12)), splits, progress=False)
    twelve = T.add_gates(T.new_backbone(T.DEFAULT_TIMM_NAME, dict(TINY, num_classes=12)))
    with pytest.raises(InputError, match="12 outputs"):
        T.train_gates(twelve, splits, progress=False)
    with pytest.raises(InputError, match="12 outputs"):
        T.train_sae(twelve, splits, progress=False)


# -- gates -------------------------------------------------------------------------------------------
def test_noise_schedule_is_linear_after_anneal_start():
    assert [T.noise_schedule(e, 10, 0.5) for e in range(10)] == pytest.approx([1.0] * 5 + [0.8, 0.6, 0.4, 0.2, 0.0])
    assert T.noise_schedule(0, 1, 0.5) == 1.0  # a single epoch keeps the full noise
    assert [T.noise_schedule(e, 4, 0.0) for e in range(4)] == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_usage_loss_is_the_distance_to_the_target_either_side():
    weight = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]])  # block usages 0.5, 0.75; model 0.625
    assert T.usage_loss(weight, 0.6, "model") == pytest.approx(0.025)
    assert T.usage_loss(weight, 0.7, "model") == pytest.approx(0.075)
    assert T.usage_loss(weight, 0.6, "block") == pytest.approx(0.125)  # each block's own distance


def test_gate_defaults_are_adavits():
    config = T.GateConfig()
    assert (config.temperature, config.usage_weight, config.usage_granularity) == (5.0, 2.0, "block")


def test_gate_loss_is_cross_entropy_plus_weighted_usage_loss(splits):
    data = small_splits(splits, train=1)  # batch 1: the Gumbel noise meets the one image whatever the order
    start = T.add_gates(tiny_backbone())
    with torch.no_grad():  # block 0 keeps about every head, block 1 about none: the two losses differ
        start.gates["1"].fc2.bias.fill_(-5.0)
    x = T.normalize(data.train.images, data.mean, data.std)
    for granularity in ("block", "model"):
        config = T.GateConfig(epochs=1, max_shift=0, usage_weight=3.0, target_usage=0.25,
                              usage_granularity=granularity, seed=4)
        torch.manual_seed(4)  # the Gumbel noise of the one step is the first draw after the recipe seeds
        out = copy.deepcopy(start).train()(x)
        expected = (F.cross_entropy(out.logits, data.train.labels, label_smoothing=0.1)
                    + 3.0 * T.usage_loss(out.head_weight, 0.25, granularity))
        _, stage = T.train_gates(copy.deepcopy(start), data, config, progress=False)
        assert stage["loss"][0] == pytest.approx(expected.item(), rel=1e-5), granularity
        assert stage["train_usage"][0] == pytest.approx(out.head_weight.mean().item())


def test_gate_training_schedules_noise_lr_and_restores_the_model(splits, optimizers):
    data = small_splits(splits)
    model = T.add_gates(tiny_backbone())
    noise, modes = [], []
    model.gates["0"].register_forward_pre_hook(lambda gate, _: noise.append(gate.noise_scale))
    model.vit.blocks[0].norm1.register_forward_pre_hook(lambda norm, _: modes.append(norm.training))
    config = T.GateConfig(epochs=2, batch_size=32, lr=1e-2, backbone_lr=1e-3, temperature=2.0)
    model, stage = T.train_gates(model, data, config, progress=False)
    assert 0.8 < stage["train_usage"][0] <= 1.0  # new gates keep about 95% of the heads
    assert noise[:4] == [1.0, 1.0, 0.0, 0.0]  # then validation
    assert all(gate.temperature == 2.0 and gate.noise_scale == 1.0 for gate in model.gates.values())
    assert modes[:4] == [True] * 4 and not model.training
    (optimizer,) = optimizers
    expected = [[T.cosine_lr(s, 4, 1e-2, 2), T.cosine_lr(s, 4, 1e-3, 2)] for s in range(4)]  # warm-up: one epoch
    assert [lr for lrs in optimizer.lrs for lr in lrs] == pytest.approx([lr for lrs in expected for lr in lrs])
    noise.clear(), modes.clear()
    model, _ = T.train_gates(model, data, T.GateConfig(epochs=1, batch_size=64, freeze_backbone=True), progress=False)
    assert modes[0] is False  # a frozen backbone runs without dropout / drop-path noise
    assert len(optimizers[1].param_groups) == 1
    assert all(p.requires_grad for p in model.parameters())  # trainable again for any later recipe


def test_gate_training_refuses_an_ungated_model_or_a_bad_target(splits):
    with pytest.raises(InputError, match="no gated blocks"):
        T.train_gates(tiny_backbone(), splits, T.GateConfig(epochs=1), progress=False)
    for target in (0.0, 1.5):
        with pytest.raises(InputError, match="target_usage must be in"):
            T.train_gates(T.add_gates(tiny_backbone()), splits, T.GateConfig(epochs=1, target_usage=target),
                          progress=False)


# -- SAE -----------------------------------------------------------------------------------------------
def test_decision_vectors_come_from_the_eval_model_and_leave_no_hook(splits):
    model = T.add_gates(tiny_backbone(), gate_init_bias=0.0)  # in training mode the gates would draw noise
    val = splits.val.subset(range(12))
    model.eval()
    expected = T.decision_vectors(model, val, splits.mean, splits.std, [1])
    model.train()
    e = T.decision_vectors(model, val, splits.mean, splits.std, [0, 1])
    torch.testing.assert_close(e[1], expected[1], rtol=0, atol=0)
    assert T.decision_vectors(model, val.subset([]), splits.mean, splits.std, [1])[1].shape == (0, 24)
    assert e[0].shape == (12, 24) and model.training
    assert all(not block.norm1._forward_pre_hooks for block in model.vit.blocks)


def test_training_encode_is_the_reference_encode():
    e = torch.randn(16, 8) * 3
    for activation, k in (("topk", 12), ("relu", None)):
        sae = SparseAutoencoder(8, 16, activation, k)
        with torch.no_grad():
            sae.encoder_bias.normal_()
            sae.decoder_bias.normal_()
        torch.testing.assert_close(T._fast_encode(sae, e), sae.encode(e))


def test_sae_width_defaults_to_four_times_the_model_width_and_activations_are_checked():
    model = tiny_backbone()
    assert (T.sae_width(model), T.sae_width(model, 10)) == (96, 10)
    with pytest.raises(InputError, match=r"one of \('topk', 'relu'\), got 'gelu'"):
        T.check_trainable_sae("gelu")


def test_l1_makes_a_relu_sae_sparser():
    e = torch.randn(128, 8)
    l0 = []
    for l1 in (0.0, 1.0):
        sae = SparseAutoencoder(8, 32, "relu")
        T.train_sae_on(sae, e, T.SAEConfig(activation="relu", l1=l1, epochs=10, batch_size=32, lr=0.02), progress=False)
        l0.append(T.sae_metrics(sae, e)["l0"])
    assert l0[1] < 0.5 * l0[0], l0


def test_dead_latents_are_resampled_except_in_the_last_fifth(monkeypatch):
    """A TopK(1) SAE of 64 latents on 16 vectors: most latents never fire and are resampled after ten
    epochs, which is after the last fifth in a 10-epoch run. The loss is reported in raw units."""
    e = torch.randn(16, 4) * 10 + 100
    requested, real = [], torch.multinomial

    def recording(weights, count, **kwargs):
        requested.append(count)
        return real(weights, count, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    for epochs, resamplings in ((10, 0), (20, 1)):
        requested.clear()
        sae = SparseAutoencoder(4, 64, "topk", 1)
        losses = T.train_sae_on(sae, e, T.SAEConfig(k=1, epochs=epochs, batch_size=8), progress=False)
        assert len(requested) == resamplings and all(count > 0 for count in requested)
        x_hat, _ = sae(e)
        assert losses[-1] == pytest.approx(((x_hat - e) ** 2).sum(-1).mean().item(), rel=0.2)
    assert T.sae_metrics(sae, e)["fve"] > 0.95


def test_sae_training_starts_tied_and_centred():
    """An SAE that was trained before (e.g. carried over by rebuild) starts again from a tied encoder,
    unit decoder rows and zero biases: with no epoch the decoder bias is the data mean."""
    e = torch.randn(32, 8) + 5
    sae = SparseAutoencoder(8, 16, "topk", 4)
    with torch.no_grad():
        sae.encoder_weight.normal_(), sae.encoder_bias.normal_(), sae.decoder_weight.mul_(3), sae.decoder_bias.normal_()
    assert T.train_sae_on(sae, e, T.SAEConfig(k=4, epochs=0), progress=False) == []
    torch.testing.assert_close(sae.decoder_weight.norm(dim=1), torch.ones(16))
    assert torch.equal(sae.encoder_weight, sae.decoder_weight) and not sae.encoder_bias.any()
    torch.testing.assert_close(sae.decoder_bias, e.mean(0))


def test_sae_recipe_reports_val_metrics_and_refuses_a_bad_width_before_work(splits, monkeypatch):
    gated = T.add_gates(tiny_backbone())
    model, stage = T.train_sae(gated, splits, (-1,), T.SAEConfig(activation="relu", epochs=2), progress=False)
    assert model.sae_k is None and model.saes["1"].activation == "relu"
    assert model.saes["1"].width == stage["config"]["width"] == 96  # 4 x the model's width, recorded
    e_val = T.decision_vectors(model, splits.val, splits.mean, splits.std, [1])[1]
    assert stage["sites"]["1"]["fve"] == pytest.approx(T.sae_metrics(model.saes["1"], e_val)["fve"])
    assert stage["sites"]["1"]["loss"] > 0  # the last epoch's training loss
    monkeypatch.setattr(T, "decision_vectors", None)  # no decision vector is computed for a refused SAE
    with pytest.raises(InputError, match="width must be at least 1, got 0"):
        T.train_sae(gated, splits, (-1,), T.SAEConfig(width=0), progress=False)


# -- bundle plumbing -----------------------------------------------------------------------------------
def test_save_stage_refuses_what_it_must_not_replace(splits, tmp_path, monkeypatch):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious")
    with pytest.raises(InputError, match="notes"):
        T.save_stage(tiny_backbone(), folder, splits, {})
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    monkeypatch.chdir(folder)
    with pytest.raises(InputError, match="is the current folder or one above it"):
        T.save_stage(tiny_backbone(), ".", splits, {})
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


def test_json_safe_turns_non_finite_numbers_into_null():
    value = dict(loss=[1.0, float("nan")], sites={1: dict(fve=float("inf"))}, shape=(2, float("-inf")))
    assert T._json_safe(value) == dict(loss=[1.0, None], sites={"1": dict(fve=None)}, shape=[2, None])


# -- options at their limits, and options that reach the recipe ------------------------------------------
@pytest.fixture
def gated_bundle(tmp_path):
    """A tiny bundle gated at both blocks, no SAE, recording the digits split with seed 0."""
    source = tmp_path / "gated"
    save_bundle(T.add_gates(tiny_backbone()), source, class_names=[str(c) for c in range(10)],
                extra=dict(data=dict(spec="digits", split_seed=0)))
    return str(source)


@pytest.mark.parametrize("argv", [
    ["sae", "--from", "GATED", "--width", "4", "--k", "4"],
    ["sae", "--from", "GATED", "--activation", "relu", "--k", "0"],  # a relu SAE has no k
    ["gates", "--from", "GATED", "--target-usage", "1", "--usage-weight", "0"],
    ["backbone", "--image-size", "8", "--patch-size", "8"],  # one patch
])
def test_options_at_their_limits_are_accepted(argv, gated_bundle, stopped_data, tmp_path, capsys):
    argv = [gated_bundle if a == "GATED" else a for a in argv]
    assert cli_main(["train", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "stopped before loading data" in capsys.readouterr().err and len(stopped_data) == 1


@pytest.mark.parametrize("argv, message", [
    (["sae", "--width", "4", "--k", "5"], "--k 5 is larger than the SAE width 4"),
    (["sae", "--epochs", "0"], "--epochs must be positive, got 0"),
    (["steering"], "has no SAE; run `headsteer train sae` first"),
])
def test_options_beyond_their_limits_are_refused(argv, message, gated_bundle, stopped_data, tmp_path, capsys):
    assert cli_main(["train", argv[0], "--from", gated_bundle, *argv[1:], "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err and stopped_data == []


def test_a_new_backbone_splits_with_split_seed_else_seed(tmp_path, monkeypatch):
    calls = []

    def stop(spec, *, image_size=None, seed=0, progress=True, **kwargs):
        calls.append((seed, progress))
        raise InputError("stopped before loading data")

    monkeypatch.setattr(T, "load_data", stop)
    for split_seed in ([], ["--split-seed", "9"]):
        argv = ["train", "backbone", "--seed", "4", *split_seed, "--out", str(tmp_path / "o"), "--no-progress"]
        assert cli_main(argv) == 2
    assert calls == [(4, False), (9, False)]


def test_gate_options_reach_the_recipe(seed3_backbone, tmp_path, capsys):
    out = tmp_path / "gates"
    assert cli_main(["train", "gates", "--from", seed3_backbone, "--out", str(out), "--epochs", "1", "--lr", "0.01",
                     "--target-usage", "0.6", "--usage-weight", "1.5", "--freeze-backbone", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""  # no progress bar
    model, info = load_bundle(out)
    config = info.extra["stages"][-1]["config"]
    assert (config["lr"], config["target_usage"], config["usage_weight"], config["freeze_backbone"]) == (0.01, 0.6, 1.5, True)
    start = load_bundle(seed3_backbone)[0]
    for (name, a), b in zip(start.vit.state_dict().items(), model.vit.state_dict().values()):
        assert torch.equal(a, b), f"frozen backbone weight {name} changed"


def test_sae_options_reach_the_recipe(gated_bundle, tmp_path):
    out = tmp_path / "sae"
    assert cli_main(["train", "sae", "--from", gated_bundle, "--out", str(out), "--activation", "relu", "--width", "16",
                     "--epochs", "2", "--lr", "0.01", "--no-progress"]) == 0
    model, info = load_bundle(out)
    assert model.saes["1"].activation == "relu" and model.saes["1"].width == 16 and model.sae_k is None
    config = info.extra["stages"][-1]["config"]
    assert (config["activation"], config["epochs"], config["lr"]) == ("relu", 2, 0.01)

"""Training recipes on a tiny ViT and a few steps: they learn, they repeat, they resume from bundles."""
import json

import pytest
import torch

from headsteer.runtime import train as T
from headsteer.runtime.bundle import load_bundle
from headsteer.runtime.cli import main as cli_main
from headsteer.runtime.data import load_data
from headsteer.runtime.errors import InputError

TINY = dict(img_size=8, patch_size=4, embed_dim=24, depth=2, num_heads=6, mlp_ratio=1.0, num_classes=10)


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
    size = ["--image-size", "8", "--patch-size", "4", "--embed-dim", "24", "--depth", "2", "--mlp-ratio", "1"]
    assert cli_main(["train", "backbone", "--out", b1, "--epochs", "1", "--no-progress", *size]) == 0
    assert cli_main(["train", "gates", "--from", b1, "--out", b2, "--epochs", "1", "--no-progress"]) == 0
    assert cli_main(["train", "sae", "--from", b2, "--out", b3, "--epochs", "3", "--width", "48", "--k", "4",
                     "--no-progress"]) == 0
    assert cli_main(["train", "steering", "--from", b3, "--out", b4, "--no-progress"]) == 0
    model, info = load_bundle(b4)
    assert [s["recipe"] for s in info.extra["stages"]] == ["backbone", "gates", "sae", "steering"]
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
    size = ["--image-size", "8", "--patch-size", "4", "--embed-dim", "24", "--depth", "2", "--mlp-ratio", "1"]
    b1 = str(tmp_path / "b1")
    assert cli_main(["train", "backbone", "--out", b1, "--epochs", "1", "--no-progress", *size]) == 0
    # steering needs an SAE
    assert cli_main(["train", "steering", "--from", b1, "--out", str(tmp_path / "s")]) == 2

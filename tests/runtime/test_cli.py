"""The headsteer command: help, info, predict, and one-line errors without tracebacks."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from headsteer.runtime.cli import main
from tests.conftest import save_cli_bundle


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return save_cli_bundle(tmp_path_factory.mktemp("cli") / "bundle")


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "headsteer.runtime.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("info", "predict"):
        assert command in result.stdout


def test_info(bundle_path, capsys):
    assert main(["info", str(bundle_path)]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224" in out and "red, green, blue" in out and "block 1 (16 latents, topk)" in out
    assert "heads         3 per block; gated blocks [0, 1]" in out
    assert "steering      3 per-class rows (red, green, blue)" in out
    assert main(["info", str(bundle_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["class_names"] == ["red", "green", "blue"]


def test_predict_image_files(bundle_path, tmp_path, capsys):
    paths = []
    for index in range(2):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    assert main(["predict", str(bundle_path), *paths, "--steer", "green", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["image"] for row in rows] == paths
    assert all(row["label"] in ("red", "green", "blue") and 0 <= row["head_usage"] <= 1 for row in rows)


def test_predict_runs_bounded_batches_in_file_order(bundle_path, tmp_path, capsys, monkeypatch):
    """--batch-size splits the files into forwards of at most that many images; the rows come out
    in file order and match one forward over all of them."""
    from headsteer.runtime.engine import Engine

    paths = []
    for index in range(5):
        path = tmp_path / f"image{index}.png"
        Image.fromarray(np.random.default_rng(10 + index).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    assert main(["predict", str(bundle_path), *paths, "--json"]) == 0
    whole = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    batches = []
    predict = Engine.predict

    def recording_predict(self, images, **kwargs):
        batches.append(len(images))
        return predict(self, images, **kwargs)

    monkeypatch.setattr(Engine, "predict", recording_predict)
    assert main(["predict", str(bundle_path), *paths, "--json", "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert batches[-3:] == [2, 2, 1]  # (after the load's batch-1 warm-up)
    assert [row["image"] for row in rows] == paths
    assert [row["label"] for row in rows] == [row["label"] for row in whole]
    for row, reference in zip(rows, whole):
        assert row["probability"] == pytest.approx(reference["probability"], abs=2e-4)
    with pytest.raises(SystemExit):
        main(["predict", str(bundle_path), *paths, "--batch-size", "0"])
    assert "expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "no/such/bundle"], "not a bundle directory"),
        (["predict", "{bundle}", "missing.png"], "missing.png does not exist"),
        (["predict", "{bundle}", "{bundle}/headsteer.json"], "cannot read image"),
        (["predict", "{bundle}", "{image}", "--steer", "purple"], "unknown steering class 'purple'"),
        (["predict", "{bundle}", "{image16}"], "more than 8 bits per channel"),
        (["predict", "{bundle}", "{image}", "--device", "meta"], "unknown device 'meta'"),
        (["predict", "{bundle}", "{image}", "--device", "mps"], "unknown device 'mps'"),
    ],
)
def test_errors_are_one_line_without_traceback(bundle_path, tmp_path, argv, message):
    image = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    image16 = tmp_path / "sixteen_bit.png"  # a 16-bit grayscale PNG (PIL mode I;16)
    Image.fromarray(np.full((32, 32), 1000, dtype=np.uint16)).save(image16)
    argv = [arg.format(bundle=bundle_path, image=image, image16=image16) for arg in argv]
    result = subprocess.run([sys.executable, "-m", "headsteer.runtime.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "tensor" not in result.stderr  # (the command line takes image files only)


def test_predict_reports_a_decompression_bomb_as_an_unreadable_image(bundle_path, tmp_path, monkeypatch, capsys):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # PIL refuses images over twice this
    assert main(["predict", str(bundle_path), str(path)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_ctrl_c_while_the_subcommands_load_is_status_130_without_a_traceback(monkeypatch, capsys):
    """Mounting the subcommands imports their modules (seconds); Ctrl-C then was a traceback."""
    import headsteer.runtime.cli as cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.importlib, "import_module", interrupted)
    assert main(["info", "bundle"]) == 130
    assert capsys.readouterr().err.strip() == "headsteer: interrupted"


@pytest.mark.parametrize("option,message", [(["--backend", "nope"], "unknown backend 'nope'"),
                                            (["--device", "mps"], "unknown device 'mps'"),
                                            (["--device", "cuda:x"], "unknown device 'cuda:x'")])
def test_predict_checks_backend_and_device_before_reading_any_image(bundle_path, tmp_path, monkeypatch, capsys, option, message):
    """A misspelt --backend or --device was reported only after every image file had been decoded."""
    import headsteer.runtime.cli as cli

    def no_read(name):
        raise AssertionError("an image was decoded before the options were checked")

    monkeypatch.setattr(cli, "_read_rgb", no_read)
    assert main(["predict", str(bundle_path), str(tmp_path / "a.png"), *option]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_predict_checks_every_file_before_the_model_loads(bundle_path, tmp_path, capsys, monkeypatch):
    """A PNG with a bad checksum (PIL: SyntaxError), a truncated PNG or JPEG (OSError, for JPEG
    only when decoded) fails before the model loads, with one line naming the file."""
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(good)
    png = bytearray(good.read_bytes())
    png[60] ^= 0xFF  # inside the image data: its chunk's CRC no longer matches
    (tmp_path / "checksum.png").write_bytes(bytes(png))
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:-200])
    Image.open(good).save(tmp_path / "photo.jpg", quality=90)
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "photo.jpg").read_bytes()[:-300])
    loaded = []
    monkeypatch.setattr("headsteer.runtime.engine.Engine.load", lambda *a, **k: loaded.append(1))
    for bad in ("checksum.png", "truncated.png", "truncated.jpg"):
        assert main(["predict", str(bundle_path), str(good), str(tmp_path / bad)]) == 2
        err = capsys.readouterr().err
        assert f"cannot read image {tmp_path / bad}" in err and len(err.strip().splitlines()) == 1
    assert loaded == []


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: headsteer" in capsys.readouterr().out


def test_predict_rows_are_each_images_own_engine_result(tmp_path, capsys):
    """Each printed row is its own image's label, softmax probability and head usage as the Engine
    gives them, steered as asked; the plain-text lines say the same. (A bundle whose gates and
    classifier are sharpened, so images differ in both.)"""
    import torch

    from headsteer.runtime import GatedViT
    from headsteer.runtime.bundle import SteeringTable, save_bundle
    from headsteer.runtime.engine import Engine
    from tests.conftest import tiny_vit_kwargs

    torch.manual_seed(1)
    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=3), gate_init_bias=0.0,
                               sae_width=16, sae_k=2)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.fc2.weight.mul_(20)
        model.vit.head.weight.mul_(20)
    names = ["red", "green", "blue"]
    bundle = save_bundle(model, tmp_path / "bundle", class_names=names,
                         steering=SteeringTable(names, torch.rand(3, 16) * 3, torch.zeros(3, 16)))
    images = [Image.fromarray(np.random.default_rng(20 + i).integers(0, 256, (40, 40, 3), dtype=np.uint8)) for i in range(3)]
    images += [Image.new("RGB", (40, 40), color) for color in ("red", "white", "blue")]
    paths = []
    for index, image in enumerate(images):
        image.save(tmp_path / f"image{index}.png")
        paths.append(str(tmp_path / f"image{index}.png"))
    assert main(["predict", str(bundle), *paths, "--steer", "green", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    result = Engine.load(bundle).predict(images, steer="green")
    probabilities = result.logits.softmax(-1).max(-1).values
    assert len({(row["label"], row["head_usage"]) for row in rows}) > 2  # (rows differ: a mix-up would show)
    for index, row in enumerate(rows):
        assert row["image"] == paths[index] and row["steer"] == "green"
        assert row["label"] == result.class_names[index]
        assert row["probability"] == pytest.approx(float(probabilities[index]), abs=2e-4)
        assert row["head_usage"] == pytest.approx(float(result.head_usage[index]), abs=1e-4)
    assert main(["predict", str(bundle), *paths, "--steer", "green"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{row['image']}: {row['label']} (p={row['probability']:.3f}, head usage {row['head_usage']:.3f})" for row in rows
    ]


def test_info_shows_twenty_class_names_and_marks_the_rest(tmp_path, capsys):
    from headsteer.runtime import GatedViT
    from headsteer.runtime.bundle import save_bundle
    from tests.conftest import tiny_vit_kwargs

    model = GatedViT.from_timm("vit_tiny_patch16_224", timm_kwargs=tiny_vit_kwargs(num_classes=25), sae_blocks=())
    names = [f"c{i}" for i in range(25)]
    assert main(["info", str(save_bundle(model, tmp_path / "bundle", class_names=names))]) == 0
    out = capsys.readouterr().out
    assert f"classes       25: {', '.join(names[:20])} ...\n" in out
    assert "SAE sites     none; steer width 0" in out and "steering      none" in out


def test_ctrl_c_inside_a_command_is_status_130_without_a_traceback(monkeypatch, capsys):
    import headsteer.runtime.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_info", interrupted)
    assert main(["info", "bundle"]) == 130
    assert capsys.readouterr().err.strip() == "headsteer info: interrupted"

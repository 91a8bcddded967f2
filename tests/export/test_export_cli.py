"""`headsteer export`: options are checked before anything is written, and an option the chosen
output does not use is refused rather than ignored."""
import pytest

from headsteer.runtime.cli import main
from tests.conftest import save_cli_bundle


@pytest.fixture(scope="module")
def bundle_path(tmp_path_factory):
    return save_cli_bundle(tmp_path_factory.mktemp("export_cli") / "bundle")


@pytest.mark.parametrize(
    "format_,extra,refused",
    [
        ("onnx", ["--max-batch", "64"], "--max-batch"),
        ("onnx", ["--min-batch", "2", "--opt-batch", "4"], "--min-batch, --opt-batch"),
        ("onnx", ["--engine", "plan"], "--engine"),
        ("onnx", ["--name", "resnet"], "--name"),
        ("tensorrt", ["--engine", "plan"], "--engine"),
        ("tensorrt", ["--name", "resnet"], "--name"),
        ("triton-repo", ["--min-batch", "4"], "--min-batch"),
        ("triton-repo", ["--engine", "onnx", "--opt-batch", "4"], "--opt-batch"),
    ],
)
def test_options_the_format_does_not_use_are_refused(bundle_path, tmp_path, capsys, format_, extra, refused):
    """Each of these was accepted and silently ignored (e.g. `--format onnx --max-batch 64` wrote
    a model with a dynamic batch and exit status 0)."""
    out = tmp_path / {"onnx": "m.onnx", "tensorrt": "m.plan", "triton-repo": "repo"}[format_]
    assert main(["export", str(bundle_path), "--format", format_, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{refused} do" in err and "not apply" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_defaults_still_apply_when_the_options_are_left_out(bundle_path, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert main(["export", str(bundle_path), "--format", "triton-repo", "--out", str(repo)]) == 0
    assert "max_batch_size: 32" in (repo / "bundle" / "config.pbtxt").read_text()
    assert "(ONNX)" in capsys.readouterr().out


def test_onnx_export_keeps_an_existing_steering_file_without_overwrite(bundle_path, tmp_path, capsys):
    """`--out model.onnx` also writes model.steering.json; one already there (another model's rows)
    was replaced without --overwrite, unlike the .onnx itself and a plan's rows."""
    out, rows = tmp_path / "model.onnx", tmp_path / "model.steering.json"
    rows.write_text('{"rows": "of another model"}')
    assert main(["export", str(bundle_path), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "model.steering.json already exists" in err and "--overwrite" in err
    assert rows.read_text() == '{"rows": "of another model"}' and not out.exists()
    assert main(["export", str(bundle_path), "--format", "onnx", "--out", str(out), "--overwrite"]) == 0
    assert out.is_file() and "headsteer-steering" in rows.read_text()


def test_opt_batch_help_states_the_default_used(capsys):
    """The help said min(8, max), but with --min-batch 16 the profile is tuned for 16."""
    from headsteer.export.tensorrt import default_opt_batch

    assert default_opt_batch(16, 32) == 16 and default_opt_batch(1, 4) == 4 and default_opt_batch(1, 32) == 8
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "(default 8, within min..max)" in " ".join(capsys.readouterr().out.split())


def test_onnx_export_rewrites_the_same_rows_without_overwrite(bundle_path, tmp_path, capsys):
    """A rows file holding this bundle's own rows (a plan of the same bundle wrote model.steering.json
    beside model.plan) is rewritten: only other rows need --overwrite."""
    out, rows = tmp_path / "model.onnx", tmp_path / "model.steering.json"
    assert main(["export", str(bundle_path), "--format", "onnx", "--out", str(out)]) == 0
    written = rows.read_text()
    out.unlink()
    assert main(["export", str(bundle_path), "--format", "onnx", "--out", str(out)]) == 0
    assert out.is_file() and rows.read_text() == written


def test_onnx_export_refuses_a_precision(bundle_path, tmp_path, capsys):
    """The ONNX contract is float32: --precision shapes TensorRT engines only."""
    assert main(["export", str(bundle_path), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--precision", "fp16"]) == 2
    assert "--precision applies to TensorRT engines" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_onnx_export_writes_the_opset_asked_for(bundle_path, tmp_path):
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", str(bundle_path), "--format", "onnx", "--out", str(out), "--opset", "21"]) == 0
    assert [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")] == [21]


def test_onnx_export_keeps_an_unreadable_steering_file_without_overwrite(bundle_path, tmp_path, capsys):
    """Rows that cannot be read as JSON are not this bundle's rows either: kept without --overwrite."""
    out, rows = tmp_path / "model.onnx", tmp_path / "model.steering.json"
    rows.write_text("my notes, not JSON")
    assert main(["export", str(bundle_path), "--format", "onnx", "--out", str(out)]) == 2
    assert "model.steering.json already exists" in capsys.readouterr().err
    assert rows.read_text() == "my notes, not JSON" and not out.exists()


def test_plan_profile_options_are_accepted_for_a_plan_repository(bundle_path, tmp_path, capsys):
    """--min-batch/--opt-batch shape a plan repository's profile: not refused as inapplicable (this
    machine then stops at the missing TensorRT, or builds where it is installed)."""
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed: this would build a plan")
    argv = ["export", str(bundle_path), "--format", "triton-repo", "--out", str(tmp_path / "repo"), "--engine", "plan",
            "--min-batch", "1", "--opt-batch", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not apply" not in err and "tensorrt" in err


def test_a_bad_bundle_is_named_before_tensorrt_is_looked_for(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--format", "tensorrt", "--out", str(tmp_path / "m.plan")]) == 2
    assert "not a bundle" in capsys.readouterr().err

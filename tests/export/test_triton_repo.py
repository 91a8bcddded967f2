"""`headsteer export --format triton-repo`: layout, and config.pbtxt checked against the model file."""
from __future__ import annotations

import json
import re

import onnx
import pytest

from headsteer.export import read_metadata
from headsteer.export.triton_repo import ONNX_TO_TRITON, parse_pbtxt, render_config
from headsteer.runtime.cli import main
from headsteer.runtime.files import current_umask

from .conftest import CLASS_NAMES


def test_parser_reads_the_subset_it_is_meant_for():
    text = render_config("m", "onnxruntime_onnx", 4, [("x", "TYPE_FP32", [3, 8, 8])], [("y", "TYPE_BOOL", [2, 6])], "y")
    config = parse_pbtxt(text + '# a comment\nparameters { key: "k" value: { string_value: "v" } }\n')
    assert config["name"] == "m" and config["max_batch_size"] == 4
    assert config["input"] == [{"name": "x", "data_type": "TYPE_FP32", "dims": [3, 8, 8]}]
    assert config["output"][0]["label_filename"] == "labels.txt"
    assert config["dynamic_batching"] == {}
    assert config["parameters"] == {"key": "k", "value": {"string_value": "v"}}


def test_triton_repository_matches_the_exported_model(exported, tmp_path, capsys):
    repo = tmp_path / "models"
    argv = ["export", str(exported.bundle), "--format", "triton-repo", "--out", str(repo), "--name", "steered_vit", "--max-batch", "16"]
    assert main(argv) == 0
    model_dir = repo / "steered_vit"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "config.pbtxt", "labels.txt", "steering.json"]
    assert [p.name for p in (model_dir / "1").iterdir()] == ["model.onnx"]
    # the server usually runs under another account: everything must have the usual modes
    umask = current_umask()
    for path in [model_dir, *model_dir.rglob("*")]:
        assert (path.stat().st_mode & 0o777) == ((0o777 if path.is_dir() else 0o666) & ~umask), path
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]  # no staging leftovers

    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["name"] == "steered_vit"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 16
    assert config["dynamic_batching"] == {}

    model = onnx.load(str(model_dir / "1" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    initializers = {i.name for i in model.graph.initializer}

    def signature(values):
        out = {}
        for value in values:
            if value.name in initializers:
                continue
            tensor = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            assert shape[0] == -1, f"{value.name}: the batch dimension must be dynamic for Triton's batcher"
            out[value.name] = (ONNX_TO_TRITON[tensor.elem_type], shape[1:])
        return out

    declared_inputs = {entry["name"]: (entry["data_type"], entry["dims"]) for entry in config["input"]}
    declared_outputs = {entry["name"]: (entry["data_type"], entry["dims"]) for entry in config["output"]}
    assert declared_inputs == signature(model.graph.input)
    assert declared_outputs == signature(model.graph.output)
    assert list(declared_inputs) == ["pixel_values", "steer_scale", "steer_shift"]
    assert declared_outputs == {"logits": ("TYPE_FP32", [len(CLASS_NAMES)]), "head_mask": ("TYPE_BOOL", [2, 3])}
    # labels.txt names the logits (Triton's classification extension), not the head mask
    labels = {entry["name"]: entry.get("label_filename") for entry in config["output"]}
    assert labels == {"logits": "labels.txt", "head_mask": None}
    # KIND_AUTO: a GPU where the server has one, else the CPU (KIND_GPU fails to load on a CPU server)
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_AUTO"}]

    assert (model_dir / "labels.txt").read_text().split() == CLASS_NAMES
    steering = json.loads((model_dir / "steering.json").read_text())
    assert steering["classes"] == CLASS_NAMES and len(steering["rows"]["bowl"]["steer_scale"]) == 128
    # The model names its rows file, relative to itself, as a file exported beside its rows does.
    recorded = read_metadata(model_dir / "1" / "model.onnx")["steering_file"]
    assert recorded == "../steering.json" and (model_dir / "1" / recorded).resolve() == (model_dir / "steering.json").resolve()

    # An existing model directory is kept unless --overwrite is given.
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err


def test_plan_engine_without_tensorrt_is_a_clear_error(exported, tmp_path, capsys):
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorrt is installed; tests/export/test_tensorrt.py covers plan repositories")
    argv = ["export", str(exported.bundle), "--format", "triton-repo", "--out", str(tmp_path / "repo"), "--engine", "plan"]
    assert main(argv) == 2
    assert "tensorrt" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())


def _refused_before_export(exported, tmp_path, monkeypatch, match, **options):
    """write_triton_repo(**options) raises an InputError matching `match` before exporting anything."""
    import headsteer.export.triton_repo as triton_repo
    from headsteer.runtime.errors import InputError

    def no_export(*args, **kwargs):
        raise AssertionError("exported before the arguments were checked")

    monkeypatch.setattr(triton_repo, "to_onnx", no_export)
    with pytest.raises(InputError, match=match):
        triton_repo.write_triton_repo(exported.bundle, tmp_path / "repo", **options)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(min_batch=2), "min_batch is 2, but Triton's dynamic batcher sends batches from 1"),
        (dict(opt_batch=64), r"min <= opt <= max, got 1, 64, 32"),
        (dict(opt_batch=0), "opt_batch must be a positive integer, got 0"),
        (dict(min_batch=0), "min_batch must be a positive integer"),
        (dict(precision="fp64"), "precision must be one of"),
    ],
)
def test_plan_arguments_are_checked_before_anything_is_exported(exported, tmp_path, monkeypatch, kwargs, match):
    _refused_before_export(exported, tmp_path, monkeypatch, match, engine="plan", max_batch_size=32, **kwargs)


def test_onnx_engine_rejects_a_precision(exported, tmp_path, capsys):
    argv = ["export", str(exported.bundle), "--format", "triton-repo", "--out", str(tmp_path / "repo"), "--precision", "fp16"]
    assert main(argv) == 2
    assert "precision 'fp16' applies to TensorRT plans" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_plan_repository_keeps_no_onnx_weights_sidecar(exported, tmp_path, monkeypatch):
    """A model over protobuf's cap (threshold lowered here) is exported with `model.onnx.data`;
    once the plan is built (faked: TensorRT cannot run here), neither ONNX file stays behind."""
    import headsteer.export.onnx_export as onnx_export
    import headsteer.export.tensorrt as tensorrt_module
    from headsteer.export.triton_repo import write_triton_repo

    def fake_build(onnx_path, plan_path, **kwargs):
        assert onnx_export.external_data_path(onnx_path).is_file()  # the sidecar path was taken
        plan_path.write_bytes(b"plan")
        return plan_path

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    monkeypatch.setattr(tensorrt_module, "_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_module, "_require_cuda", lambda what: None)
    monkeypatch.setattr(tensorrt_module, "build_engine", fake_build)
    model_dir = write_triton_repo(exported.bundle, tmp_path / "repo", engine="plan", max_batch_size=8)
    assert [p.name for p in (model_dir / "1").iterdir()] == ["model.plan"]
    assert parse_pbtxt((model_dir / "config.pbtxt").read_text())["platform"] == "tensorrt_plan"


@pytest.mark.parametrize("overrides,match", [
    (dict(sae_blocks=()), r"steer_scale/steer_shift is \[B, 0\] \(the bundle has no SAE\)"),
    (dict(gate_blocks=(), sae_blocks=()), r"head_mask is \[B, 0, 3\] \(the bundle has no gated block\)"),
])
def test_bundle_with_a_zero_sized_tensor_is_refused(tmp_path, overrides, match):
    """Triton rejects `dims: [ 0 ]` when it loads the model; refuse before writing anything."""
    from headsteer.export.triton_repo import write_triton_repo
    from headsteer.runtime.bundle import save_bundle
    from headsteer.runtime.errors import InputError

    from .conftest import make_model

    bundle = save_bundle(make_model(**overrides), tmp_path / "bundle", class_names=CLASS_NAMES)
    with pytest.raises(InputError, match="refuses a model config with a dimension of 0.*" + match):
        write_triton_repo(bundle, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()


def test_overwrite_replaces_only_what_the_export_wrote(exported, tmp_path, capsys):
    """--overwrite swaps the model folder out and deletes the old one: a folder holding anything
    else (another version, notes) or a file at that path is refused, and left as it was."""
    repo = tmp_path / "models"
    argv = ["export", str(exported.bundle), "--format", "triton-repo", "--out", str(repo), "--name", "m", "--overwrite"]
    assert main(argv) == 0
    assert main(argv) == 0  # its own output is replaced
    (repo / "m" / "2").mkdir()
    assert main(argv) == 2
    assert "['2']" in capsys.readouterr().err and (repo / "m" / "2").is_dir() and (repo / "m" / "config.pbtxt").is_file()
    (repo / "m" / "2").rmdir()
    (repo / "other").write_text("notes")
    assert main([*argv[:-3], "--name", "other", "--overwrite"]) == 2
    assert "is not a folder" in capsys.readouterr().err and (repo / "other").read_text() == "notes"
    (repo / "dangling").symlink_to(tmp_path / "nowhere")
    assert main([*argv[:-3], "--name", "dangling", "--overwrite"]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,match", [
    (dict(min_batch=2), r"min_batch=2 does not apply to engine 'onnx'"),
    (dict(opt_batch=4), r"opt_batch=4 does not apply to engine 'onnx'"),
    (dict(min_batch=2, opt_batch=4), r"min_batch=2, opt_batch=4 do not apply to engine 'onnx'"),
    (dict(min_batch=1, opt_batch=8), r"^opt_batch=8 does not apply"),  # (min_batch 1 is the default)
])
def test_onnx_engine_refuses_plan_profile_batches(exported, tmp_path, monkeypatch, kwargs, match):
    """min_batch/opt_batch shape a TensorRT plan's profile; the CLI refuses them with --engine onnx,
    and so does the API (it used to drop them silently), before anything is exported."""
    _refused_before_export(exported, tmp_path, monkeypatch, match, engine="onnx", max_batch_size=16, **kwargs)


@pytest.mark.parametrize("bad", ["hot\ndog", "hot\rdog", "hot\r\ndog"])
def test_class_name_with_a_line_break_is_refused(tmp_path, monkeypatch, bad):
    """Triton reads label_filename one label per line (split at '\\n'; a '\\r' stays in the label),
    so a class name holding a line break would shift every later label: refuse it up front."""
    import headsteer.export.triton_repo as triton_repo
    from headsteer.runtime.bundle import save_bundle
    from headsteer.runtime.errors import InputError

    from .conftest import make_model

    def no_export(*args, **kwargs):
        raise AssertionError("exported before the class names were checked")

    names = [*CLASS_NAMES[:2], bad, *CLASS_NAMES[3:]]
    bundle = save_bundle(make_model(), tmp_path / "bundle", class_names=names)
    monkeypatch.setattr(triton_repo, "to_onnx", no_export)
    with pytest.raises(InputError, match=re.escape(repr([bad])) + r" hold a line break, which labels\.txt"):
        triton_repo.write_triton_repo(bundle, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()



@pytest.fixture
def copied_export(exported, monkeypatch):
    """write_triton_repo with to_onnx replaced by a copy of the masked file exported once; returns
    the keyword arguments each to_onnx call got."""
    import shutil

    import headsteer.export.triton_repo as triton_repo

    calls = []

    def fake_to_onnx(bundle, path, **kwargs):
        calls.append(kwargs)
        shutil.copyfile(exported.onnx["masked"], path)
        return path

    monkeypatch.setattr(triton_repo, "to_onnx", fake_to_onnx)
    return calls


@pytest.mark.parametrize("name", ["a/b", "m/../../escape", "../up", ".hidden", "-dash", "two words", ""])
def test_a_model_name_that_is_no_plain_folder_name_is_refused(exported, tmp_path, monkeypatch, name):
    """--name becomes a folder under the repository: a name with a slash would write elsewhere."""
    _refused_before_export(exported, tmp_path, monkeypatch, "may hold only letters, digits", name=name)


def test_the_default_name_is_the_bundle_folders_name_made_valid(exported, tmp_path, copied_export):
    import shutil

    from headsteer.export.triton_repo import write_triton_repo

    bundle = tmp_path / "my bundle (v2)"
    shutil.copytree(exported.bundle, bundle)
    model_dir = write_triton_repo(bundle, tmp_path / "repo")
    assert model_dir == tmp_path / "repo" / "my_bundle__v2"
    assert parse_pbtxt((model_dir / "config.pbtxt").read_text())["name"] == "my_bundle__v2"


@pytest.mark.parametrize("max_batch_size", [0, -1, 2.0, True])
def test_max_batch_size_must_be_a_positive_integer(exported, tmp_path, monkeypatch, max_batch_size):
    """0 would mean "no batching" to Triton, and the dims (written without the batch) would then
    be wrong; True (an int to isinstance) was accepted and written as `max_batch_size: True`,
    which Triton cannot parse."""
    _refused_before_export(exported, tmp_path, monkeypatch, "max_batch_size must be a positive integer", max_batch_size=max_batch_size)


def test_an_unknown_engine_is_refused(exported, tmp_path, monkeypatch):
    _refused_before_export(exported, tmp_path, monkeypatch, r"engine must be one of \['onnx', 'plan'\], got 'tensorrt'", engine="tensorrt")


def test_a_file_as_the_repository_is_refused_before_the_export(exported, tmp_path, monkeypatch):
    import headsteer.export.triton_repo as triton_repo
    from headsteer.runtime.errors import InputError

    monkeypatch.setattr(triton_repo, "to_onnx", lambda *args, **kwargs: pytest.fail("exported before the path was checked"))
    repo = tmp_path / "repo"
    repo.write_text("not a folder")
    with pytest.raises(InputError, match="exists and is not a directory"):
        triton_repo.write_triton_repo(exported.bundle, repo)
    assert repo.read_text() == "not a folder"


def test_attention_and_opset_reach_the_served_model(exported, tmp_path):
    repo = tmp_path / "repo"
    argv = ["export", str(exported.bundle), "--format", "triton-repo", "--out", str(repo), "--attention", "sparse", "--opset", "20"]
    assert main(argv) == 0
    model = onnx.load(str(repo / exported.bundle.name / "1" / "model.onnx"))
    assert {entry.key: entry.value for entry in model.metadata_props}["headsteer.attention"] == "sparse"
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_plan_is_built_from_a_graph_of_its_precision_with_the_configs_batches(exported, tmp_path, monkeypatch, copied_export, precision):
    """The plan's profile spans what the dynamic batcher sends (1 .. max_batch_size), and a
    reduced-precision plan is built from the graph exported in that precision (faked builds:
    TensorRT cannot run here)."""
    import headsteer.export.tensorrt as tensorrt_module
    from headsteer.export.triton_repo import write_triton_repo

    builds = []

    def fake_build(onnx_path, plan_path, **kwargs):
        builds.append(kwargs)
        plan_path.write_bytes(b"plan")
        return plan_path

    monkeypatch.setattr(tensorrt_module, "_tensorrt", lambda: None)
    monkeypatch.setattr(tensorrt_module, "_require_cuda", lambda what: None)
    monkeypatch.setattr(tensorrt_module, "build_engine", fake_build)
    model_dir = write_triton_repo(exported.bundle, tmp_path / "repo", engine="plan", precision=precision, max_batch_size=12)
    assert [call["precision"] for call in copied_export] == [precision]
    assert builds == [dict(precision=precision, min_batch=1, opt_batch=8, max_batch=12)]
    assert parse_pbtxt((model_dir / "config.pbtxt").read_text())["max_batch_size"] == 12


def test_a_bundle_given_as_dot_is_named_after_its_folder(exported, tmp_path, monkeypatch, copied_export):
    """`headsteer export . --format triton-repo` from inside the bundle: '.' has no name."""
    from headsteer.export.triton_repo import write_triton_repo

    monkeypatch.chdir(exported.bundle)
    assert write_triton_repo(".", tmp_path / "repo") == tmp_path / "repo" / exported.bundle.name

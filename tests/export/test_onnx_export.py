"""The exported files: checker, graph inputs/outputs, metadata, the steering JSON, TensorRT parser
compatibility of every op and I/O type, errors and atomic writes, and the CLI."""
from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch

from headsteer.export import read_metadata, steering_path_for, to_onnx
from headsteer.export._common import ExportError, MissingDependencyError
from headsteer.export.onnx_export import load_steering
from headsteer.export.tensorrt_ops import IO_TYPES_OK, check_tensorrt_compat, infer_types, supported_ops
from headsteer.runtime.errors import BundleError, InputError

from .conftest import CLASS_NAMES

VARIANTS = ("masked", "sparse")


def dims(value):
    return [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("variant", VARIANTS)
def test_checker_and_graph_signature(exported, variant):
    path = exported.onnx[variant]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    initializers = {i.name for i in model.graph.initializer}
    inputs = {v.name: v for v in model.graph.input if v.name not in initializers}
    outputs = {v.name: v for v in model.graph.output}
    assert list(inputs) == ["pixel_values", "steer_scale", "steer_shift"]
    assert list(outputs) == ["logits", "head_mask"]
    m = exported.model
    batch = dims(inputs["pixel_values"])[0]
    assert isinstance(batch, str) and batch  # a symbolic (dynamic) batch dimension
    assert dims(inputs["pixel_values"]) == [batch, 3, 32, 32]
    assert dims(inputs["steer_scale"]) == dims(inputs["steer_shift"]) == [batch, m.steer_width] == [batch, 128]
    assert dims(outputs["logits"]) == [batch, len(CLASS_NAMES)]
    assert dims(outputs["head_mask"]) == [batch, len(m.gate_blocks), m.num_heads]
    types = {name: v.type.tensor_type.elem_type for name, v in {**inputs, **outputs}.items()}
    assert types == {
        "pixel_values": onnx.TensorProto.FLOAT,
        "steer_scale": onnx.TensorProto.FLOAT,
        "steer_shift": onnx.TensorProto.FLOAT,
        "logits": onnx.TensorProto.FLOAT,
        "head_mask": onnx.TensorProto.BOOL,
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_metadata(exported, variant):
    meta = read_metadata(exported.onnx[variant])
    m = exported.model
    assert meta["format"] == "headsteer-onnx" and meta["format_version"] == 1
    assert meta["attention"] == variant and meta["gating"] == "threshold"
    assert meta["class_names"] == CLASS_NAMES
    assert meta["sae_blocks"] == [1, 2] and meta["sae_widths"] == [64, 64] and meta["sae_offsets"] == [0, 64]
    assert meta["gated_blocks"] == [1, 2] and meta["num_heads"] == m.num_heads
    assert meta["steer_width"] == 128 and meta["image_size"] == [32, 32]
    assert meta["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert meta["normalization"]["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["steering_file"] == steering_path_for(exported.onnx[variant]).name
    assert meta["precision"] == "fp32" and meta["num_classes"] == len(CLASS_NAMES)


def test_steering_json_maps_class_names_to_the_table_rows_exactly(exported):
    path = steering_path_for(exported.onnx["masked"])
    assert path.name == "tiny_masked.steering.json"
    doc = json.loads(path.read_text())
    assert doc["classes"] == CLASS_NAMES and doc["steer_width"] == 128
    # what a client feeds for an unsteered sample, and under which input names
    assert doc["identity"] == {"steer_scale": 1.0, "steer_shift": 0.0}
    assert doc["inputs"] == {"scale": "steer_scale", "shift": "steer_shift"}
    assert doc["info"] == exported.steering.info
    assert doc["sae_sites"] == [{"block": 1, "width": 64, "offset": 0}, {"block": 2, "width": 64, "offset": 64}]
    rows = load_steering(path)
    for index, name in enumerate(CLASS_NAMES):
        scale, shift = rows[name]
        assert torch.equal(scale, exported.steering.scale[index].float())  # bit-exact float32 round trip
        assert torch.equal(shift, exported.steering.shift[index].float())


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_op_and_io_type_is_one_tensorrt_parses(exported, variant):
    table = supported_ops()
    assert "10." in table.version and {"MatMul", "NonZero", "ScatterND", "TopK"} <= table.ops
    model = infer_types(onnx.load(str(exported.onnx[variant])))
    report = check_tensorrt_compat(model)
    assert report.ok, report.problems
    assert report.ops <= table.ops, sorted(report.ops - table.ops)
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.elem_type in IO_TYPES_OK
    data_dependent = {"NonZero", "ScatterND"} & report.ops
    if variant == "masked":
        assert not data_dependent, "the masked variant must keep static shapes"
    else:
        assert data_dependent == {"NonZero", "ScatterND"}


def test_compat_check_catches_what_tensorrt_rejects():
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2])
    y = helper.make_tensor_value_info("y", TensorProto.STRING, [2])
    nodes = [
        helper.make_node("Unique", ["x"], ["u"]),
        helper.make_node("ScatterND", ["x", "i", "x"], ["s"], reduction="add"),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y])
    problems = check_tensorrt_compat(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])).problems
    text = "\n".join(problems)
    assert "Unique" in text and "reduction='add'" in text and "'y' has type STRING" in text


def test_bad_arguments_are_clear_errors(exported, tmp_path):
    with pytest.raises(InputError, match="attention must be one of"):
        to_onnx(exported.bundle, tmp_path / "m.onnx", attention="dense")
    with pytest.raises(InputError, match="opset"):
        to_onnx(exported.bundle, tmp_path / "m.onnx", opset=11)
    with pytest.raises(InputError, match="is a directory"):
        to_onnx(exported.bundle, tmp_path, attention="masked")
    assert list(tmp_path.iterdir()) == []



def test_class_names_and_steering_given_with_a_bundle_are_checked_too(exported, tmp_path):
    """The checks made for a GatedViT source were skipped for a bundle directory: two names for
    five classes, or a 64-wide table for 128-wide steering, were written into the export."""
    from .conftest import make_model, make_steering

    narrow = make_steering(make_model(sae_blocks=(1,)))
    assert narrow.width == 64
    with pytest.raises(InputError, match="2 class names for a model with 5 classes"):
        to_onnx(exported.bundle, tmp_path / "m.onnx", class_names=["a", "b"])
    # ... and held to what save_bundle holds them to: a list of unique strings, one per class
    with pytest.raises(InputError, match="class names must be a list of strings, got the single str 'abcde'"):
        to_onnx(exported.bundle, tmp_path / "m.onnx", class_names="abcde")
    with pytest.raises(InputError, match=r"class names must be unique.*repeated: \['a'\]"):
        to_onnx(exported.bundle, tmp_path / "m.onnx", class_names=["a", "a", "b", "c", "d"])
    with pytest.raises(InputError, match="class names must be strings, got int 0"):
        to_onnx(exported.model, tmp_path / "m.onnx", class_names=range(5))
    with pytest.raises(InputError, match="steering table is 64 wide; the model's steer_width is 128"):
        to_onnx(exported.bundle, tmp_path / "m.onnx", steering=narrow)
    assert list(tmp_path.iterdir()) == []

def test_checker_failure_leaves_nothing_on_disk(exported, tmp_path, monkeypatch):
    import headsteer.export.onnx_export as onnx_export

    proto = onnx.load(str(exported.onnx["masked"]))
    del proto.metadata_props[:]
    monkeypatch.setattr(onnx_export, "export_proto", lambda *args, **kwargs: proto)

    def failing_check(*args, **kwargs):
        raise onnx.checker.ValidationError("planted failure")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    with pytest.raises(ExportError, match="planted failure"):
        to_onnx(exported.bundle, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_names_the_extra(exported, monkeypatch):
    from headsteer.export.onnx_runner import OnnxRunner
    from headsteer.runtime.bundle import load_bundle

    _, info = load_bundle(exported.bundle)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"headsteer\[onnx\]' \(CPU\) or pip install 'headsteer\[gpu\]' \(onnxruntime-gpu; install only one"):
        OnnxRunner(info, onnx_path=exported.onnx["masked"])


def test_onnx_file_from_another_model_is_rejected(exported, tmp_path):
    from headsteer.runtime.engine import Engine

    proto = onnx.load(str(exported.onnx["masked"]))
    for prop in proto.metadata_props:
        if prop.key == "headsteer.class_names":
            prop.value = json.dumps(["a", "b", "c", "d", "e"])
    other = tmp_path / "other.onnx"
    onnx.save(proto, str(other))
    with pytest.raises(BundleError, match="class_names"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=other)
    with pytest.raises(InputError, match="does not exist"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=tmp_path / "missing.onnx")
    with pytest.raises(InputError, match="provider"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=exported.onnx["masked"], providers=["NoSuchExecutionProvider"])



@pytest.mark.parametrize("content", [b"not an onnx file", b""])
def test_unreadable_onnx_file_is_a_clear_error(exported, tmp_path, content):
    """A corrupt or empty file raised ONNX Runtime's own InvalidProtobuf/InvalidArgument (no
    headsteer error, so a bare traceback) from deep inside the session constructor."""
    from headsteer.runtime.engine import Engine

    path = tmp_path / "broken.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=r"ONNX Runtime cannot load .*broken\.onnx as a model: .*Load model from"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=path)

def test_onnx_file_with_another_head_count_is_rejected(exported, tmp_path):
    """Same classes, steering width, image size and gated blocks, but 6 heads per block where
    the bundle has 3: the metadata check alone let it through (head masks of the wrong width)."""
    from headsteer.runtime.engine import Engine

    from .conftest import MODEL_KWARGS, make_model

    wider = make_model(timm_kwargs=dict(MODEL_KWARGS["timm_kwargs"], num_heads=6))
    assert wider.num_heads == 6 and wider.steer_width == exported.model.steer_width
    other = to_onnx(wider, tmp_path / "six_heads.onnx", class_names=CLASS_NAMES, write_steering=False)
    with pytest.raises(BundleError, match=r"six_heads.onnx was exported from another model: its head_mask shape without the batch is \[2, 6\]"):
        Engine.load(exported.bundle, backend="onnxruntime", onnx_path=other)


def test_cli_export_and_its_errors(exported, tmp_path, capsys):
    from headsteer.runtime.cli import main

    out = exported.onnx["sparse"]  # written by `headsteer export ... --attention sparse` in conftest
    onnx.checker.check_model(str(out), full_check=True)
    assert read_metadata(out)["attention"] == "sparse"
    assert steering_path_for(out).is_file()
    stamp = out.stat().st_mtime_ns
    assert main(["export", str(exported.bundle), "--format", "onnx", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == stamp
    assert main(["export", str(tmp_path / "nope"), "--format", "onnx", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not a bundle" in capsys.readouterr().err
    assert main(["export", str(exported.bundle), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--opset", "9"]) == 2
    assert "opset" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_weights_over_the_cap_go_to_a_sidecar_written_atomically(exported, tmp_path, monkeypatch):
    """With the size threshold lowered, the tiny model takes the >2 GiB path: `m.onnx` plus
    `m.onnx.data`, both renamed into place; a re-export replaces the sidecar (onnx appends to an
    existing one), and a failed export leaves the previous files as they were and nothing else."""
    import headsteer.export.onnx_export as onnx_export
    from headsteer.export.onnx_runner import OrtCallable, build_session

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / "m.onnx"
    sidecar = onnx_export.external_data_path(out)
    to_onnx(exported.bundle, out, write_steering=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert out.stat().st_size < 200_000 < sidecar.stat().st_size  # the weights are in the sidecar
    pixels = torch.randn(2, 3, 32, 32)
    ort_run = OrtCallable(build_session(out, ["CPUExecutionProvider"]), exported.model.steer_width)
    inline_run = OrtCallable(build_session(exported.onnx["masked"], ["CPUExecutionProvider"]), exported.model.steer_width)
    torch.testing.assert_close(ort_run(pixels)[0], inline_run(pixels)[0])

    size = sidecar.stat().st_size
    to_onnx(exported.bundle, out, write_steering=False)
    assert sidecar.stat().st_size == size
    before = (out.read_bytes(), sidecar.read_bytes())

    def failing_check(*args, **kwargs):
        raise onnx.checker.ValidationError("planted failure")

    monkeypatch.setattr(onnx.checker, "check_model", failing_check)
    for target in (out, tmp_path / "n.onnx"):
        with pytest.raises(ExportError, match="planted failure"):
            to_onnx(exported.bundle, target, write_steering=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert (out.read_bytes(), sidecar.read_bytes()) == before


def test_a_steering_file_named_elsewhere_is_recorded_and_not_with_rows_beside_the_model(exported, tmp_path):
    """steering_file is for rows the caller writes elsewhere (the Triton repository's); asked
    together with rows beside the model it is refused before anything is exported."""
    path = to_onnx(exported.bundle, tmp_path / "m.onnx", write_steering=False, steering_file="../rows.json")
    assert read_metadata(path)["steering_file"] == "../rows.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    with pytest.raises(InputError, match="steering_file names rows written elsewhere"):
        to_onnx(exported.bundle, tmp_path / "n.onnx", steering_file="../rows.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@pytest.fixture
def traced(exported, monkeypatch):
    """to_onnx without the trace: export_proto hands back the masked graph exported once (its
    metadata cleared), so a test of what to_onnx records, refuses or writes costs no export."""
    import headsteer.export.onnx_export as onnx_export

    proto = onnx.load(str(exported.onnx["masked"]))
    del proto.metadata_props[:]

    def fresh(*args, **kwargs):
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        return copy

    monkeypatch.setattr(onnx_export, "export_proto", fresh)


def test_metadata_records_the_bundles_normalization_or_the_one_given(exported, tmp_path, traced):
    """A client normalizes pixels with `headsteer.normalization`: it must be the bundle's own
    mean/std (not ImageNet's), or the mean/std passed to to_onnx."""
    from headsteer.runtime.bundle import save_bundle

    mean, std = [0.5, 0.25, 0.125], [0.2, 0.3, 0.4]
    bundle = save_bundle(exported.model, tmp_path / "grey", class_names=CLASS_NAMES, mean=mean, std=std)
    recorded = read_metadata(to_onnx(bundle, tmp_path / "own.onnx", write_steering=False))["normalization"]
    assert recorded == {"mean": pytest.approx(mean), "std": pytest.approx(std)}
    given = to_onnx(exported.bundle, tmp_path / "given.onnx", write_steering=False, mean=std, std=mean)
    assert read_metadata(given)["normalization"] == {"mean": pytest.approx(std), "std": pytest.approx(mean)}


def test_without_steering_rows_the_metadata_names_no_steering_file(exported, tmp_path, traced):
    path = to_onnx(exported.bundle, tmp_path / "m.onnx", write_steering=False)
    assert read_metadata(path)["steering_file"] == ""
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_load_steering_refuses_a_file_of_another_format(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"format": "something-else", "rows": {"a": {"steer_scale": [1.0], "steer_shift": [0.0]}}}))
    with pytest.raises(InputError, match="is not a headsteer-steering file"):
        load_steering(path)


def test_read_metadata_leaves_out_properties_of_other_producers(exported):
    proto = onnx.load(str(exported.onnx["masked"]), load_external_data=False)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "author", "someone"
    assert read_metadata(proto) == read_metadata(exported.onnx["masked"])


def test_every_documented_opset_is_accepted_and_none_outside(exported, tmp_path, traced):
    from headsteer.export.onnx_export import MAX_OPSET, MIN_OPSET

    assert (MIN_OPSET, MAX_OPSET) == (18, 23)
    for opset in (MIN_OPSET, MAX_OPSET):
        to_onnx(exported.bundle, tmp_path / f"m{opset}.onnx", opset=opset, write_steering=False)
    for opset in (MIN_OPSET - 1, MAX_OPSET + 1, 18.0, "18"):
        with pytest.raises(InputError, match=r"opset must be an integer in \[18, 23\]"):
            to_onnx(exported.bundle, tmp_path / "bad.onnx", opset=opset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m18.onnx", "m23.onnx"]


def test_an_existing_file_is_kept_without_overwrite(exported, tmp_path, traced):
    """to_onnx(..., overwrite=False) refuses an existing model file before anything is written
    (the CLI checks this too, but the API is documented to)."""
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    with pytest.raises(InputError, match="already exists"):
        to_onnx(exported.bundle, out, overwrite=False)
    assert out.read_bytes() == b"keep me" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_export_leaves_a_training_model_in_training_mode(tmp_path):
    """The trace runs in eval mode; the caller's model comes back in the mode it was in."""
    from .conftest import make_model

    model = make_model().train()
    to_onnx(model, tmp_path / "m.onnx", write_steering=False)
    assert model.training and all(module.training for module in model.modules())


def test_metadata_and_signature_follow_a_single_channel_model(tmp_path):
    from .conftest import MODEL_KWARGS, make_model

    grey = make_model(timm_kwargs=dict(MODEL_KWARGS["timm_kwargs"], in_chans=1))
    path = to_onnx(grey, tmp_path / "grey.onnx", class_names=CLASS_NAMES, write_steering=False)
    assert read_metadata(path)["in_chans"] == 1
    pixels = next(v for v in onnx.load(str(path)).graph.input if v.name == "pixel_values")
    assert dims(pixels)[1:] == [1, 32, 32]

"""TensorRT engines: build from both ONNX variants, run through Engine, compare with compact.

These need the `tensorrt` package and a CUDA device and skip with that reason elsewhere; the
error paths for a machine without them, the load-time checks and a build against a fake tensorrt
module run everywhere."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from headsteer.export._common import ExportError, MissingDependencyError
from headsteer.runtime.errors import BundleError, InputError

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except ImportError:
    HAVE_TENSORRT = False
HAVE_CUDA = torch.cuda.is_available()
needs_tensorrt = pytest.mark.skipif(
    not (HAVE_TENSORRT and HAVE_CUDA),
    reason="needs the tensorrt package (pip install 'headsteer[tensorrt]') and a CUDA device"
    + ("" if HAVE_TENSORRT else "; tensorrt is not installed")
    + ("" if HAVE_CUDA else "; torch sees no CUDA device"),
)


@pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")
def test_without_tensorrt_the_error_names_the_extra(exported, tmp_path):
    from headsteer.export.tensorrt import build_engine

    with pytest.raises(MissingDependencyError, match=r"headsteer\[tensorrt\]"):
        build_engine(exported.bundle, tmp_path / "m.plan")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not HAVE_TENSORRT or HAVE_CUDA, reason="only on a machine with tensorrt and no CUDA device")
def test_without_cuda_the_error_says_so(exported, tmp_path):
    from headsteer.export.tensorrt import build_engine

    with pytest.raises(MissingDependencyError, match="CUDA"):
        build_engine(exported.bundle, tmp_path / "m.plan")


def test_batch_profile_arguments_are_checked(exported, tmp_path):
    from headsteer.export.tensorrt import _check_batches

    with pytest.raises(InputError, match="min <= opt <= max"):
        _check_batches(4, 2, 8)
    with pytest.raises(InputError, match="positive"):
        _check_batches(0, 1, 8)


def test_engine_io_dims_are_checked_against_the_bundle(exported):
    """What the runner checks at load (a plan carries no metadata, only tensor shapes)."""
    from headsteer.export.onnx_runner import check_io_dims
    from headsteer.runtime.bundle import load_bundle

    _, info = load_bundle(exported.bundle)
    good = dict(pixel_values=[3, 32, 32], steer_scale=[128], steer_shift=[128], logits=[5], head_mask=[2, 3])
    check_io_dims(good, info, "m.plan")
    check_io_dims({**good, "head_mask": [-1, 3]}, info, "m.plan")  # (a dim the engine leaves open is not compared)
    for name, dims in dict(pixel_values=[3, 16, 16], steer_scale=[64], steer_shift=[64], logits=[4], head_mask=[2, 4]).items():
        with pytest.raises(BundleError, match=re.escape(f"m.plan was exported from another model: its {name} shape without the batch is {dims}")):
            check_io_dims({**good, name: dims}, info, "m.plan")


class FakeContext:
    """An execution context whose set_input_shape / set_tensor_address answer as told."""

    def __init__(self, shape_ok=True, address_ok=True):
        self.shape_ok, self.address_ok, self.calls = shape_ok, address_ok, []

    def set_input_shape(self, name, shape):
        self.calls.append(("shape", name))
        return self.shape_ok

    def set_tensor_address(self, name, address):
        self.calls.append(("address", name))
        return self.address_ok


def test_a_shape_or_address_tensorrt_refuses_is_an_input_error():
    from headsteer.export.tensorrt import _bind

    tensor = torch.zeros(40, 3, 32, 32)
    context = FakeContext(shape_ok=False)
    with pytest.raises(InputError, match=r"pixel_values of shape \[40, 3, 32, 32\] is outside .* \(batch 1 to 32"):
        _bind(context, "pixel_values", tensor, (1, 32), is_input=True)
    assert context.calls == [("shape", "pixel_values")]
    with pytest.raises(InputError, match=r"refused the address of logits .*batch 1 to 32"):
        _bind(FakeContext(address_ok=False), "logits", torch.zeros(4, 5), (1, 32), is_input=False)
    context = FakeContext()
    _bind(context, "logits", torch.zeros(4, 5), (1, 32), is_input=False)
    assert context.calls == [("address", "logits")]


def test_steering_rows_of_another_batch_are_refused_before_tensorrt_runs():
    """pixels [2, ...] with steer_scale [3, S]: each fits the profile alone, so TensorRT would
    accept both shapes and fail only at execution ("TensorRT execution failed")."""
    from headsteer.export.tensorrt import TensorRTRunner

    runner = TensorRTRunner.__new__(TensorRTRunner)  # no engine: the check must come first
    runner.min_batch, runner.max_batch, runner.steer_width = 1, 32, 128
    pixels = torch.zeros(2, 3, 32, 32)
    for scale, shift, name in ((torch.ones(3, 128), None, "steer_scale"), (None, torch.zeros(2, 64), "steer_shift")):
        with pytest.raises(InputError, match=re.escape(f"{name} must be [B, S_total] = [2, 128]")):
            runner(pixels, scale, shift)


class FakeTensorRT:
    """Just enough of the tensorrt module for `build_engine` to run without it (or a GPU): the
    parser accepts the file, and the "engine" serializes to b"plan" (or fails, when told)."""

    __version__ = "10.0.0"
    NetworkDefinitionCreationFlag = SimpleNamespace(STRONGLY_TYPED=1)
    MemoryPoolType = SimpleNamespace(WORKSPACE="workspace")
    BuilderFlag = SimpleNamespace(TF32="tf32")

    class Logger:
        WARNING = 0

        def __init__(self, level):
            pass

    def __init__(self, build_ok=True):
        self.build_ok, self.cleared_flags, self.profile_shapes = build_ok, [], {}

    def Builder(self, logger):
        inputs = [SimpleNamespace(name="pixel_values", shape=(-1, 3, 32, 32)), SimpleNamespace(name="steer_scale", shape=(-1, 128))]
        network = SimpleNamespace(num_inputs=len(inputs), get_input=inputs.__getitem__)
        config = SimpleNamespace(
            set_memory_pool_limit=lambda pool, size: None,
            clear_flag=self.cleared_flags.append,
            add_optimization_profile=lambda profile: None,
        )
        return SimpleNamespace(
            create_network=lambda flags: network,
            create_builder_config=lambda: config,
            create_optimization_profile=lambda: SimpleNamespace(set_shape=lambda name, *shapes: self.profile_shapes.update({name: shapes})),
            build_serialized_network=lambda network, config: b"plan" if self.build_ok else None,
        )

    def OnnxParser(self, network, logger):
        return SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)


@pytest.fixture
def fake_tensorrt(monkeypatch):
    import headsteer.export.tensorrt as tensorrt_module

    def install(**kwargs):
        fake = FakeTensorRT(**kwargs)
        monkeypatch.setattr(tensorrt_module, "_tensorrt", lambda: fake)
        monkeypatch.setattr(tensorrt_module, "_require_cuda", lambda what: None)
        return fake

    return install


def test_build_turns_tf32_off_and_writes_the_steering_rows_beside_the_plan(exported, tmp_path, fake_tensorrt):
    from headsteer.export import steering_path_for
    from headsteer.export.tensorrt import build_engine

    trt = fake_tensorrt()
    plan = build_engine(exported.bundle, tmp_path / "m.plan", max_batch=8)
    assert plan.read_bytes() == b"plan"
    assert trt.cleared_flags == [trt.BuilderFlag.TF32]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.plan", "m.plan.json", "m.steering.json"]
    # The same document as the ONNX export writes beside FILE.onnx.
    expected = json.loads(steering_path_for(exported.onnx["masked"]).read_text())
    assert json.loads(steering_path_for(plan).read_text()) == expected


def test_profile_defaults_to_an_opt_batch_within_a_small_max_batch(exported, tmp_path, fake_tensorrt):
    """build_engine(..., max_batch=4) (and Engine.load's tensorrt runner, which passes its
    options on) without opt_batch: the profile is tuned for 4, not refused for opt 8 > max 4."""
    from headsteer.export.tensorrt import build_engine

    trt = fake_tensorrt()
    build_engine(exported.bundle, tmp_path / "m.plan", max_batch=4)
    assert trt.profile_shapes == {
        "pixel_values": ([1, 3, 32, 32], [4, 3, 32, 32], [4, 3, 32, 32]),
        "steer_scale": ([1, 128], [4, 128], [4, 128]),
    }


def test_a_directory_as_the_plan_path_is_refused_before_the_build(exported, tmp_path, fake_tensorrt):
    from headsteer.export.tensorrt import build_engine

    fake_tensorrt()
    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match="is a directory"):
        build_engine(exported.bundle, tmp_path / "out", max_batch=8)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


def test_a_source_that_is_no_onnx_file_is_a_clear_error(tmp_path, fake_tensorrt):
    """E.g. a .plan given where the ONNX file is expected: an InputError naming the file, not
    protobuf's bare DecodeError."""
    from headsteer.export.tensorrt import build_engine

    fake_tensorrt()
    source = tmp_path / "model.plan"
    source.write_bytes(b"\x00not an onnx file" * 8)
    with pytest.raises(InputError, match="model.plan is not a readable ONNX file"):
        build_engine(source, tmp_path / "m.plan", max_batch=8)
    assert [p.name for p in tmp_path.iterdir()] == ["model.plan"]


def test_failed_build_writes_neither_plan_nor_steering(exported, tmp_path, fake_tensorrt):
    from headsteer.export.tensorrt import build_engine

    fake_tensorrt(build_ok=False)
    with pytest.raises(ExportError, match="failed to build"):
        build_engine(exported.bundle, tmp_path / "m.plan", max_batch=8)
    assert list(tmp_path.iterdir()) == []


@needs_tensorrt
@pytest.mark.parametrize("variant", ("masked", "sparse"))
def test_engine_parity_fp32(exported, tmp_path, variant):
    from headsteer.export.tensorrt import build_engine
    from headsteer.runtime.engine import Engine

    plan = build_engine(exported.onnx[variant], tmp_path / f"{variant}.plan", min_batch=1, opt_batch=4, max_batch=16)
    engine = Engine.load(exported.bundle, backend="tensorrt", device="cuda", engine_path=plan)
    reference = Engine.load(exported.bundle, backend="compact")
    for batch in (1, 3, 16):
        pixels = torch.randn(batch, 3, 32, 32)
        for steer in (None, "bowl"):
            with torch.no_grad():
                scale, shift = reference.steering_vectors(steer, batch)
                gate_logits = exported.model(pixels, scale, shift, backend="reference").gate_logits
            got, expected = engine.predict(pixels, steer=steer), reference.predict(pixels, steer=steer)
            # TensorRT's fp32 kernels sum in another order than torch's: compare masks where decisions are clear.
            clear = gate_logits.abs() > 1e-2
            assert torch.equal(got.head_mask[clear], expected.head_mask[clear])
            if torch.equal(got.head_mask, expected.head_mask):
                torch.testing.assert_close(got.logits, expected.logits, atol=1e-2, rtol=1e-2)
    with pytest.raises(InputError, match="optimization profile"):
        engine.predict(torch.randn(17, 3, 32, 32))


@needs_tensorrt
@pytest.mark.parametrize("precision", ("fp16", "bf16"))
def test_reduced_precision_engines_build_and_run(exported, tmp_path, precision):
    from headsteer.export.tensorrt import build_engine
    from headsteer.runtime.engine import Engine

    plan = build_engine(exported.bundle, tmp_path / f"{precision}.plan", precision=precision, max_batch=8)
    engine = Engine.load(exported.bundle, backend="tensorrt", device="cuda", engine_path=plan)
    reference = Engine.load(exported.bundle, backend="compact")
    pixels = torch.randn(8, 3, 32, 32)
    got, expected = engine.predict(pixels), reference.predict(pixels)
    assert got.head_mask.dtype == torch.bool and got.logits.dtype == torch.float32
    assert (got.head_mask == expected.head_mask).float().mean() > 0.9
    assert (got.labels == expected.labels).float().mean() > 0.7


@needs_tensorrt
def test_triton_repository_with_a_plan(exported, tmp_path):
    from headsteer.export.triton_repo import parse_pbtxt, write_triton_repo

    model_dir = write_triton_repo(exported.bundle, tmp_path / "repo", engine="plan", max_batch_size=8)
    assert (model_dir / "1" / "model.plan").is_file() and not (model_dir / "1" / "model.onnx").exists()
    config = parse_pbtxt((model_dir / "config.pbtxt").read_text())
    assert config["platform"] == "tensorrt_plan" and config["max_batch_size"] == 8


def test_a_failed_build_inside_the_runner_leaves_no_temporary_folder(exported, tmp_path, fake_tensorrt, monkeypatch):
    """TensorRTRunner without engine_path builds into a temporary folder; a build that fails
    (or options build_engine refuses) must not leave that folder behind."""
    import contextlib
    import tempfile

    from headsteer.export.tensorrt import TensorRTRunner
    from headsteer.runtime.bundle import load_bundle

    _, info = load_bundle(exported.bundle)
    temp_root = tmp_path / "tmp"
    temp_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp_root))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda where: contextlib.nullcontext())
    fake_tensorrt(build_ok=False)
    with pytest.raises(ExportError, match="failed to build"):
        TensorRTRunner(info, device="cuda", max_batch=8)
    assert list(temp_root.iterdir()) == []
    with pytest.raises(InputError, match="min <= opt <= max"):
        TensorRTRunner(info, device="cuda", min_batch=4, opt_batch=2, max_batch=8)
    assert list(temp_root.iterdir()) == []


@pytest.mark.parametrize("workspace_gib", (0, -1.0, float("nan"), float("inf"), "4", True))
def test_a_bad_workspace_size_is_refused_before_the_export(exported, tmp_path, fake_tensorrt, workspace_gib):
    """Not a pybind TypeError (or a silent 0-byte pool) after the ONNX export ran."""
    from headsteer.export.tensorrt import build_engine

    fake_tensorrt()
    with pytest.raises(InputError, match="workspace_gib must be a positive number"):
        build_engine(exported.bundle, tmp_path / "m.plan", max_batch=8, workspace_gib=workspace_gib)
    assert list(tmp_path.iterdir()) == []


class FakeEngine:
    """A deserialized engine with the contract's I/O (batch dynamic, 1 to 32 in profile 0)."""

    SHAPES = dict(pixel_values=(-1, 3, 32, 32), steer_scale=(-1, 128), steer_shift=(-1, 128), logits=(-1, 5), head_mask=(-1, 2, 3))

    def __init__(self, trt, context="context"):
        self.trt, self.context, self.names = trt, context, list(self.SHAPES)
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, index):
        return self.names[index]

    def get_tensor_dtype(self, name):
        return self.trt.bool if name == "head_mask" else self.trt.float32

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name in ("pixel_values", "steer_scale", "steer_shift") else self.trt.TensorIOMode.OUTPUT

    def get_tensor_shape(self, name):
        return self.SHAPES[name]

    def get_tensor_profile_shape(self, name, profile):
        shape = self.SHAPES[name]
        return [(1, *shape[1:]), (8, *shape[1:]), (32, *shape[1:])]

    def create_execution_context(self):
        return self.context


@pytest.fixture
def fake_runtime(fake_tensorrt, monkeypatch, tmp_path):
    """fake_tensorrt plus a Runtime that deserializes any file into a FakeEngine, and torch.cuda
    stand-ins (device, Stream, current_device) for a machine without a GPU. Returns (trt, plan,
    devices entered)."""
    import contextlib

    def install(current_device=0, **engine_kwargs):
        trt = fake_tensorrt()
        trt.float32, trt.float16, trt.int32, trt.int8, trt.bool = "float32", "float16", "int32", "int8", "bool"
        trt.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
        trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: FakeEngine(trt, **engine_kwargs))
        entered = []

        @contextlib.contextmanager
        def device(where):
            entered.append(torch.device(where))
            yield

        monkeypatch.setattr(torch.cuda, "device", device)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: SimpleNamespace(device=device))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current_device)
        plan = tmp_path / "m.plan"
        plan.write_bytes(b"plan")
        return trt, plan, entered

    return install


def test_the_runner_pins_the_gpu_that_is_current_at_load(exported, fake_runtime):
    """device="cuda" is the GPU current when the engine is deserialized: a call from another thread
    (whose current GPU is 0 by default) must feed that GPU, not its own current one."""
    from headsteer.export.tensorrt import TensorRTRunner
    from headsteer.runtime.bundle import load_bundle

    _, info = load_bundle(exported.bundle)
    _, plan, entered = fake_runtime(current_device=1)
    runner = TensorRTRunner(info, device="cuda", engine_path=plan)
    assert runner.device == torch.device("cuda", 1)
    assert entered == [torch.device("cuda", 1)]
    assert (runner.min_batch, runner.max_batch) == (1, 32)
    assert TensorRTRunner(info, device="cuda:0", engine_path=plan).device == torch.device("cuda", 0)


def test_an_execution_context_tensorrt_cannot_create_is_an_error_at_load(exported, fake_runtime):
    """createExecutionContext answers nullptr (None) when it cannot allocate the activation memory;
    that is an error at load, not an AttributeError on None at the first call."""
    from headsteer.export.tensorrt import TensorRTRunner
    from headsteer.runtime.bundle import load_bundle

    _, info = load_bundle(exported.bundle)
    _, plan, _ = fake_runtime(context=None)
    with pytest.raises(ExportError, match="could not create an execution context"):
        TensorRTRunner(info, device="cuda:0", engine_path=plan)


def test_an_input_view_off_tensorrts_alignment_is_bound_as_an_aligned_copy():
    """setTensorAddress: "The pointer must have at least 256-byte alignment". A contiguous view
    that starts inside its allocation (e.g. images[3:7] of a CUDA batch, rows not a multiple of
    256 bytes) passes .contiguous() unchanged; it is copied, an aligned tensor is not."""
    from headsteer.export.tensorrt import TENSOR_ALIGNMENT, _aligned

    assert TENSOR_ALIGNMENT == 256
    base = torch.arange(600, dtype=torch.float32)
    skew = base[1:257]
    assert skew.data_ptr() % 256 != 0
    copy = _aligned(skew)
    assert copy.data_ptr() != skew.data_ptr() and torch.equal(copy, skew) and copy.is_contiguous()
    start = (-base.data_ptr() % 256) // 4
    straight = base[start:start + 256]
    assert straight.data_ptr() % 256 == 0 and _aligned(straight) is straight


def test_a_runner_that_builds_its_engine_builds_it_on_its_own_gpu(exported, fake_runtime, monkeypatch):
    """TensorRT builds for the current CUDA device; the runner for cuda:1 must build there, not on
    whichever GPU is current, or the plan it then deserializes on cuda:1 is another GPU's."""
    import headsteer.export.tensorrt as tensorrt_module
    from headsteer.runtime.bundle import load_bundle

    _, info = load_bundle(exported.bundle)
    _, _, entered = fake_runtime(current_device=0)
    during_build = []

    def fake_build(source, plan_path, **options):
        during_build.append(list(entered))
        plan_path.write_bytes(b"plan")
        return plan_path

    monkeypatch.setattr(tensorrt_module, "build_engine", fake_build)
    tensorrt_module.TensorRTRunner(info, device="cuda:1", max_batch=8)
    assert during_build == [[torch.device("cuda", 1)]]


def test_a_plan_from_an_onnx_file_carries_that_files_steering_rows_and_no_stale_ones(exported, tmp_path, fake_tensorrt):
    """Built from an .onnx file, the plan gets the steering rows to_onnx wrote beside that file; a
    rows file another model left beside the plan is refused without overwrite and replaced (or
    removed, when the source has none) with it, never kept beside a plan it does not describe."""
    import shutil

    from headsteer.export import steering_path_for
    from headsteer.export.tensorrt import build_engine

    fake_tensorrt()
    source = exported.onnx["masked"]
    stale = steering_path_for(tmp_path / "m.plan")
    stale.write_text('{"classes": ["someone else"]}')
    with pytest.raises(InputError, match="m.steering.json already exists beside the model and holds other"):
        build_engine(source, tmp_path / "m.plan", max_batch=8, overwrite=False)
    assert not (tmp_path / "m.plan").exists()
    build_engine(source, tmp_path / "m.plan", max_batch=8)
    assert stale.read_text() == steering_path_for(source).read_text()
    build_engine(source, tmp_path / "m2.plan", max_batch=8, overwrite=False)  # the same rows: rewritten
    (tmp_path / "m2.plan").unlink()
    steering_path_for(tmp_path / "m2.plan").write_text(stale.read_text())
    build_engine(source, tmp_path / "m2.plan", max_batch=8, overwrite=False)
    bare = tmp_path / "bare.onnx"  # an export without its rows file
    shutil.copy(source, bare)
    build_engine(bare, tmp_path / "m.plan", max_batch=8)
    assert not stale.exists()


def test_the_readme_export_sequence_onnx_then_tensorrt_into_one_folder(exported, tmp_path, fake_tensorrt):
    """`headsteer export B --format onnx --out model.onnx`, then `--format tensorrt --out
    model.plan` (no --overwrite): both write model.steering.json, the same rows."""
    from headsteer.export import steering_path_for
    from headsteer.runtime.cli import main

    fake_tensorrt()
    bundle = str(exported.bundle)
    assert main(["export", bundle, "--format", "onnx", "--out", str(tmp_path / "model.onnx")]) == 0
    rows = steering_path_for(tmp_path / "model.onnx").read_text()
    assert main(["export", bundle, "--format", "tensorrt", "--out", str(tmp_path / "model.plan"), "--max-batch", "8"]) == 0
    assert (tmp_path / "model.plan").read_bytes() == b"plan"
    assert steering_path_for(tmp_path / "model.plan").read_text() == rows


def test_the_plan_description_binds_the_plan_to_the_bundles_weights(exported, tmp_path, fake_tensorrt):
    """A plan carries no metadata: `m.plan.json` beside it records the source's headsteer metadata
    (the bundle's weights checksum among it), the build's options and the plan's own sha256."""
    import hashlib

    from headsteer.export import read_metadata
    from headsteer.export.tensorrt import build_engine, plan_description_path
    from headsteer.runtime.bundle import WEIGHTS_FILE, load_bundle

    fake_tensorrt()
    plan = build_engine(exported.bundle, tmp_path / "m.plan", precision="fp16", min_batch=2, opt_batch=3, max_batch=8)
    description = json.loads(plan_description_path(plan).read_text())
    _, info = load_bundle(exported.bundle)
    assert description["format"] == "headsteer-tensorrt-plan" and description["format_version"] == 1
    assert description["plan_sha256"] == hashlib.sha256(b"plan").hexdigest()
    assert description["tensorrt_version"] == "10.0.0" and description["precision"] == "fp16"
    assert description["profile"] == {"min_batch": 2, "opt_batch": 3, "max_batch": 8}
    assert description["onnx"]["weights_sha256"] == "sha256:" + info.config["files"][WEIGHTS_FILE]
    assert description["onnx"]["class_names"] == list(exported.steering.class_names)
    # Built from the ONNX file: that file's own metadata.
    from_file = build_engine(exported.onnx["sparse"], tmp_path / "s.plan", max_batch=8)
    described = json.loads(plan_description_path(from_file).read_text())["onnx"]
    assert described == json.loads(json.dumps(read_metadata(exported.onnx["sparse"])))
    assert described["attention"] == "sparse"


def test_a_plan_without_headsteer_metadata_gets_no_description_and_loses_a_stale_one(exported, tmp_path, fake_tensorrt):
    """An ONNX file of another exporter has nothing to describe a plan with; a description an
    older build left beside the plan path would describe other bytes, so it is removed."""
    import onnx

    from headsteer.export.tensorrt import build_engine, plan_description_path

    fake_tensorrt()
    proto = onnx.load(str(exported.onnx["masked"]))
    del proto.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(proto, str(foreign))
    stale = plan_description_path(tmp_path / "m.plan")
    stale.write_text('{"format": "headsteer-tensorrt-plan"}')
    build_engine(foreign, tmp_path / "m.plan", max_batch=8)
    assert (tmp_path / "m.plan").read_bytes() == b"plan" and not stale.exists()


def test_the_runner_refuses_a_plan_of_other_weights_or_a_replaced_plan_before_deserializing(exported, tmp_path, fake_tensorrt, fake_runtime):
    """The twin of the ONNX runner's weights check: the description's weights checksum against
    the bundle's, and its plan sha256 against the plan's bytes (a plan replaced by hand keeps a
    description of other bytes). Both fail before TensorRT deserializes anything; a plan without
    a description (trtexec's, older builds) still loads."""
    from headsteer.export.tensorrt import TensorRTRunner, build_engine, plan_description_path
    from headsteer.runtime.bundle import load_bundle, save_bundle

    from .conftest import CLASS_NAMES, make_model, make_steering

    trt, _, _ = fake_runtime()
    deserialized = []
    trt.Runtime = lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: deserialized.append(data) or FakeEngine(trt))
    plan = build_engine(exported.bundle, tmp_path / "model.plan", max_batch=8)
    _, info = load_bundle(exported.bundle)
    runner = TensorRTRunner(info, device="cuda:0", engine_path=plan)
    assert runner.description["plan_sha256"] and deserialized == [b"plan"]

    other = make_model(seed=1)
    _, other_info = load_bundle(save_bundle(other, tmp_path / "other", class_names=CLASS_NAMES, steering=make_steering(other)))
    with pytest.raises(BundleError, match=r"model.plan was exported from another model: its weights_sha256 is"):
        TensorRTRunner(other_info, device="cuda:0", engine_path=plan)
    plan.write_bytes(b"another plan")
    with pytest.raises(BundleError, match=r"model.plan.json describes another plan than .*model.plan .*delete model.plan.json"):
        TensorRTRunner(info, device="cuda:0", engine_path=plan)
    for text in ("{not json", '["a list"]', '{"format": "headsteer-tensorrt-plan"}'):
        plan_description_path(plan).write_text(text)
        with pytest.raises(BundleError, match=r"model.plan.json beside the plan is not a (readable|headsteer) plan description"):
            TensorRTRunner(info, device="cuda:0", engine_path=plan)
    assert deserialized == [b"plan"]
    plan_description_path(plan).unlink()
    assert TensorRTRunner(other_info, device="cuda:0", engine_path=plan).description is None


def test_a_triton_repository_plan_is_described_and_names_its_steering_rows(exported, tmp_path, fake_tensorrt):
    """write_triton_repo(engine="plan") with the real build_engine (a fake TensorRT): the version
    folder holds the plan and its description, whose ONNX metadata points at the repository's
    `steering.json` one level up; no ONNX file is left."""
    from headsteer.export.tensorrt import plan_description_path
    from headsteer.export.triton_repo import write_triton_repo

    fake_tensorrt()
    model_dir = write_triton_repo(exported.bundle, tmp_path / "repo", engine="plan", max_batch_size=8)
    version = model_dir / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.plan", "model.plan.json"]
    description = json.loads(plan_description_path(version / "model.plan").read_text())
    assert description["profile"] == {"min_batch": 1, "opt_batch": 8, "max_batch": 8}
    assert (version / description["onnx"]["steering_file"]).resolve() == (model_dir / "steering.json").resolve()


def test_a_plan_takes_the_rows_its_onnx_file_names_not_whatever_lies_beside_it(exported, tmp_path, fake_tensorrt):
    """The ONNX metadata's steering_file decides: a file exported without rows leaves none beside
    its plan even when another model's `<stem>.steering.json` sits beside it; a file renamed
    together with its rows, and the Triton repository's model.onnx (rows at ../steering.json),
    carry theirs."""
    import shutil

    from headsteer.export import steering_path_for, to_onnx
    from headsteer.export.tensorrt import build_engine
    from headsteer.export.triton_repo import write_triton_repo

    fake_tensorrt()
    rows = steering_path_for(exported.onnx["masked"]).read_text()
    bare = to_onnx(exported.bundle, tmp_path / "bare.onnx", write_steering=False)
    steering_path_for(bare).write_text('{"classes": ["someone else"]}')
    build_engine(bare, tmp_path / "out.plan", max_batch=8)
    assert (tmp_path / "out.plan").is_file() and not steering_path_for(tmp_path / "out.plan").exists()

    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(exported.onnx["masked"], renamed / "vit.onnx")
    shutil.copy(steering_path_for(exported.onnx["masked"]), renamed / "vit.steering.json")
    build_engine(renamed / "vit.onnx", renamed / "vit.plan", max_batch=8)
    assert steering_path_for(renamed / "vit.plan").read_text() == rows

    model_dir = write_triton_repo(exported.bundle, tmp_path / "repo", max_batch_size=8)
    build_engine(model_dir / "1" / "model.onnx", tmp_path / "repo.plan", max_batch=8)
    assert json.loads(steering_path_for(tmp_path / "repo.plan").read_text()) == json.loads((model_dir / "steering.json").read_text())

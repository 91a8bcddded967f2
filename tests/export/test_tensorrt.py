"""TensorRT engines: build from both ONNX variants, run through Engine, compare with compact.

These need the `tensorrt` package and a CUDA device and skip with that reason elsewhere; the
error paths for a machine without them run everywhere."""
from __future__ import annotations

import pytest
import torch

from headsteer.export._common import MissingDependencyError
from headsteer.runtime.errors import InputError

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
            # TF32 may be used by TensorRT's fp32 matmuls: compare masks where decisions are clear.
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

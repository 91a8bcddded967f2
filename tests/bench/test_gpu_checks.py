"""`bench/gpu_checks.sh`, the script a short GPU lease runs in one device call: it parses, and its
steps' time limits, which cut a step rather than the call, add up to less than one call."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_checks.sh"
DEVICE_CALL_SECONDS = 600  # the longest command the device tool runs
INSTALL_AND_PACK_SECONDS = 35  # `pip install --no-deps -e .` there, then the tarball


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_step_limits_fit_one_device_call():
    text = SCRIPT.read_text()
    steps = dict(re.findall(r"^\s*step (\w+) (\d+) ", text, re.MULTILINE))
    assert list(steps) == ["warm_up", "kernels", "tests", "breakdown", "model", "profile", "profile_details",
                           "profile_source", "profile_source_projections", "sweep", "gate_sweep", "tests_variants"]
    total = sum(map(int, steps.values()))
    assert total + INSTALL_AND_PACK_SECONDS <= DEVICE_CALL_SECONDS
    assert f"({total} s in all" in text  # the header says what the limits add up to
    # the warm-up stops itself (and its workers) before its step's limit would kill it alone
    warm_up_seconds = re.search(r"--warm-up .*--seconds (\d+)", text)
    assert warm_up_seconds and int(warm_up_seconds.group(1)) + 5 <= int(steps["warm_up"])


def test_test_steps_split_the_kernel_tests_between_them():
    """The compiled-test steps select with `-k`: `tests` everything but the opt-in variants,
    `tests_variants` those last. Both must select tests (a renamed test could empty a step, which
    a lease would only show as 'no tests ran'), and none runs twice."""
    text = SCRIPT.read_text()
    variants = re.search(r'^variants="([^"]+)"', text, re.MULTILINE).group(1)
    files = re.search(r"^tests=\(python -m pytest .*? -p no:cacheprovider (.+?)\)$", text,
                      re.MULTILINE | re.DOTALL).group(1).split()
    # the model-level parity and CUDA-graph replay first, then every kernel test file (named: a folder would be collected
    # in its own order, and a file left out would never run compiled)
    kernel_files = {str(path.relative_to(SCRIPT.parents[1])) for path in (SCRIPT.parents[1] / "tests" / "kernels").glob("test_*.py")}
    assert files[:2] == ["tests/runtime/test_triton_backend.py", "tests/runtime/test_cuda_graph.py"]
    assert set(files[2:]) == kernel_files

    def collected(expression: str) -> set:
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 "-k", expression, *files], cwd=SCRIPT.parents[1], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return {line for line in result.stdout.splitlines() if "::" in line}

    main, last = collected(f"not ({variants})"), collected(variants)
    assert main and last and not main & last
    assert all("test_tile_variants" in test for test in last)  # (the opt-in tilings only)
    assert any("programmatic-launch" in test for test in last)

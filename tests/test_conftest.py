"""The shared test set-up itself."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_conftest_imports_without_triton():
    """Triton is an extra: without it the kernel tests skip (importorskip) and the rest run. The
    conftest's session-wide import of the Triton kernel modules stopped every test from being
    collected (ModuleNotFoundError: triton) instead."""
    code = "import sys; sys.modules['triton'] = None; import tests.conftest"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

"""Kernel tests run compiled on CUDA, and under Triton's CPU interpreter everywhere else.

`triton.jit` picks interpreted or compiled at decoration time, so TRITON_INTERPRET must be set
before any module defining a kernel is imported: this conftest is loaded before the test
modules of this folder import them."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE

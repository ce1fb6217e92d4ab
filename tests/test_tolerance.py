"""sparsediff.testing.tolerance: dtype-derived atol/rtol and FlashAttention's baseline rule."""

import pytest
import torch

from sparsediff.testing.tolerance import (
    LOW_PRECISION,
    REDUCTION,
    ROUNDING,
    assert_close_as_pytorch,
    assert_within_baseline,
    eps,
    max_error,
    tolerance,
)


def test_tolerance_is_a_multiple_of_eps_scaled_to_the_magnitude():
    assert tolerance(torch.float32) == {"atol": REDUCTION * 2.0**-23, "rtol": REDUCTION * 2.0**-23}
    assert tolerance(torch.float16) == {"atol": LOW_PRECISION * 2.0**-10, "rtol": LOW_PRECISION * 2.0**-10}
    assert tolerance(torch.bfloat16)["rtol"] == LOW_PRECISION * 2.0**-7
    got = tolerance(torch.float64, ulps=ROUNDING, magnitude=8.0)
    assert got == {"atol": ROUNDING * 2.0**-52 * 8.0, "rtol": ROUNDING * 2.0**-52}


def test_tolerance_accepts_rounding_noise_and_rejects_a_real_difference():
    ref = torch.randn(1000, dtype=torch.float64)
    torch.testing.assert_close(ref.float(), ref.float().double().float(), **tolerance(torch.float32, ulps=0))
    torch.testing.assert_close(ref.float().double(), ref, **tolerance(torch.float32, ulps=1))
    with pytest.raises(AssertionError):
        torch.testing.assert_close(ref + 1e-4, ref, **tolerance(torch.float32))


def test_max_error_skips_matching_non_finite_entries():
    ref = torch.tensor([1.0, float("-inf"), 3.0])
    assert max_error(torch.tensor([1.5, float("-inf"), 3.0]), ref) == 0.5
    assert max_error(torch.full((2,), float("-inf")), torch.full((2,), float("-inf"))) == 0.0
    assert max_error(torch.tensor([float("nan"), 2.0]), torch.tensor([float("nan"), 2.5])) == 0.5
    with pytest.raises(AssertionError, match="non-finite"):
        max_error(torch.tensor([1.0, 0.0, 3.0]), ref)
    with pytest.raises(AssertionError, match="non-finite"):
        max_error(torch.tensor([1.0, float("inf"), 3.0]), ref)


def _softmax_case():
    x = torch.randn(64, 256, dtype=torch.float64)
    ref = torch.softmax(x, -1)
    baseline = torch.softmax(x.half(), -1)  # PyTorch's own float16 error on these inputs
    return x, ref, baseline


def test_within_baseline_accepts_a_result_as_good_as_pytorch():
    x, ref, baseline = _softmax_case()
    err = assert_within_baseline(torch.softmax(x.float(), -1).half(), ref, baseline)
    assert err <= max_error(baseline, ref) + eps(torch.float16)


def test_within_baseline_rejects_a_worse_result_and_says_by_how_much():
    x, ref, baseline = _softmax_case()
    base = max_error(baseline, ref)
    bad = (ref + 5 * base).half()
    with pytest.raises(AssertionError, match=r"kernel: max error .* > 2 x baseline error .* \+ floor .*float16"):
        assert_within_baseline(bad, ref, baseline, what="kernel")
    assert_within_baseline(bad, ref, baseline, factor=8)


def test_float32_results_get_a_factor_of_three():
    ref = torch.randn(100, dtype=torch.float64)
    baseline = ref.float() + 1e-3  # both made worse than rounding alone
    assert_within_baseline(ref.float() + 2.5e-3, ref, baseline)
    with pytest.raises(AssertionError, match="3 x baseline"):
        assert_within_baseline(ref.float() + 3.5e-3, ref, baseline)


def test_close_as_pytorch_runs_the_computation_in_float64_and_in_the_dtype():
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    softmax = lambda x: (torch.softmax(x, -1), torch.logsumexp(x, -1))
    assert_close_as_pytorch(tuple(t.bfloat16() for t in softmax(x.float())), softmax, x)
    with pytest.raises(AssertionError, match=r"softmax\[1\]: max error"):
        assert_close_as_pytorch((softmax(x)[0], torch.logsumexp(x.float(), -1) + 0.1), softmax, x, what="softmax")


def test_within_baseline_floor_spares_an_exact_baseline():
    ref = torch.linspace(-2, 2, 101, dtype=torch.float64)
    exact = ref.float()  # rounding the reference is the whole error of both
    assert_within_baseline(exact, ref, exact)
    ulp = eps(torch.float32) * 2  # one epsilon at the largest value: float32 results get 4 of them
    assert_within_baseline((ref + 3 * ulp).float(), ref, exact)
    with pytest.raises(AssertionError, match="floor"):
        assert_within_baseline((ref + 5.5 * ulp).float(), ref, exact)
    half = ref.half()  # float16 results get one
    assert_within_baseline((ref + 0.4 * eps(torch.float16) * 2).half(), ref, half)
    with pytest.raises(AssertionError, match="floor"):
        assert_within_baseline((ref + 2 * eps(torch.float16) * 2).half(), ref, half)

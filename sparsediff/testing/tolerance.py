"""Test tolerances derived from the dtype, following FlashAttention's testing habit.

* Where PyTorch can do the same computation in the tested dtype (the *baseline*), a result may be at most
  ``factor`` times as far from a float32/float64 reference as that baseline is (:func:`assert_within_baseline`;
  :func:`assert_close_as_pytorch` runs one plain-PyTorch computation both ways and applies it).
* Otherwise :func:`tolerance` gives ``atol``/``rtol`` for :func:`torch.testing.assert_close` as a
  documented multiple of the dtype's machine epsilon, ``atol`` scaled to the compared values' magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# Multiples of torch.finfo(dtype).eps, by how differently the two sides were computed.
ROUNDING = 16
"""A few roundings apart: elementwise work reordered, two or three partial results merged or summed. Each
rounding costs at most eps/2 of the magnitude; 16 leaves room for a dozen of them."""
REDUCTION = 128
"""Long reductions in another order (a blocked or online softmax against one full softmax, a matmul tiled
differently): the error grows about as sqrt(n) * eps, and 128 covers n ~ 10^4 with margin."""
LOW_PRECISION = 2
"""float16/bfloat16 results accumulated in float32 and rounded once: that rounding (eps/2 of the magnitude)
plus the rounding of low-precision operands fed to the second matmul (P before P @ V)."""

_DEFAULT_ULPS = {torch.float16: LOW_PRECISION, torch.bfloat16: LOW_PRECISION}
# The baseline rule by result dtype: (factor of the baseline's error, floor in epsilons of the reference's
# largest value). float16/bfloat16: FlashAttention's factor 2, as the roundings to the dtype dominate both
# errors, and one epsilon (twice the rounding of the reference itself). float32/float64: both errors are
# accumulation noise of one size whose maxima swing about 2x between implementations, so 3; and the result's
# closing operations (exp, division, scaling) round a few times more than a baseline's, so 4 epsilons.
_RULE = {torch.float16: (2.0, 1.0), torch.bfloat16: (2.0, 1.0)}
_RULE_DEFAULT = (3.0, 4.0)


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype: the gap between 1 and the next representable number."""
    return torch.finfo(dtype).eps


def tolerance(dtype: torch.dtype, *, ulps: float | None = None, magnitude: float = 1.0) -> dict[str, float]:
    """``{"atol", "rtol"}`` for results of ``dtype``: ``ulps`` epsilons relative, and as much absolute at
    ``magnitude`` (the size of the compared values). ``ulps`` defaults to :data:`LOW_PRECISION` for
    float16/bfloat16 and :data:`REDUCTION` otherwise."""
    e = (_DEFAULT_ULPS.get(dtype, REDUCTION) if ulps is None else ulps) * eps(dtype)
    return {"atol": e * magnitude, "rtol": e}


def max_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest ``|result - reference|`` in float64 over the finite entries of ``reference``; the non-finite
    entries (``-inf`` LSE of an empty row, say) must match exactly, NaN for NaN."""
    r, ref = result.detach().double().cpu(), reference.detach().double().cpu()
    finite = torch.isfinite(ref)
    odd, want = r[~finite], ref[~finite]
    if not torch.equal(torch.isfinite(r), finite) or not bool(((odd == want) | (odd.isnan() & want.isnan())).all()):
        raise AssertionError(f"non-finite entries differ between result and reference ({int((~finite).sum())} in it)")
    return (r[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


def assert_within_baseline(
    result: torch.Tensor,
    reference: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float | None = None,
    floor: float | None = None,
    what: str = "result",
) -> float:
    """FlashAttention's rule: ``max|result - reference| <= factor * max|baseline - reference| + floor``.

    ``reference`` is computed in float32/float64; ``baseline`` is the same computation by plain PyTorch in
    ``result``'s dtype, so its error is what that dtype costs on these very inputs. ``floor`` (a few epsilons
    of ``result``'s dtype at the reference's largest value) keeps a baseline that happens to be exact from
    demanding exactness. Defaults: factor 2 and floor 1 epsilon for float16/bfloat16 results, 3 and 4
    epsilons otherwise. Returns the measured error.
    """
    err, base = max_error(result, reference), max_error(baseline, reference)
    default_factor, floor_ulps = _RULE.get(result.dtype, _RULE_DEFAULT)
    factor = default_factor if factor is None else factor
    if floor is None:
        finite = reference[torch.isfinite(reference)]
        floor = floor_ulps * eps(result.dtype) * (finite.abs().max().item() if finite.numel() else 1.0)
    budget = factor * base + floor
    if not err <= budget:
        raise AssertionError(
            f"{what}: max error {err:.3g} > {factor:g} x baseline error {base:.3g} + floor {floor:.3g}"
            f" = {budget:.3g} ({result.dtype}; baseline {baseline.dtype}, reference {reference.dtype})"
        )
    return err


def assert_close_as_pytorch(
    result: torch.Tensor | Sequence[torch.Tensor],
    fn: Callable[..., torch.Tensor | Sequence[torch.Tensor]],
    *inputs: object,
    factor: float | None = None,
    what: str = "result",
) -> None:
    """:func:`assert_within_baseline` with ``fn``, a plain-PyTorch computation of what ``result`` should be,
    run on ``inputs`` as given (the baseline) and with every floating tensor in float64 (the reference).
    ``fn`` may return a tuple (output, LSE, ...); ``result`` is then a tuple as long."""
    wide = [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    refs, bases = fn(*wide), fn(*inputs)
    if isinstance(result, torch.Tensor):
        result, refs, bases = (result,), (refs,), (bases,)
    for i, (r, ref, base) in enumerate(zip(result, refs, bases, strict=True)):
        assert_within_baseline(r, ref, base, factor=factor, what=what if len(result) == 1 else f"{what}[{i}]")

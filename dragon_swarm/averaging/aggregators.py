"""Byzantine-robust aggregation: pure functions from a stack of parts to one tensor plus a per-sender report.

Every aggregator has the same shape: ``aggregator(parts, weights=None) -> AggregationResult`` where ``parts``
is ``[n, d]`` (one row per sender, already validated with :func:`validate_part`) and the result holds the
aggregate ``value`` ``[d]``, each sender's ``distances`` ``[n]`` from it (the raw material for reputation and
bans), and the number of ``iterations`` an iterative method took (0 for closed-form ones).

Only :func:`mean` uses ``weights``. The robust aggregators accept and ignore them on purpose: a weight is
self-reported by its sender, so a Byzantine sender could give itself any weight it likes.

All math runs in float64 and the result is cast back to the dtype of ``parts``: CenteredClip sums n
clipped differences for up to ``max_iters`` rounds, and float32 loses the small updates near convergence.

Nothing here touches the network; the all-reduce plumbing calls :func:`make_aggregator` once per round.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

__all__ = [
    "AGGREGATORS",
    "AggregationResult",
    "Aggregator",
    "centered_clip",
    "make_aggregator",
    "mean",
    "median",
    "trimmed_mean",
    "validate_part",
]


@dataclass(frozen=True)
class AggregationResult:
    """What an aggregator returns.

    :param value: the aggregate, shape ``[d]``, dtype of the input parts
    :param distances: ``‖parts[i] - value‖₂`` for each sender, shape ``[n]``; large values mark suspects
    :param iterations: update steps an iterative aggregator performed (0 for closed-form aggregators)
    """

    value: torch.Tensor
    distances: torch.Tensor
    iterations: int


class Aggregator(Protocol):
    """The interface shared by all aggregators (after :func:`make_aggregator` has bound their parameters)."""

    def __call__(self, parts: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult: ...


def validate_part(part: torch.Tensor, expected_numel: int, expected_dtype: torch.dtype) -> str | None:
    """Check one received part before it may enter an aggregator.

    :returns: a one-line, human-readable reason to reject the part, or None if it is acceptable
    """
    if not isinstance(part, torch.Tensor):
        return f"expected a tensor, got {type(part).__name__}"
    if part.layout != torch.strided:
        return f"expected a dense tensor, got layout {part.layout}"
    if part.dtype != expected_dtype:
        return f"expected dtype {expected_dtype}, got {part.dtype}"
    if part.numel() != expected_numel:
        return f"expected {expected_numel} values, got {part.numel()} (shape {tuple(part.shape)})"
    if part.is_floating_point() or part.is_complex():
        num_nan = int(torch.isnan(part).sum())
        if num_nan:
            return f"contains {num_nan} NaN value(s) out of {part.numel()}"
        num_inf = int(torch.isinf(part).sum())
        if num_inf:
            return f"contains {num_inf} +Inf/-Inf value(s) out of {part.numel()}"
    return None


def mean(
    parts: torch.Tensor, weights: torch.Tensor | None = None, *, max_weight: float = 1.0
) -> AggregationResult:
    """Weighted arithmetic mean, the non-robust baseline (what hivemind does by default).

    Weights are self-reported, so each is clamped to ``[0, max_weight]`` (NaN counts as 0) before use: one
    sender claiming a huge weight cannot own the result. Pass weights normalized so that an honest sender
    is at most ``max_weight`` (e.g. samples / expected samples per peer). Without weights all rows count
    equally.

    :raises ValueError: if weights have the wrong shape or all clamp to zero (the mean would be 0/0)
    """
    x = _as_float64_stack(parts)
    n = x.shape[0]
    if not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"max_weight must be a positive finite number, got {max_weight}")
    if weights is None:
        value = x.mean(dim=0)
    else:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.numel() != n:
            raise ValueError(f"expected {n} weights (one per part), got {w.numel()}")
        w = torch.nan_to_num(w, nan=0.0).clamp(0.0, max_weight)
        total = w.sum()
        if total <= 0:
            raise ValueError("all weights are zero after clamping to [0, max_weight]; the mean is undefined")
        value = (w[:, None] * x).sum(dim=0) / total
    return _result(parts, x, value, iterations=0)


def median(parts: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
    """Coordinate-wise median; for an even number of rows, the average of the two middle values.

    Robust to fewer than n/2 Byzantine rows per coordinate, but noisier than the mean on honest data.
    ``weights`` are ignored (self-reported, not to be trusted).
    """
    x = _as_float64_stack(parts)
    return _result(parts, x, _median_f64(x), iterations=0)


def trimmed_mean(parts: torch.Tensor, trim_ratio: float, weights: torch.Tensor | None = None) -> AggregationResult:
    """Coordinate-wise trimmed mean: per coordinate, drop the ``k = floor(trim_ratio * n)`` largest and
    ``k`` smallest values and average the rest.

    Tolerates up to ``k`` Byzantine rows; set ``trim_ratio`` a bit above the expected Byzantine fraction.
    ``trim_ratio`` must be in ``[0, 0.5)``, so at least one value always remains. ``weights`` are ignored.
    """
    if not (isinstance(trim_ratio, (int, float)) and 0.0 <= trim_ratio < 0.5):
        raise ValueError(f"trim_ratio must be a number in [0, 0.5), got {trim_ratio!r}")
    x = _as_float64_stack(parts)
    n = x.shape[0]
    # the epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28; the min keeps one row
    k = min(math.floor(trim_ratio * n + 1e-9), (n - 1) // 2)
    kept = torch.sort(x, dim=0).values[k : n - k]
    return _result(parts, x, kept.mean(dim=0), iterations=0)


def centered_clip(
    parts: torch.Tensor,
    tau: float,
    *,
    max_iters: int = 100,
    tol: float = 1e-6,
    weights: torch.Tensor | None = None,
    relative_tau: bool = False,
) -> AggregationResult:
    """CenteredClip (Karimireddy, He, Jaggi 2021), started from the coordinate-wise median as in BTARD
    (Gorbunov et al. 2022)::

        v ← v + (1/n) Σᵢ (xᵢ − v) · min(1, τ / ‖xᵢ − v‖)

    repeated until ``‖update‖₂ < tol`` or ``max_iters`` updates were made. Each sender can move the result
    by at most ``τ / n`` per iteration, however far away it is.

    Tuning: ``tau`` is the radius within which a row counts fully. Too small and honest rows are clipped
    (slow convergence, hitting ``max_iters``, bias towards the median); too large and outliers get more
    pull. Set it around the typical honest distance from the mean (e.g. a running quantile of the
    ``distances`` this function returns). ``tol`` is absolute, in the units of the parts: about
    ``1e-6 * tau`` is plenty. If ``iterations == max_iters`` often, tau is probably too small.

    ``relative_tau=True`` makes tau scale-free: the radius becomes ``tau × median_i ‖xᵢ − median‖``, the
    typical spread of the rows around the coordinate-wise median. With fewer than n/2 outliers that median
    distance is set by honest rows, so one setting fits every part size, model and training stage; ``tol`` is
    then relative to the radius too.

    ``weights`` are ignored (self-reported, not to be trusted).
    """
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if not (isinstance(max_iters, int) and max_iters >= 1):
        raise ValueError(f"max_iters must be an integer >= 1, got {max_iters!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    x = _as_float64_stack(parts)
    v = _median_f64(x)
    if relative_tau:
        spread = float(torch.linalg.vector_norm(x - v, dim=1).median())
        if spread == 0.0:  # most rows equal the median: that is the robust answer
            return _result(parts, x, v, iterations=0)
        tau, tol = tau * spread, tol * spread
    iterations = 0
    while iterations < max_iters:
        diffs = x - v
        norms = torch.linalg.vector_norm(diffs, dim=1)
        # min(1, τ/‖d‖) written as τ / max(‖d‖, τ): never divides by zero, even when a row equals v
        scales = tau / torch.maximum(norms, torch.tensor(tau, dtype=torch.float64))
        update = (diffs * scales[:, None]).mean(dim=0)
        v = v + update
        iterations += 1
        if torch.linalg.vector_norm(update) < tol:
            break
    return _result(parts, x, v, iterations=iterations)


AGGREGATORS: dict[str, Callable[..., AggregationResult]] = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "centered_clip": centered_clip,
}

_PER_CALL_ARGUMENTS = ("parts", "weights")


def make_aggregator(name: str, **params) -> Aggregator:
    """Bind an aggregator's parameters by name, e.g. ``make_aggregator("centered_clip", tau=1.0)``.

    Parameters are checked here, not on the first all-reduce: unknown names, missing required parameters
    and bad values all raise ValueError with the accepted parameters listed.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; known: {', '.join(sorted(AGGREGATORS))}")
    function = AGGREGATORS[name]
    accepted = {
        param.name: param
        for param in inspect.signature(function).parameters.values()
        if param.name not in _PER_CALL_ARGUMENTS
    }
    described = ", ".join(
        p.name if p.default is inspect.Parameter.empty else f"{p.name}={p.default!r}" for p in accepted.values()
    ) or "none"
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"aggregator {name!r} got unknown parameter(s) {unknown}; accepted: {described}")
    missing = sorted(p.name for p in accepted.values() if p.default is inspect.Parameter.empty and p.name not in params)
    if missing:
        raise ValueError(f"aggregator {name!r} requires parameter(s) {missing}; accepted: {described}")

    def aggregator(parts: torch.Tensor, weights: torch.Tensor | None = None) -> AggregationResult:
        return function(parts, weights=weights, **params)

    aggregator.__name__ = aggregator.__qualname__ = f"{name}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
    # the aggregators check their own parameter values; running one on a 1x1 stack surfaces a bad value now
    aggregator(torch.zeros(1, 1))
    return aggregator


def _as_float64_stack(parts: torch.Tensor) -> torch.Tensor:
    if not isinstance(parts, torch.Tensor) or parts.dim() != 2:
        raise ValueError(f"parts must be a 2-D tensor [n_senders, d], got {_describe(parts)}")
    if parts.shape[0] == 0:
        raise ValueError("parts is empty: there is nothing to aggregate")
    if not parts.is_floating_point():
        raise ValueError(f"parts must be floating point, got {parts.dtype}")
    x = parts.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("parts contain NaN or Inf; reject such parts with validate_part before aggregating")
    return x


def _median_f64(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    ordered = torch.sort(x, dim=0).values
    if n % 2 == 1:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def _result(parts: torch.Tensor, x: torch.Tensor, value: torch.Tensor, iterations: int) -> AggregationResult:
    distances = torch.linalg.vector_norm(x - value, dim=1)
    return AggregationResult(value=value.to(parts.dtype), distances=distances.to(parts.dtype), iterations=iterations)


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"shape {tuple(obj.shape)}"
    return type(obj).__name__

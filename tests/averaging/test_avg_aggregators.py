"""Aggregators against their formulas on hand-made stacks; no network."""

import math

import pytest
import torch

from dragon_swarm.averaging.aggregators import (
    AGGREGATORS,
    AggregationResult,
    centered_clip,
    make_aggregator,
    mean,
    median,
    trimmed_mean,
)

THREE_ROWS = torch.tensor(
    [
        [1.0, 10.0, -2.0],
        [2.0, 30.0, -4.0],
        [6.0, 20.0, 0.0],
    ]
)


def _expected_distances(parts: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.tensor([math.dist(row.tolist(), value.tolist()) for row in parts])


# ---------------------------------------------------------------- mean


def test_mean_unweighted_is_column_average():
    # Prepare / Execute
    result = mean(THREE_ROWS)

    # Assert
    torch.testing.assert_close(result.value, torch.tensor([3.0, 20.0, -2.0]))
    torch.testing.assert_close(result.distances, _expected_distances(THREE_ROWS, result.value))
    assert result.iterations == 0
    assert result.value.dtype == torch.float32


def test_mean_weighted_uses_weights_below_cap():
    # Prepare
    weights = torch.tensor([1.0, 2.0, 1.0])

    # Execute
    result = mean(THREE_ROWS, weights, max_weight=2.0)

    # Assert: (1*r0 + 2*r1 + 1*r2) / 4
    torch.testing.assert_close(result.value, torch.tensor([11.0 / 4, 90.0 / 4, -10.0 / 4]))


def test_mean_caps_inflated_and_negative_and_nan_weights():
    # Prepare: row 0 claims a huge weight, row 1 a negative one, row 2 NaN; cap 1 -> weights (1, 0, 0)
    weights = torch.tensor([1e9, -5.0, float("nan")])

    # Execute
    result = mean(THREE_ROWS, weights, max_weight=1.0)

    # Assert
    torch.testing.assert_close(result.value, THREE_ROWS[0])


def test_mean_cap_limits_a_loud_sender_to_cap_share():
    # Prepare: an attacker row far away claims weight 1000 while honest rows claim 1; cap at 1
    parts = torch.tensor([[0.0], [0.0], [0.0], [100.0]])
    weights = torch.tensor([1.0, 1.0, 1.0, 1000.0])

    # Execute
    capped = mean(parts, weights, max_weight=1.0)

    # Assert: with the cap the attacker has 1/4 of the say, not 1000/1003
    torch.testing.assert_close(capped.value, torch.tensor([25.0]))


def test_mean_all_zero_weights_is_an_error():
    with pytest.raises(ValueError, match="all weights are zero"):
        mean(THREE_ROWS, torch.zeros(3))


def test_mean_wrong_number_of_weights_is_an_error():
    with pytest.raises(ValueError, match="expected 3 weights"):
        mean(THREE_ROWS, torch.ones(2))


# ---------------------------------------------------------------- median


def test_median_odd_rows_is_middle_value_per_coordinate():
    # Prepare / Execute
    result = median(THREE_ROWS)

    # Assert
    torch.testing.assert_close(result.value, torch.tensor([2.0, 20.0, -2.0]))
    torch.testing.assert_close(result.distances, _expected_distances(THREE_ROWS, result.value))


def test_median_even_rows_averages_two_middle_values():
    # Prepare
    parts = torch.tensor([[1.0, -4.0], [2.0, 0.0], [6.0, 10.0], [100.0, -8.0]])

    # Execute
    result = median(parts)

    # Assert: column 0 sorted 1, 2, 6, 100 -> 4; column 1 sorted -8, -4, 0, 10 -> -2
    torch.testing.assert_close(result.value, torch.tensor([4.0, -2.0]))


def test_median_ignores_weights():
    # Prepare / Execute
    result = median(THREE_ROWS, weights=torch.tensor([100.0, 0.0, 0.0]))

    # Assert
    torch.testing.assert_close(result.value, torch.tensor([2.0, 20.0, -2.0]))


# ---------------------------------------------------------------- trimmed mean


def test_trimmed_mean_drops_k_largest_and_smallest_per_coordinate():
    # Prepare: 5 rows, trim_ratio 0.2 -> k = 1; extremes differ per column
    parts = torch.tensor(
        [
            [1000.0, 1.0],
            [1.0, -1000.0],
            [2.0, 2.0],
            [3.0, 3.0],
            [-1000.0, 1000.0],
        ]
    )

    # Execute
    result = trimmed_mean(parts, trim_ratio=0.2)

    # Assert: column 0 keeps 1, 2, 3 -> 2; column 1 keeps 1, 2, 3 -> 2
    torch.testing.assert_close(result.value, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(result.distances, _expected_distances(parts, result.value))


def test_trimmed_mean_k_is_floor_of_ratio_times_n():
    # Prepare: n = 4, ratio 0.3 -> k = floor(1.2) = 1; ratio 0.2 -> k = floor(0.8) = 0
    parts = torch.tensor([[0.0], [1.0], [2.0], [101.0]])

    # Execute
    trimmed_one = trimmed_mean(parts, trim_ratio=0.3)
    trimmed_none = trimmed_mean(parts, trim_ratio=0.2)

    # Assert
    torch.testing.assert_close(trimmed_one.value, torch.tensor([1.5]))
    torch.testing.assert_close(trimmed_none.value, torch.tensor([26.0]))


def test_trimmed_mean_ratio_that_rounds_below_integer_still_trims():
    # Prepare: 0.29 * 100 == 28.999999999999996 in floating point, but k must be 29;
    # 29 outliers at the top, so k = 28 would leave one of them in
    assert 0.29 * 100 < 29
    parts = torch.cat([torch.zeros(71), torch.full((29,), 1e6)])[:, None]

    # Execute
    result = trimmed_mean(parts, trim_ratio=0.29)

    # Assert
    assert result.value.item() == 0.0


def test_trimmed_mean_zero_ratio_is_mean():
    result = trimmed_mean(THREE_ROWS, trim_ratio=0.0)

    torch.testing.assert_close(result.value, THREE_ROWS.mean(dim=0))


# ---------------------------------------------------------------- centered clip


def test_centered_clip_without_outliers_and_large_tau_equals_mean():
    # Prepare
    torch.manual_seed(0)
    parts = torch.randn(8, 50)

    # Execute: tau far above every row's distance, so nothing is clipped and one step reaches the mean
    result = centered_clip(parts, tau=1e3)

    # Assert
    torch.testing.assert_close(result.value, parts.mean(dim=0), atol=1e-6, rtol=0)
    assert result.iterations <= 2


def test_centered_clip_one_step_formula_on_three_rows():
    # Prepare: start v0 = median = (2, 20, -2); tau = 5 clips rows 0 and 1 (distances ~10.05, ~10.2), not row 2 (~4.47)
    v0 = torch.tensor([2.0, 20.0, -2.0], dtype=torch.float64)
    x = THREE_ROWS.double()
    diffs = x - v0
    norms = diffs.norm(dim=1)
    expected_v1 = v0 + (diffs * torch.clamp(5.0 / norms.clamp_min(1e-300), max=1.0)[:, None]).mean(dim=0)

    # Execute
    result = centered_clip(THREE_ROWS, tau=5.0, max_iters=1)

    # Assert
    assert result.iterations == 1
    torch.testing.assert_close(result.value, expected_v1.float())


def test_centered_clip_handles_row_equal_to_current_estimate():
    # Prepare: all rows identical, so x_i - v == 0 for every row at the start (the median)
    parts = torch.full((4, 3), 7.0)

    # Execute
    result = centered_clip(parts, tau=1.0)

    # Assert: no NaN from 0/0, stops after the first (zero) update
    torch.testing.assert_close(result.value, torch.full((3,), 7.0))
    torch.testing.assert_close(result.distances, torch.zeros(4))
    assert result.iterations == 1


def test_centered_clip_outliers_stay_within_tau_scale_of_honest_mean():
    """Bound: at a fixed point, Σ_H (h_i - v) = -Σ_B c_i (b_i - v) when honest rows are unclipped,
    and each clipped bad term has norm <= tau, so ‖mean_H - v‖ <= |B| * tau / |H|.
    That holds when tau >= r * |H| / (|H| - |B|), with r the largest honest distance from mean_H."""
    # Prepare: 4 honest rows, 3 rows at 1e6 in every coordinate
    torch.manual_seed(1)
    honest = torch.randn(4, 16)
    honest_mean = honest.mean(dim=0)
    spread = (honest - honest_mean).norm(dim=1).max().item()
    num_honest, num_bad = 4, 3
    tau = spread * num_honest / (num_honest - num_bad) * 1.01
    parts = torch.cat([torch.full((num_bad, 16), 1e6), honest])

    # Execute
    result = centered_clip(parts, tau=tau, max_iters=1000, tol=1e-9)

    # Assert
    bias = (result.value - honest_mean).norm().item()
    assert result.iterations < 1000
    assert bias <= num_bad * tau / num_honest * 1.001
    assert bias < 1e-4 * 1e6  # nowhere near the outliers


def test_centered_clip_is_robust_where_mean_is_not():
    # Prepare
    torch.manual_seed(2)
    honest = torch.randn(6, 32)
    parts = torch.cat([honest, torch.full((2, 32), 1e6)])

    # Execute
    robust = centered_clip(parts, tau=10.0)
    naive = mean(parts)

    # Assert
    assert (robust.value - honest.mean(dim=0)).norm() < 10.0
    assert (naive.value - honest.mean(dim=0)).norm() > 1e5


def test_centered_clip_converges_on_honest_data():
    # Prepare: 16 honest senders, tau of the order of their spread (rows sit ~sqrt(d) from the mean)
    torch.manual_seed(3)
    parts = torch.randn(16, 256)
    tau = 2 * math.sqrt(256)

    # Execute
    result = centered_clip(parts, tau=tau, max_iters=100, tol=1e-6)

    # Assert
    assert result.iterations < 100
    torch.testing.assert_close(result.value, parts.mean(dim=0), atol=1e-5, rtol=0)


def test_centered_clip_is_permutation_invariant():
    # Prepare
    torch.manual_seed(4)
    parts = torch.cat([torch.randn(7, 40), 50 * torch.ones(3, 40)])
    order = torch.randperm(10)

    # Execute
    result = centered_clip(parts, tau=3.0)
    permuted = centered_clip(parts[order], tau=3.0)

    # Assert
    torch.testing.assert_close(permuted.value, result.value, atol=1e-6, rtol=0)
    torch.testing.assert_close(permuted.distances, result.distances[order], atol=1e-5, rtol=0)
    assert permuted.iterations == result.iterations


def test_centered_clip_distances_are_norms_to_result():
    # Prepare
    torch.manual_seed(5)
    parts = torch.randn(5, 9)

    # Execute
    result = centered_clip(parts, tau=1.0)

    # Assert
    torch.testing.assert_close(result.distances, _expected_distances(parts, result.value), atol=1e-5, rtol=0)


def test_centered_clip_stops_at_max_iters():
    # Prepare: a tiny tau clips everything, so convergence takes many steps
    torch.manual_seed(6)
    parts = torch.randn(9, 100)

    # Execute
    result = centered_clip(parts, tau=1e-3, max_iters=5, tol=0.0)

    # Assert
    assert result.iterations == 5


# ---------------------------------------------------------------- shared interface


@pytest.mark.parametrize(
    "name, params",
    [("mean", {}), ("median", {}), ("trimmed_mean", {"trim_ratio": 0.2}), ("centered_clip", {"tau": 1.0})],
)
def test_every_registered_aggregator_follows_the_interface(name, params):
    # Prepare
    torch.manual_seed(7)
    parts = torch.randn(5, 11)
    aggregator = make_aggregator(name, **params)

    # Execute
    result = aggregator(parts)

    # Assert
    assert isinstance(result, AggregationResult)
    assert result.value.shape == (11,) and result.value.dtype == torch.float32
    assert result.distances.shape == (5,) and result.distances.dtype == torch.float32
    torch.testing.assert_close(result.distances, _expected_distances(parts, result.value), atol=1e-5, rtol=0)


def test_registry_lists_the_four_aggregators():
    assert set(AGGREGATORS) == {"mean", "median", "trimmed_mean", "centered_clip"}


def test_make_aggregator_binds_parameters():
    # Prepare
    aggregator = make_aggregator("trimmed_mean", trim_ratio=0.2)
    parts = torch.tensor([[-100.0], [1.0], [2.0], [3.0], [100.0]])

    # Execute / Assert
    torch.testing.assert_close(aggregator(parts).value, torch.tensor([2.0]))


def test_make_aggregator_passes_weights_through_to_mean():
    aggregator = make_aggregator("mean", max_weight=2.0)

    result = aggregator(torch.tensor([[0.0], [3.0]]), weights=torch.tensor([1.0, 2.0]))

    torch.testing.assert_close(result.value, torch.tensor([2.0]))


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("krum", {}, "unknown aggregator 'krum'"),
        ("centered_clip", {}, r"requires parameter\(s\) \['tau'\]"),
        ("centered_clip", {"tau": 1.0, "clip": 2}, r"unknown parameter\(s\) \['clip'\]"),
        ("mean", {"weights": [1.0]}, r"unknown parameter\(s\) \['weights'\]"),
        ("centered_clip", {"tau": 0.0}, "tau must be a positive"),
        ("centered_clip", {"tau": 1.0, "max_iters": 0}, "max_iters must be"),
        ("centered_clip", {"tau": 1.0, "tol": -1.0}, "tol must be"),
        ("trimmed_mean", {"trim_ratio": 0.5}, r"trim_ratio must be a number in \[0, 0.5\)"),
        ("mean", {"max_weight": 0.0}, "max_weight must be"),
    ],
)
def test_make_aggregator_rejects_bad_names_and_parameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_aggregator(name, **params)


@pytest.mark.parametrize(
    "parts, message",
    [
        (torch.zeros(3), "2-D"),
        (torch.zeros(0, 3), "empty"),
        (torch.zeros(2, 3, dtype=torch.int64), "floating point"),
        (torch.tensor([[1.0], [float("nan")]]), "NaN or Inf"),
    ],
)
def test_aggregators_reject_malformed_stacks(parts, message):
    with pytest.raises(ValueError, match=message):
        median(parts)


def test_centered_clip_relative_tau_is_scale_free():
    torch.manual_seed(0)
    honest = torch.randn(7, 50)
    parts = torch.cat([honest, torch.full((3, 50), 1e6)])
    small = centered_clip(parts, 1.0, relative_tau=True).value
    big = centered_clip(parts * 1000.0, 1.0, relative_tau=True).value
    assert torch.allclose(big, small * 1000.0, rtol=1e-4, atol=1e-3)
    # with 3 of 10 rows at 1e6 the result stays within the honest spread of the honest mean
    spread = float((honest - honest.mean(0)).norm(dim=1).median())
    assert float((small - honest.mean(0)).norm()) < 1.5 * spread


def test_centered_clip_relative_tau_with_identical_rows_returns_them():
    parts = torch.ones(5, 4)
    result = centered_clip(parts, 1.0, relative_tau=True)
    assert torch.equal(result.value, torch.ones(4)) and result.iterations == 0

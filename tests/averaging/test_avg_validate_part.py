"""validate_part: the gate every received part passes before aggregation."""

import pytest
import torch

from dragon_swarm.averaging.aggregators import validate_part


def test_accepts_a_good_part():
    # Prepare
    part = torch.randn(12)

    # Execute
    reason = validate_part(part, expected_numel=12, expected_dtype=torch.float32)

    # Assert
    assert reason is None


def test_accepts_a_good_part_of_any_shape_with_the_right_numel():
    assert validate_part(torch.randn(3, 4), expected_numel=12, expected_dtype=torch.float32) is None


@pytest.mark.parametrize("numel", [11, 13, 0, 1])
def test_rejects_wrong_size(numel):
    # Prepare
    part = torch.randn(numel)

    # Execute
    reason = validate_part(part, expected_numel=12, expected_dtype=torch.float32)

    # Assert
    assert reason is not None
    assert "expected 12 values" in reason and f"got {numel}" in reason


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32])
def test_rejects_wrong_dtype(dtype):
    # Prepare
    part = torch.zeros(12, dtype=dtype)

    # Execute
    reason = validate_part(part, expected_numel=12, expected_dtype=torch.float32)

    # Assert
    assert reason is not None and "dtype" in reason and str(dtype) in reason


def test_rejects_nan():
    # Prepare
    part = torch.randn(12)
    part[3] = float("nan")
    part[7] = float("nan")

    # Execute
    reason = validate_part(part, expected_numel=12, expected_dtype=torch.float32)

    # Assert
    assert reason is not None and "2 NaN" in reason


@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_rejects_inf(bad):
    # Prepare
    part = torch.randn(12)
    part[0] = bad

    # Execute
    reason = validate_part(part, expected_numel=12, expected_dtype=torch.float32)

    # Assert
    assert reason is not None and "Inf" in reason


def test_rejects_non_tensors():
    assert "expected a tensor" in validate_part([0.0] * 12, expected_numel=12, expected_dtype=torch.float32)


def test_rejects_sparse_tensors():
    part = torch.randn(12).to_sparse()

    assert "dense" in validate_part(part, expected_numel=12, expected_dtype=torch.float32)

import pytest
import torch

from dragon_swarm.moe.handler import RequestError, check_request_tensors


def test_good_requests_pass():
    check_request_tensors([torch.randn(3, 8)], 1, 8, 10)
    check_request_tensors([torch.randn(3, 8), torch.randn(3, 8)], 2, 8, 10)


@pytest.mark.parametrize(
    "inputs, count, message",
    [
        ([torch.randn(3, 7)], 1, "expected shape"),
        ([torch.randn(3, 8, 1)], 1, "expected shape"),
        ([torch.randn(11, 8)], 1, "allowed 1..10"),
        ([torch.randn(0, 8)], 1, "allowed 1..10"),
        ([torch.ones(3, 8, dtype=torch.int64)], 1, "floating point"),
        ([torch.full((3, 8), float("nan"))], 1, "NaN or Inf"),
        ([torch.full((3, 8), float("inf"))], 1, "NaN or Inf"),
        ([torch.randn(3, 8)], 2, "expected 2 tensor"),
        ([torch.randn(3, 8), torch.randn(4, 8)], 2, "same number of tokens"),
    ],
)
def test_malformed_requests_are_rejected(inputs, count, message):
    with pytest.raises(RequestError, match=message):
        check_request_tensors(inputs, count, 8, 10)

import torch

from dragon_swarm.averaging.robust_optimizer import RobustTrainingStateAverager, downloaded_state_problem


def test_a_good_state_passes():
    assert downloaded_state_problem([torch.zeros(2, 3), torch.ones(4), torch.tensor(5)], [torch.Size([2, 3]), torch.Size([4])]) is None


def test_poisoned_or_misshaped_states_are_refused():
    shapes = [torch.Size([2, 3]), torch.Size([4])]
    assert "NaN or Inf" in downloaded_state_problem([torch.zeros(2, 3), torch.full((4,), float("nan"))], shapes)
    assert "NaN or Inf" in downloaded_state_problem([torch.zeros(2, 3), torch.ones(4), torch.tensor(float("inf"))], shapes)
    assert "shape" in downloaded_state_problem([torch.zeros(3, 2), torch.ones(4)], shapes)
    assert "tensors for" in downloaded_state_problem([torch.zeros(2, 3)], shapes)


def test_validation_sits_between_the_training_state_averager_and_hivemind():
    names = [cls.__name__ for cls in RobustTrainingStateAverager.__mro__]
    assert names.index("TrainingStateAverager") < names.index("_ValidatedStateDownload") < names.index("DecentralizedAverager")

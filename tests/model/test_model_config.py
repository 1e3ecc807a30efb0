"""ModelConfig: building from plain dicts and rejecting bad ones."""

import pytest

from dragon_swarm.model import ModelConfig

VALID = dict(
    vocab_size=256,
    seq_len=16,
    d_model=32,
    n_heads=4,
    h_layers=1,
    l_layers=2,
    h_cycles=2,
    l_cycles=2,
    num_experts=4,
    top_k=2,
    expert_hidden=48,
    aux_loss_weight=0.01,
)


def test_from_dict_round_trip_and_defaults():
    cfg = ModelConfig.from_dict(VALID)

    assert cfg.dropout == 0.0
    assert cfg.one_step_grad is False
    assert cfg.num_moe_layers == 3
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_int_given_for_float_is_normalised():
    # The swarm hashes to_dict(); `aux_loss_weight: 0` and `0.0` must agree.
    a = ModelConfig.from_dict({**VALID, "aux_loss_weight": 0})
    b = ModelConfig.from_dict({**VALID, "aux_loss_weight": 0.0})

    assert a.to_dict() == b.to_dict()
    assert isinstance(a.aux_loss_weight, float)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\): d_modle, extra; known: vocab_size, "):
        ModelConfig.from_dict({**VALID, "d_modle": 8, "extra": 1})


def test_missing_keys_are_named():
    d = dict(VALID)
    del d["top_k"], d["vocab_size"]

    with pytest.raises(ValueError, match=r"missing key\(s\): top_k, vocab_size"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"d_model": 30}, "divisible by n_heads"),
        ({"top_k": 5}, "top_k .* must not exceed num_experts"),
        ({"h_layers": 0}, "h_layers must be positive"),
        ({"expert_hidden": -1}, "expert_hidden must be positive"),
        ({"seq_len": 16.0}, "seq_len must be an int"),
        ({"num_experts": True}, "num_experts must be an int"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"aux_loss_weight": -0.1}, "aux_loss_weight must be >= 0"),
        ({"aux_loss_weight": float("nan")}, "aux_loss_weight must be >= 0"),
        ({"one_step_grad": 1}, "one_step_grad must be a bool"),
    ],
)
def test_invalid_values_are_rejected(override, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict({**VALID, **override})


def test_direct_construction_is_validated_too():
    with pytest.raises(ValueError, match="top_k"):
        ModelConfig(**{**VALID, "top_k": 9})


def test_errors_are_one_line_value_errors():
    with pytest.raises(ValueError) as info:
        ModelConfig.from_dict({**VALID, "seq_len": "16", "dropout": 2.0, "extra": 1})
    message = str(info.value)
    assert "\n" not in message
    assert "seq_len must be an int, got '16'" in message and "dropout must be in [0, 1)" in message


def test_not_a_mapping():
    with pytest.raises(ValueError, match="mapping"):
        ModelConfig.from_dict([("vocab_size", 3)])

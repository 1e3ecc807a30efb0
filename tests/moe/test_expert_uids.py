import pytest

from dragon_swarm.moe.expert_uids import (
    ExpertSpecError,
    expand_expert_spec,
    parse_uid,
)

P = "swarm-abc_ffn"


def test_grid_patterns_expand_like_hivemind():
    assert expand_expert_spec("ffn.0.[0:3]", P, 2, 4) == [f"{P}.0.0", f"{P}.0.1", f"{P}.0.2"]
    assert expand_expert_spec("1.*", P, 2, 4) == [f"{P}.1.{i}" for i in range(4)]
    assert expand_expert_spec("[0:2].3", P, 2, 4) == [f"{P}.0.3", f"{P}.1.3"]


def test_comma_lists_full_uids_and_all_without_duplicates():
    assert expand_expert_spec(f"0.1,{P}.0.1,1.[2:]", P, 2, 4) == [f"{P}.0.1", f"{P}.1.2", f"{P}.1.3"]
    assert len(expand_expert_spec("all", P, 2, 4)) == 8


@pytest.mark.parametrize("spec", ["5.0", "0.7", "0.[2:9]", "x.y", "0", "other_ffn.0.1", ""])
def test_bad_specs_are_refused(spec):
    with pytest.raises(ExpertSpecError):
        expand_expert_spec(spec, P, 2, 4)


def test_parse_uid_round_trip():
    assert parse_uid(f"{P}.1.3") == (P, 1, 3)

from pathlib import Path

import pytest

from dragon_swarm.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[2] / "configs" / "dragon-tiny.yaml"


def test_shipped_configs_load():
    tiny = load_config("dragon-tiny")
    big = load_config("hrm-smoe-125m")
    assert tiny.model.d_model < big.model.d_model
    assert tiny.run_prefix.startswith("dragon-tiny-")


def test_batch_size_is_peer_local_but_the_rest_is_hashed():
    base = load_config("dragon-tiny")
    assert load_config("dragon-tiny", {"training.batch_size": 4}).run_prefix == base.run_prefix
    assert load_config("dragon-tiny", {"training.lr": 0.1}).run_prefix != base.run_prefix
    assert load_config("dragon-tiny", {"model.top_k": 1}).run_prefix != base.run_prefix


def test_int_and_float_spellings_hash_the_same(tmp_path):
    text = TINY.read_text()
    respelled = tmp_path / "c.yaml"
    respelled.write_text(text.replace("lr: 0.003", "lr: 3.0e-3", 1))
    assert load_config(str(respelled)).run_prefix == load_config(str(TINY)).run_prefix


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("training:", "training:\n  learning_rate: 1", 1), "unknown key(s) in 'training': learning_rate"),
        (lambda t: t + "\nbogus:\n  a: 1\n", "unknown config section(s): bogus"),
        (lambda t: t.replace("lr: 0.003", "lr: fast", 1), "training.lr must be float"),
        (lambda t: t.replace("top_k: 2", "top_k: 9", 1), "top_k (9) must not exceed num_experts (4)"),
        (lambda t: t.replace("model:", "model: [", 1), "not valid YAML"),
        (lambda t: "", "config is empty"),
    ],
)
def test_broken_configs_give_one_clear_message(tmp_path, edit, message):
    path = tmp_path / "broken.yaml"
    path.write_text(edit(TINY.read_text()))
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: .*dragon-tiny"):
        load_config("no-such-config")

"""The swarm config schema: shipped configs, hashing, strict types, one-line errors, registry names, ban policy."""

from pathlib import Path

import pytest
import yaml

from dragon_swarm.averaging.aggregators import AGGREGATORS
from dragon_swarm.averaging.compression import CODECS
from dragon_swarm.averaging.reputation import ReputationBook
from dragon_swarm.averaging.settings import RobustAveragingSettings
from dragon_swarm.config import AveragingSection, ConfigError, SwarmConfig, load_config, resolve_config_path

TINY = Path(__file__).resolve().parents[2] / "configs" / "dragon-tiny.yaml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_configs_load():
    tiny = load_config("dragon-tiny")
    big = load_config("hrm-smoe-125m")
    assert tiny.model.d_model < big.model.d_model
    assert tiny.run_prefix.startswith("dragon-tiny-")
    assert load_config(None) == tiny  # the default


def test_batch_size_is_peer_local_but_the_rest_is_hashed():
    base = load_config("dragon-tiny")
    assert load_config("dragon-tiny", {"training.batch_size": 4}).run_prefix == base.run_prefix
    assert load_config("dragon-tiny", {"training.lr": 0.1}).run_prefix != base.run_prefix
    assert load_config("dragon-tiny", {"model.top_k": 1}).run_prefix != base.run_prefix
    assert load_config("dragon-tiny", {"averaging.ban_rounds": 4}).run_prefix != base.run_prefix


def test_micro_batches_in_flight_is_peer_local_and_for_remote_experts_only():
    remote = {"training.mode": "remote_experts"}
    base = load_config("dragon-tiny", remote)
    assert base.training.micro_batches_in_flight == 1
    assert load_config("dragon-tiny", {**remote, "training.micro_batches_in_flight": 3}).run_prefix == base.run_prefix
    with pytest.raises(ConfigError, match="micro_batches_in_flight"):
        load_config("dragon-tiny", {**remote, "training.micro_batches_in_flight": 0})
    with pytest.raises(ConfigError, match="is for remote_experts mode"):
        load_config("dragon-tiny", {"training.mode": "local_experts", "training.micro_batches_in_flight": 2})


def test_int_and_float_spellings_hash_the_same(tmp_path):
    respelled = write(tmp_path, TINY.read_text().replace("lr: 0.003", "lr: 3.0e-3", 1).replace("tau", "tau", 1))
    assert load_config(respelled).run_prefix == load_config(str(TINY)).run_prefix
    as_int = load_config("dragon-tiny", {"averaging.ban_seconds": 300, "training.clip_grad_norm": 1})
    assert as_int.run_prefix == load_config("dragon-tiny").run_prefix
    assert isinstance(as_int.averaging.ban_seconds, float) and isinstance(as_int.training.clip_grad_norm, float)


def test_to_dict_round_trips_and_sections_are_frozen():
    config = load_config("dragon-tiny")
    assert SwarmConfig.from_dict(config.to_dict()) == config
    assert config.to_dict()["training"]["betas"] == (0.9, 0.95)
    with pytest.raises(Exception):
        config.training.lr = 1.0  # type: ignore[misc]


def test_replace_revalidates():
    config = load_config("dragon-tiny")
    smaller = config.replace(model=config.model.replace(top_k=1))
    assert smaller.model.top_k == 1 and smaller.training == config.training
    with pytest.raises(ConfigError, match="top_k"):
        config.replace(model={**config.model.to_dict(), "top_k": 99})


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace("training:", "training:\n  learning_rate: 1", 1), "unknown key(s) in 'training': learning_rate; known: batch_size,"),
        (lambda t: t.replace("averaging:", "averaging:\n  tua: 1\n  ban_round: 2", 1), "unknown key(s) in 'averaging': ban_round, tua; known:"),
        (lambda t: t + "\nbogus:\n  a: 1\n", "unknown config section(s): bogus"),
        (lambda t: t.replace("lr: 0.003", "lr: fast", 1), "training.lr must be a number, got 'fast'"),
        (lambda t: t.replace("lr: 0.003", "lr: '3'", 1), "training.lr must be a number, got '3'"),
        (lambda t: t.replace("batch_size: 16", "batch_size: true", 1), "training.batch_size must be an int, got True"),
        (lambda t: t.replace("seed: 1234", "seed: 12.0", 1), "swarm.seed must be an int, got 12.0"),
        (lambda t: t.replace("one_step_grad: false", "one_step_grad: 0", 1), "model.one_step_grad must be a bool"),
        (lambda t: t.replace("betas: [0.9, 0.95]", "betas: [0.9]", 1), "training.betas has too few items (no item 1), got [0.9]"),
        (lambda t: t.replace("betas: [0.9, 0.95]", "betas: [0.9, 0.95, 0.99]", 1), "training.betas must have 2 item(s)"),
        (lambda t: t.replace("betas: [0.9, 0.95]", "betas: ['0.9', 0.95]", 1), "training.betas.0 must be a number"),
        (lambda t: t.replace("top_k: 2", "top_k: 9", 1), "model: top_k (9) must not exceed num_experts (4)"),
        (lambda t: t.replace("d_model: 128", "d_model: 0", 1), "model.d_model must be positive, got 0"),
        (lambda t: t.replace("target_batch_size: 64", "target_batch_size: 8", 1), "target_batch_size (8) must be >= batch_size (16)"),
        (lambda t: t.replace("worker_momentum: 0.9", "worker_momentum: 1.0", 1), "training.worker_momentum must be in [0, 1), got 1.0"),
        (lambda t: t.replace("val_fraction: 0.02", "val_fraction: 0.5", 1), "data.val_fraction must be in (0, 0.5)"),
        (lambda t: t.replace("name: dragon-tiny", "name: dragon tiny", 1), "swarm.name must contain only letters"),
        (lambda t: t.replace("expiration: 20.0", "expiration: 5.0", 1), "experts: expiration (5) must exceed update_period (5)"),
        (lambda t: t.replace("compression: none", "compression: zip", 1), "averaging.compression must be one of none, fp16,"),
        (lambda t: t.replace("aggregator: centered_clip", "aggregator: krum", 1), "averaging.aggregator must be one of mean, median,"),
        (lambda t: t.split("\nexperts:")[0] + "\nexperts: 3\n", "experts must be a mapping, got 3"),
        (lambda t: t.replace("model:", "model: [", 1), "not valid YAML"),
        (lambda t: "", "config is empty"),
        (lambda t: "- a\n- b\n", "must be a mapping"),
        (lambda t: t.split("model:")[0], "config has no 'model' section"),
    ],
)
def test_broken_configs_give_one_clear_line_naming_file_and_key(tmp_path, edit, message):
    path = write(tmp_path, edit(TINY.read_text()))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert message in str(info.value)
    assert str(info.value).startswith(path)
    assert "\n" not in str(info.value)


def test_several_problems_are_all_named_on_one_line(tmp_path):
    text = TINY.read_text().replace("lr: 0.003", "lr: fast", 1).replace("averaging:", "averaging:\n  tua: 1", 1)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert "training.lr must be a number" in str(info.value) and "tua" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known: .*dragon-tiny"):
        load_config("no-such-config")
    with pytest.raises(ConfigError, match="config file not found"):
        resolve_config_path("/nonexistent/mine.yaml")


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_registered_codec_can_be_chosen(codec):
    assert load_config("dragon-tiny", {"averaging.compression": codec}).averaging.compression == codec


@pytest.mark.parametrize("aggregator", sorted(AGGREGATORS))
def test_every_registered_aggregator_can_be_chosen(aggregator):
    config = load_config("dragon-tiny", {"averaging.aggregator": aggregator})
    assert RobustAveragingSettings.from_config(config.averaging).aggregator == aggregator


# --- the robust-averaging policy: one set of defaults, the ones trainers use ---


def test_averaging_defaults_are_the_policy_trainers_run_with():
    section = AveragingSection()
    settings = RobustAveragingSettings.from_config(section, target_batch_size=64)
    assert settings == RobustAveragingSettings(weight_claim_limit=4.0 * 64)  # the settings' own defaults agree
    assert (settings.relative_tau, settings.ban_distance_ratio, settings.min_observations) == (True, 5.0, 3)
    assert (settings.max_invalid, settings.ban_seconds, settings.weight_claim_limit) == (2, 300.0, 256.0)
    book, default_book = settings.make_reputation_book(), ReputationBook()
    for name in ("ban_seconds", "max_ban_seconds", "max_invalid", "ban_distance_ratio", "min_observations", "ema_alpha"):
        assert getattr(book, name) == getattr(default_book, name), name


def test_ban_policy_comes_from_the_config_file(tmp_path):
    raw = yaml.safe_load(TINY.read_text())
    policy = dict(relative_tau=False, tau=2.5, ban_distance_ratio=7, ban_rounds=4, ban_strikes=1, ban_seconds=60, max_ban_seconds=600, weight_claim_factor=2)
    raw["averaging"].update(policy)
    config = load_config(write(tmp_path, yaml.safe_dump(raw)))
    settings = RobustAveragingSettings.from_config(config.averaging, config.training.target_batch_size)
    assert (settings.relative_tau, settings.tau, settings.ban_distance_ratio) == (False, 2.5, 7.0)
    assert (settings.min_observations, settings.max_invalid, settings.ban_seconds) == (4, 1, 60.0)
    assert settings.make_reputation_book().ban_length(3) == 240.0 and settings.make_reputation_book().ban_length(9) == 600.0
    assert settings.weight_claim_limit == 2.0 * config.training.target_batch_size
    off = load_config("dragon-tiny", {"averaging.weight_claim_factor": None})
    assert RobustAveragingSettings.from_config(off.averaging, 64).weight_claim_limit is None
    assert RobustAveragingSettings.from_config(config.averaging).weight_claim_limit is None  # no target: off


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("ban_rounds", 0, "averaging.ban_rounds must be positive"),
        ("ban_strikes", 1.5, "averaging.ban_strikes must be an int"),
        ("ban_distance_ratio", -1, "averaging.ban_distance_ratio must be positive"),
        ("ban_seconds", -1, "averaging.ban_seconds must be >= 0"),
        ("max_ban_seconds", 60, "averaging: max_ban_seconds"),
        ("weight_claim_factor", 0, "averaging.weight_claim_factor"),
        ("relative_tau", "yes", "averaging.relative_tau must be a bool"),
    ],
)
def test_bad_ban_policy_is_refused(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("dragon-tiny", {f"averaging.{key}": value})


def test_a_key_given_twice_is_an_error_not_a_silent_override(tmp_path):
    # yaml.safe_load keeps the last one; a swarm running another aggregator than its file seems to say is worse
    path = tmp_path / "twice.yaml"
    text = TINY.read_text()
    path.write_text(text.replace("  aggregator: centered_clip", "  aggregator: mean\n  aggregator: centered_clip", 1))
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML at line \d+: duplicate key 'aggregator'"):
        load_config(str(path))

"""Held-out loss: which windows are scored (held-out documents only, the same on every peer) and how."""

from __future__ import annotations

import copy
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dragon_swarm.config import load_config
from dragon_swarm.data.dataset import build_token_stream
from dragon_swarm.data.tokenizer import TOKENIZER_NAME
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.training.evaluation import EVAL_BATCH_SIZE, eval_batches, eval_windows, evaluate_loss
from dragon_swarm.training.trainer import Trainer
from tests.swarm.paths import TEST_CONFIG

SEQ_LEN = 16


def _random_words(rng: random.Random, count: int) -> str:
    # made-up words: a window of 17 tokens from one document cannot occur in another by chance
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))) for _ in range(count))


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"doc{i:02d}.txt").write_text(_random_words(random.Random(i), 600))
    return build_token_stream(f"file:{corpus}", root / "data", root / "cache", TOKENIZER_NAME, val_fraction=0.25)


def _occurs(haystack: np.ndarray, needle: np.ndarray) -> bool:
    windows = np.lib.stride_tricks.sliding_window_view(haystack, needle.size)
    return bool((windows == needle).all(axis=1).any())


def test_every_window_comes_from_held_out_documents_only(streams):
    train, val = streams
    batches = eval_batches(val.tokens, SEQ_LEN, num_batches=4, swarm_seed=1234)
    assert len(batches) == 4 and all(inputs.shape == (EVAL_BATCH_SIZE, SEQ_LEN) for inputs, _ in batches)
    for inputs, targets in batches:
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        for row in range(len(inputs)):
            window = torch.cat([inputs[row], targets[row, -1:]]).numpy().astype(np.int32)
            assert _occurs(val.tokens, window)
            assert not _occurs(train.tokens, window), "a held-out window also occurs in the training stream"


def test_windows_depend_on_the_swarm_seed_only(streams):
    _, val = streams
    first = eval_windows(val.num_tokens, SEQ_LEN, 16, swarm_seed=1234)
    assert np.array_equal(first, eval_windows(val.num_tokens, SEQ_LEN, 16, swarm_seed=1234))
    assert not np.array_equal(first, eval_windows(val.num_tokens, SEQ_LEN, 16, swarm_seed=99))
    assert len(set(first.tolist())) == 16 and (np.diff(first) >= SEQ_LEN).all()  # distinct, non-overlapping
    # the peer-local batch size only changes how the same windows are chunked
    one_forward = eval_batches(val.tokens, SEQ_LEN, 2, 1234, chunk_size=32)
    small = eval_batches(val.tokens, SEQ_LEN, 2, 1234, chunk_size=4)
    assert len(one_forward) == 1 and len(small) == 4
    assert torch.equal(one_forward[0][0], torch.cat([x for x, _ in small]))
    model = _model(0)
    assert evaluate_loss(model, one_forward) == pytest.approx(evaluate_loss(model, small), abs=1e-5)


def test_a_short_stream_gives_the_windows_it_has():
    tokens = np.arange(50, dtype=np.int32)
    assert len(eval_windows(tokens.size, SEQ_LEN, 100, 0)) == (50 - 1) // SEQ_LEN
    with pytest.raises(ValueError):
        eval_windows(10, SEQ_LEN, 1, 0)


def _model(seed: int) -> HRMSMoE:
    config = load_config(TEST_CONFIG).model
    torch.manual_seed(seed)
    return HRMSMoE(config, LocalExperts.from_config(config))


def test_equal_weights_give_equal_loss_and_nothing_is_trained(streams):
    _, val = streams
    batches = eval_batches(val.tokens, SEQ_LEN, 2, 1234)
    a = _model(0)
    b = copy.deepcopy(a)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    loss_a, loss_b = evaluate_loss(a, batches), evaluate_loss(b, batches)
    assert loss_a == loss_b and 8.0 < loss_a < 10.0  # a fresh model: about ln(8192) = 9.01
    assert evaluate_loss(a, batches) == loss_a  # deterministic
    assert evaluate_loss(_model(1), batches) != loss_a
    assert a.training, "evaluation must leave the model in the mode it found it"
    assert all(p.grad is None for p in a.parameters()), "evaluation built an autograd graph"
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_trainer_evaluates_every_eval_every_model_versions(streams):
    _, val = streams
    config = load_config(TEST_CONFIG, {"training.eval_every": 2, "training.eval_batches": 1})
    trainer = Trainer.__new__(Trainer)  # the scheduling only: no DHT, no swarm optimizer
    trainer.config, trainer.val_stream, trainer.device = config, val, "cpu"
    trainer.model = _model(0)
    trainer.optimizer = SimpleNamespace(local_epoch=0)
    trainer._eval_set, trainer._next_eval_epoch = None, 0
    trainer.last_val_loss = trainer.last_val_epoch = None
    trainer.train_seconds = trainer.eval_seconds = 0.0
    evaluated = []
    for epoch in (0, 0, 1, 2, 2, 3, 5, 5, 6):  # 3 -> 5: a state download skipped version 4
        trainer.optimizer.local_epoch = epoch
        loss, seconds = trainer.maybe_evaluate()
        if loss is not None:
            evaluated.append(epoch)
            assert seconds > 0 and trainer.last_val_epoch == epoch
    assert evaluated == [0, 2, 5, 6]
    off = load_config(TEST_CONFIG, {"training.eval_every": 0})
    trainer.config, trainer._next_eval_epoch = off, 0
    assert trainer.maybe_evaluate() == (None, None)


def test_config_keys_are_listed_in_every_shipped_config():
    shipped = Path(__file__).resolve().parents[2] / "configs"
    for path in (shipped / "dragon-tiny.yaml", shipped / "hrm-smoe-125m.yaml", TEST_CONFIG):
        text = path.read_text()
        assert "eval_every:" in text and "eval_batches:" in text, path
    assert load_config(TEST_CONFIG).training.eval_every == 2

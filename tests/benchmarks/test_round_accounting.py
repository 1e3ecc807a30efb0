"""The robustness benchmark's accounting of an honest trainer's rounds, bans and refused parts, from log lines."""

from benchmarks.round_accounting import _elapsed, account_trainer, attack_start, epochs_per_micro_batch_together

ATTACKER = "QmAttacker1111"
HONEST = "QmHonest2222"

ATTACKER_LOG = """\
12:00:01 INFO dragon_swarm.peer_node: Swarm x, peer id QmAttacker1111
12:00:05 INFO dragon_swarm.training.trainer: micro-batch 1 epoch 0 loss 9.000 100 tokens/s
"""

TRAINER_LOG = """\
12:00:06 INFO hivemind.optim.optimizer: Skipping pre-scheduled averaging round: there are no other peers
12:00:07 INFO hivemind.optim.optimizer: Proceeding with local gradients
12:00:09 WARN dragon_swarm.averaging.robust_reducer: round r1: rejected part 3 from QmAttacker1111 (contains 64 NaN value(s) out of 64); excluded from the rest of the round
12:00:10 WARN dragon_swarm.averaging.robust_reducer: round r2: rejected part 0 from QmAttacker1111 (contains 12 NaN value(s) out of 64); excluded from the rest of the round
12:00:12 ERROR hivemind.averaging.averager: Averaging step failed: could not find a group
12:00:14 WARN dragon_swarm.averaging.reputation: banned QmAttacker1111 for 300 s: malformed part: contains NaN
12:00:15 WARN dragon_swarm.training.trainer: Banned trainer QmAttacker1111 for 299 s: malformed part (2 invalid part(s), distance 0.0x)
12:00:20 WARN RobustAllReduceRunner: ignoring the aggregates of banned reducer QmAttacker1111; keeping local values for its partition
"""


def test_rounds_bans_and_refusals_are_accounted_with_their_reasons():
    started = attack_start(ATTACKER_LOG)
    assert started == 12 * 3600 + 5
    result = account_trainer(TRAINER_LOG, {ATTACKER: started, "QmNeverBanned": started})
    assert result["rounds_not_averaged"] == {
        "alone: no other trainer ready": 1,
        "fell back to local gradients": 1,
        "no group found": 1,
        "banned reducer's partition kept local": 1,
    }
    assert result["refused_parts"] == {"contains N NaN value(s) out of N": 2}
    assert result["bans"][ATTACKER] == {"seconds_after_attack_start": 9, "reason": "malformed part: contains NaN"}
    assert result["bans"]["QmNeverBanned"] is None
    assert result["honest_peers_banned"] == []


def test_an_honest_peer_banned_is_reported_and_day_wrap_is_handled():
    log = "00:00:03 WARN x: banned QmHonest2222 for 300 s: distance EMA 9.1 > 5 x median for 3 rounds\n"
    result = account_trainer(log, {ATTACKER: 86399})
    assert result["honest_peers_banned"] == [HONEST]
    log += "00:00:04 WARN x: banned QmAttacker1111 for 300 s: far\n"
    assert account_trainer(log, {ATTACKER: 86399})["bans"][ATTACKER]["seconds_after_attack_start"] == 5


def test_a_ban_logged_before_the_attack_start_line_is_negative_not_a_day():
    assert _elapsed(86399, 3) == 4  # across midnight
    assert _elapsed(100, 99) == -1  # a second early, not 86399 s late


def test_the_pace_counts_only_micro_batches_all_honest_trainers_ran_together():
    # trainer a starts 10 s early and runs 5 micro-batches alone at epoch 0; b stops at t=30, a runs on alone
    a = [{"time": t, "epoch": 0} for t in range(0, 10, 2)] + [{"time": 10 + 2 * k, "epoch": k} for k in range(16)]
    b = [{"time": 10 + 2 * k, "epoch": k} for k in range(11)]  # t = 10..30, one epoch per micro-batch
    assert epochs_per_micro_batch_together([a, b]) == 1.0
    # final epochs tell a different story: a ended 5 versions ahead of b after as many micro-batches as b plus 10
    assert (a[-1]["epoch"], b[-1]["epoch"]) == (15, 10)
    half = [{"time": 10 + 2 * k, "epoch": k // 2} for k in range(11)]
    assert epochs_per_micro_batch_together([half, b]) == (0.5 + 1.0) / 2
    assert epochs_per_micro_batch_together([a, [{"time": 100, "epoch": 9}]]) is None  # never together
    assert epochs_per_micro_batch_together([]) is None

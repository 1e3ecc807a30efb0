"""`python -m dragon_swarm.export`: assemble what the swarm learned into ONE safetensors file a single process can run.

    python -m dragon_swarm.export --from-state-dir peerA peerB -c dragon-tiny --out model.safetensors

The trunk comes from the `trainer.safetensors` with the highest model version among the state dirs given; every
expert from `experts/<uid>.safetensors` in any of them (the copy with the most updates when several hosts kept one).
Everything is checked against the config's model (names, shapes, finite values) before anything is written. The
file holds the weights only, named as the state_dict of `HRMSMoE` with `LocalExperts` (what `dragon_swarm.generate`
loads), and metadata: the config (JSON), its hash, the model version, tokens trained, the latest held-out loss,
the date. The tokenizer file is copied next to it. `--model-version N` takes the trunk of that version from a
trainer's kept versions (`--keep-versions`), e.g. to roll a swarm back (`dragon_swarm.peer --new-swarm --init-from`).

    python -m dragon_swarm.export --initial-peers /ip4/.../p2p/Qm... -c dragon-tiny --out model.safetensors

exports from a live swarm instead, as a DHT client (`dragon_swarm.live_export`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from dragon_swarm.config import ConfigError, SwarmConfig, load_config
from dragon_swarm.data.tokenizer import TokenizerError, load_tokenizer, tokenizer_path
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.expert import ExpertFFN
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.moe.expert_uids import all_expert_uids, parse_uid
from dragon_swarm.state.atomic import atomic_write_bytes
from dragon_swarm.state.checkpoint import CheckpointError, load_module_checkpoint, save_tensors_atomic
from dragon_swarm.training.checkpoint import CHECKPOINT_NAME, TrainerState, read_trainer_state
from dragon_swarm.training.versions import kept_versions, version_path

PROG = "dragon_swarm.export"
FORMAT = "dragon_swarm.model.v1"
logger = logging.getLogger(PROG)


class ExportError(RuntimeError):
    """An export that cannot be done; one line meant for the user."""


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    tokenizer_path: Path
    model_version: int
    trunk_from: str
    experts_found: int
    experts_missing: tuple[str, ...]
    metadata: dict[str, str]


def expert_state_name(layer: int, index: int, name: str) -> str:
    """Where expert `layer.index`'s parameter `name` sits in the single-process model's state_dict."""
    return f"dispatcher.experts.{layer}.{index}.{name}"


def _finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def find_trunk(state_dirs: Sequence[Path], config: SwarmConfig) -> tuple[TrainerState, Path, int]:
    """(the state with the highest model version, its file, tokens trained by all the trainers found)."""
    found: list[tuple[TrainerState, Path]] = []
    for state_dir in state_dirs:
        path = Path(state_dir) / CHECKPOINT_NAME
        if not path.exists():
            continue
        state = read_trainer_state(path, config.run_prefix)  # logs why when it is corrupt or of another swarm
        if state is not None:
            found.append((state, path))
    if not found:
        raise ExportError(
            f"no usable {CHECKPOINT_NAME} of swarm {config.run_prefix} in {', '.join(map(str, state_dirs))} "
            "(a trainer's --state-dir holds one; check -c: it must be the swarm's config)"
        )
    state, path = max(found, key=lambda item: (item[0].local_epoch, item[0].micro_batches))
    return state, path, sum(s.tokens for s, _ in found)


def find_expert(uid: str, state_dirs: Sequence[Path], template: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor] | None, list[str]]:
    """The usable copy of `uid` with the highest `version` (updates applied), and why the other copies were refused."""
    best: tuple[int, dict[str, torch.Tensor]] | None = None
    refused: list[str] = []
    for state_dir in state_dirs:
        path = Path(state_dir) / "experts" / f"{uid}.safetensors"
        if not path.exists():
            continue
        try:
            weights, _, info = load_module_checkpoint(path)
            version = int(info.get("version", 0))
        except (CheckpointError, ValueError, TypeError) as e:
            refused.append(f"{path}: {e}")
            continue
        problem = _check_against(weights, template)
        if problem:
            refused.append(f"{path}: {problem}")
            continue
        if best is None or version > best[0]:
            best = (version, weights)
    return (None if best is None else best[1]), refused


def _check_against(weights: dict[str, torch.Tensor], template: dict[str, torch.Tensor]) -> str | None:
    missing, unexpected = sorted(set(template) - set(weights)), sorted(set(weights) - set(template))
    if missing or unexpected:
        return f"names differ from the config's model (missing {missing}, unexpected {unexpected})"
    for name, t in template.items():
        if tuple(weights[name].shape) != tuple(t.shape):
            return f"{name} has shape {tuple(weights[name].shape)}, the config's model needs {tuple(t.shape)}"
    bad = _finite(weights)
    return f"non-finite values in {', '.join(bad)}" if bad else None


def fresh_expert_state(uid: str, config: SwarmConfig) -> dict[str, torch.Tensor]:
    """The weights a fresh host gives `uid` (`moe.backend.build_expert_backends` seeds them the same way)."""
    from dragon_swarm.moe.backend import hash_uid

    with torch.random.fork_rng():
        torch.manual_seed(config.swarm.seed ^ (hash_uid(uid) & 0x7FFFFFFF))
        module = ExpertFFN(config.model.d_model, config.model.expert_hidden)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def export_from_state_dirs(
    state_dirs: Sequence[Path], config: SwarmConfig, out: Path, allow_missing: bool = False, model_version: int | None = None
) -> ExportSummary:
    """Assemble, validate and write the model file and the tokenizer beside it. Raises ExportError (one line).
    `model_version`: the trunk of that version, from a trainer's `trainer.safetensors` or its kept versions
    (`versions/trainer-v<N>.safetensors`, `--keep-versions`); the experts are the newest the state dirs hold."""
    state_dirs = [Path(d) for d in state_dirs]
    absent = [str(d) for d in state_dirs if not d.is_dir()]
    if absent:
        raise ExportError(f"--from-state-dir: no such directory: {', '.join(absent)}")
    m = config.model
    if model_version is None:
        trainer_state, trunk_path, tokens = find_trunk(state_dirs, config)
    else:
        trainer_state, trunk_path = find_trunk_version(state_dirs, config, model_version)
        tokens = trainer_state.tokens
    template = {k: v for k, v in ExpertFFN(m.d_model, m.expert_hidden).state_dict().items()}
    experts: dict[str, dict[str, torch.Tensor]] = {}
    for uid in all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts):
        weights, refused = find_expert(uid, state_dirs, template)
        for reason in refused:
            logger.warning(f"Refused a copy of expert {uid}: {reason}")
        if weights is not None:
            experts[uid] = weights
        elif not allow_missing:
            why = f"; refused: {refused[0]}" if refused else ""
            raise ExportError(
                f"expert {uid} is in none of the state dirs given{why} (add the state dir of a host that "
                "served it, or --allow-missing to use fresh init weights)"
            )
    return write_model_file(
        config, trainer_state.trunk, experts, out, trainer_state.local_epoch, tokens, str(trunk_path),
        val_loss=trainer_state.val_loss, val_epoch=trainer_state.val_epoch,
    )  # fmt: skip


def find_trunk_version(state_dirs: Sequence[Path], config: SwarmConfig, model_version: int) -> tuple[TrainerState, Path]:
    """A trainer's trunk of exactly `model_version`: its current checkpoint or one of its kept versions."""
    for state_dir in state_dirs:
        for path in (Path(state_dir) / CHECKPOINT_NAME, version_path(Path(state_dir), model_version)):
            if path.exists():
                state = read_trainer_state(path, config.run_prefix)
                if state is not None and state.local_epoch == model_version:
                    return state, path
    kept = sorted({v for d in state_dirs for v in kept_versions(Path(d))})
    raise ExportError(
        f"no trainer checkpoint of model version {model_version} in {', '.join(map(str, state_dirs))} "
        f"(kept versions there: {', '.join(map(str, kept)) or 'none'})"
    )


def write_model_file(
    config: SwarmConfig,
    trunk: dict[str, torch.Tensor],
    experts: dict[str, dict[str, torch.Tensor]],
    out: Path,
    model_version: int,
    tokens: int,
    trunk_from: str,
    val_loss: float | None = None,
    val_epoch: int | None = None,
) -> ExportSummary:
    """The one writer of model files (state dirs and live swarm alike): `trunk` as `HRMSMoE.trunk_state_dict()`,
    `experts` uid -> ExpertFFN state_dict (checked against the config's shapes by the caller); an expert not in
    `experts` gets fresh init weights and is listed in the metadata's `experts_missing`. Raises ExportError."""
    m = config.model
    model = HRMSMoE(m, LocalExperts.from_config(m))
    try:
        model.load_trunk_state_dict(trunk)
    except (ValueError, RuntimeError) as e:  # RuntimeError: a shape that differs from the config's model
        raise ExportError(f"{trunk_from} does not fit the config's model: {str(e).splitlines()[0]}") from None
    bad = _finite(trunk)
    if bad:
        raise ExportError(f"{trunk_from} has non-finite values in {', '.join(bad[:5])}")
    state = model.state_dict()
    missing: list[str] = []
    for uid in all_expert_uids(config.expert_prefix, m.num_moe_layers, m.num_experts):
        weights = experts.get(uid)
        if weights is None:
            missing.append(uid)
            logger.warning(f"Expert {uid} not found: using fresh init weights (--allow-missing)")
            weights = fresh_expert_state(uid, config)
        _, layer, index = parse_uid(uid)
        for name, t in weights.items():
            state[expert_state_name(layer, index, name)] = t
    model.load_state_dict(state, strict=True)  # every name of the single-process model, and only those

    tok_source = tokenizer_path(config.data.tokenizer)
    try:
        load_tokenizer(config.data.tokenizer)  # checks the shipped file against its pin before we copy it
    except TokenizerError as e:
        raise ExportError(str(e)) from None
    tok_bytes = tok_source.read_bytes()
    out = Path(out)
    tok_out = out.parent / f"{config.data.tokenizer}.json"
    metadata = {
        "format": FORMAT,
        "config": json.dumps(config.to_dict(), sort_keys=True, default=list),
        "config_hash": config.swarm_hash(),
        "run_prefix": config.run_prefix,
        "model_version": str(model_version),
        # what the trainers counted (state dirs given, or their self-reported records): a lower bound of the swarm's
        "tokens_trained": str(tokens),
        "tokenizer": config.data.tokenizer,
        "tokenizer_file": tok_out.name,
        "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(),
        "experts_missing": json.dumps(missing),
        "trunk_from": trunk_from,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if val_loss is not None and val_epoch is not None and math.isfinite(val_loss):
        metadata["val_loss"] = f"{val_loss:.6f}"
        metadata["val_loss_model_version"] = str(val_epoch)
    save_tensors_atomic(out, model.state_dict(), metadata)
    if tok_out.resolve() != tok_source.resolve():
        atomic_write_bytes(tok_out, tok_bytes)
    return ExportSummary(out, tok_out, model_version, trunk_from, len(experts), tuple(missing), metadata)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("--from-state-dir", nargs="+", type=Path, metavar="DIR", help="state dirs of trainers and hosts")
    parser.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="export from a live swarm (any of its peers, e.g. a bootstrap)")
    parser.add_argument("-c", "--config", required=True, help="the swarm's config: a YAML path or a shipped name")
    parser.add_argument("--out", type=Path, required=True, help="the model file to write (safetensors)")
    parser.add_argument("--allow-missing", action="store_true", help="fill experts found nowhere with fresh init weights")
    parser.add_argument("--model-version", type=int, metavar="N", help="with --from-state-dir: the trunk of this model version (a trainer's kept versions)")
    parser.add_argument("--timeout", type=float, default=60.0, help="with --initial-peers: seconds to wait for a trainer's state")
    parser.add_argument("--swarm-key", type=Path, metavar="FILE", help="with --initial-peers: a private swarm's key file")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.initial_peers) == bool(args.from_state_dir):
        print(f"{PROG}: error: give either --from-state-dir DIR [DIR...] or --initial-peers MADDR [MADDR...]", file=sys.stderr)
        return 2
    if args.model_version is not None and args.initial_peers:
        print(f"{PROG}: error: --model-version goes with --from-state-dir (a live swarm has only its current version)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        config = load_config(args.config)
        if args.initial_peers:
            from dragon_swarm.live_export import export_from_swarm

            from dragon_swarm.swarm.admission import read_swarm_key

            key = None if args.swarm_key is None else read_swarm_key(args.swarm_key)
            summary = export_from_swarm(args.initial_peers, config, args.out, args.allow_missing, args.timeout, args.config, key)
        else:
            summary = export_from_state_dirs(args.from_state_dir, config, args.out, args.allow_missing, args.model_version)
    except (ConfigError, ExportError, OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    val = summary.metadata.get("val_loss")
    logger.info(
        f"Exported model version {summary.model_version} to {summary.path} ({summary.path.stat().st_size / 1e6:.1f} MB) "
        f"in {time.perf_counter() - started:.1f} s: trunk from {summary.trunk_from}, {summary.experts_found} expert(s) found, "
        f"{len(summary.experts_missing)} filled with init weights, {summary.metadata['tokens_trained']} tokens trained, "
        f"held-out loss {val if val is not None else 'unknown'}; tokenizer at {summary.tokenizer_path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

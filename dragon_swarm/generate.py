"""`python -m dragon_swarm.generate`: sample text from an exported model file (`dragon_swarm.export`), in one process.

    python -m dragon_swarm.generate --model model.safetensors --prompt "ROMEO:" --max-new-tokens 100 --seed 1

The config comes from the file's metadata, the tokenizer from the file beside it (checked against its pinned
sha256) or else the shipped one the config names. Same file, prompt, settings and `--seed`: same text.
`--temperature 0` is greedy.

    python -m dragon_swarm.generate --initial-peers /ip4/.../p2p/Qm... -c dragon-tiny --prompt "ROMEO:" --seed 1

samples from a live swarm: the current model is exported into a temporary folder first (`dragon_swarm.live_export`:
the robust choice of the trainers' trunks, every expert from its hosts) and sampled here with the same sampler, so
the text is exactly what `--model` on that export would give, and one export serves every token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer

from dragon_swarm.config import ConfigError, SwarmConfig
from dragon_swarm.data.tokenizer import EOT_ID, PINNED_SHA256, TokenizerError, load_tokenizer
from dragon_swarm.model.dispatch import LocalExperts
from dragon_swarm.model.hrm_smoe import HRMSMoE
from dragon_swarm.state.checkpoint import CheckpointError, load_tensors

PROG = "dragon_swarm.generate"
logger = logging.getLogger(PROG)


class GenerateError(RuntimeError):
    """A model file or setting that cannot be used; one line meant for the user."""


@dataclass
class LoadedModel:
    model: HRMSMoE
    config: SwarmConfig
    tokenizer: Tokenizer
    metadata: dict[str, str]


def load_exported_model(path: Path, device: str = "cpu") -> LoadedModel:
    """The model of an exported file in eval mode, its config and tokenizer. Raises GenerateError (one line)."""
    path = Path(path)
    try:
        tensors, metadata = load_tensors(path)
    except CheckpointError as e:
        raise GenerateError(str(e)) from None
    try:
        config = SwarmConfig.from_dict(json.loads(metadata["config"]))
    except (KeyError, ValueError, ConfigError) as e:  # JSONDecodeError is a ValueError
        raise GenerateError(f"{path} has no usable config in its metadata ({e}); was it written by dragon_swarm.export?") from None
    if metadata.get("config_hash") not in (None, config.swarm_hash()):
        raise GenerateError(f"{path}: its config hashes to {config.swarm_hash()}, the file says {metadata['config_hash']}")
    model = HRMSMoE(config.model, LocalExperts.from_config(config.model))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise GenerateError(f"{path} does not fit its own config's model: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model, config, _tokenizer(path, metadata, config), metadata)


def _tokenizer(path: Path, metadata: dict[str, str], config: SwarmConfig) -> Tokenizer:
    name = metadata.get("tokenizer", config.data.tokenizer)
    beside = path.parent / metadata.get("tokenizer_file", f"{name}.json")
    if beside.is_file():
        data = beside.read_bytes()
        expected = PINNED_SHA256.get(name) or metadata.get("tokenizer_sha256")
        if expected and hashlib.sha256(data).hexdigest() != expected:
            raise GenerateError(f"tokenizer {beside} differs from the one the model was trained with (sha256 mismatch)")
        return Tokenizer.from_str(data.decode("utf-8"))
    try:
        return load_tokenizer(name)
    except TokenizerError as e:
        raise GenerateError(f"no tokenizer beside {path} and {e}") from None


@torch.no_grad()
def generate_ids(
    model: HRMSMoE,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_id: int | None = EOT_ID,
) -> list[int]:
    """New token ids after `prompt_ids` (at most `max_new_tokens`, ending early at `stop_id`, which is not returned).

    The context is the last `seq_len` tokens. temperature 0: argmax; else softmax(logits / temperature) over the
    `top_k` best (all when None), sampled with a generator seeded by `seed`, so a seed gives the same ids every time.
    """
    if temperature < 0 or max_new_tokens < 0 or (top_k is not None and top_k < 1):
        raise ValueError(f"need temperature >= 0, max_new_tokens >= 0, top_k >= 1; got {temperature}, {max_new_tokens}, {top_k}")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    ids = list(prompt_ids) or [EOT_ID]  # an empty prompt starts where a new document would
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            context = torch.tensor([ids[-model.config.seq_len :]], dtype=torch.long, device=device)
            logits, _ = model(context)
            last = logits[0, -1].float().cpu()
            if temperature == 0:
                token = int(last.argmax())
            else:
                scaled = last / temperature
                if top_k is not None and top_k < scaled.numel():
                    cutoff = torch.topk(scaled, top_k).values[-1]
                    scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
                token = int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))
            if stop_id is not None and token == stop_id:
                break
            ids.append(token)
            new.append(token)
    finally:
        model.train(was_training)
    return new


def generate_text(
    loaded: LoadedModel, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int | None = 50, seed: int | None = None
) -> str:
    """The prompt followed by what the model writes."""
    prompt_ids = loaded.tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    new = generate_ids(loaded.model, prompt_ids, max_new_tokens, temperature, top_k, seed)
    return prompt + loaded.tokenizer.decode(new, skip_special_tokens=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a file written by python -m dragon_swarm.export")
    parser.add_argument("--initial-peers", nargs="+", metavar="MADDR", help="sample from a live swarm (needs -c: the swarm's config)")
    parser.add_argument("-c", "--config", help="with --initial-peers: the swarm's config, a YAML path or a shipped name")
    parser.add_argument("--allow-missing", action="store_true", help="with --initial-peers: experts nobody serves get init weights")
    parser.add_argument("--swarm-key", type=Path, metavar="FILE", help="with --initial-peers: a private swarm's key file")
    parser.add_argument("--prompt", default="", help="text to continue (default: the start of a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens; 0: all")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same text")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.model is None) == (not args.initial_peers):
        print(f"{PROG}: error: give --model FILE (written by python -m dragon_swarm.export) or --initial-peers MADDR... -c CONFIG", file=sys.stderr)
        return 2
    if args.initial_peers and args.config is None:
        print(f"{PROG}: error: --initial-peers needs -c CONFIG (the swarm's config)", file=sys.stderr)
        return 2
    try:
        if args.initial_peers:
            text = _generate_live(args)
        else:
            loaded = load_exported_model(args.model, args.device)
            text = generate_text(loaded, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed)
    except (GenerateError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0


def _generate_live(args: argparse.Namespace) -> str:
    """Export the live swarm's current model into a temporary folder, then sample from it. Raises GenerateError."""
    import tempfile

    from dragon_swarm.config import load_config
    from dragon_swarm.export import ExportError
    from dragon_swarm.live_export import export_from_swarm
    from dragon_swarm.swarm.admission import read_swarm_key

    try:
        config = load_config(args.config)
        key = None if args.swarm_key is None else read_swarm_key(args.swarm_key)
        with tempfile.TemporaryDirectory(prefix="dragon-generate-") as folder:
            summary = export_from_swarm(args.initial_peers, config, Path(folder) / "model.safetensors", args.allow_missing,
                                        config_name=args.config, swarm_key=key)  # fmt: skip
            loaded = load_exported_model(summary.path, args.device)
    except (ConfigError, ExportError, ValueError) as e:
        raise GenerateError(str(e)) from None
    logger.info(f"Sampling from model version {summary.model_version} of the live swarm")
    return generate_text(loaded, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed)


if __name__ == "__main__":
    sys.exit(main())

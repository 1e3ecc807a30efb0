"""`python -m dragon_swarm.keys`: make the files a private or Sybil-costly swarm needs.

    python -m dragon_swarm.keys swarm-key swarm.key            # a new private swarm's key (share it with its peers)
    python -m dragon_swarm.keys identity id.key --bits 12      # a peer identity with 12 bits of identity work

A peer makes its own identity and work at first start (in its state dir); `identity` is for doing the work ahead,
for a bootstrap's --identity, or for a config whose identity_bits was raised.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

PROG = "dragon_swarm.keys"


def write_swarm_key(path: Path) -> None:
    from dragon_swarm.swarm.admission import new_swarm_key

    if path.exists():
        raise FileExistsError(f"{path} exists: a swarm key is never overwritten (its peers would lose the swarm)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(new_swarm_key() + "\n")


def make_identity(path: Path, bits: int) -> tuple[str, int]:
    """The identity at `path` (created if missing) with at least `bits` bits of work saved beside it; its peer id and bits."""
    from hivemind.p2p import P2P, PeerID

    from dragon_swarm.swarm.identity_work import ensure_work

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    peer_id = PeerID.from_identity(path.read_bytes())
    work = ensure_work(peer_id.to_bytes(), bits, path)
    return peer_id.to_base58(), work.bits


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Make a private swarm's key or a peer identity with identity work.")
    commands = parser.add_subparsers(dest="command", required=True)
    key = commands.add_parser("swarm-key", help="write a new random swarm key (hex) to FILE")
    key.add_argument("file", type=Path)
    identity = commands.add_parser("identity", help="create (or reuse) the identity key FILE and its identity work")
    identity.add_argument("file", type=Path)
    identity.add_argument("--bits", type=int, required=True, help="the swarm config's swarm.identity_bits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "swarm-key":
            write_swarm_key(args.file)
            print(f"Wrote a new swarm key to {args.file}: give it to every peer of the swarm (--swarm-key {args.file})")
        else:
            if not 0 <= args.bits <= 32:
                parser.error("--bits must be in [0, 32]")
            peer_id, bits = make_identity(args.file, args.bits)
            print(f"Identity {args.file}: peer id {peer_id}, {bits} bits of identity work (saved in {args.file}.work)")
    except (OSError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

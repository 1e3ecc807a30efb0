"""What a peer identity costs: a proof of memory-hard work bound to the peer id (Sybil cost, issue 12).

A swarm with `swarm.identity_bits: N` admits a peer only if it shows a nonce for which
scrypt(peer id, nonce) starts with N zero bits: about 2**N scrypt evaluations to find (each ~10 ms and 4 MiB on one
CPU core, so GPUs gain little), one to check. The nonce is found once per identity and kept beside the key file
(`<identity>.work`), so a restart costs nothing; a thousand fresh identities cost a thousand times the work.

Pure functions plus one file; no network. `python -m dragon_swarm.keys identity FILE --bits N` makes one ahead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from dragon_swarm.state.atomic import atomic_write_text

logger = logging.getLogger(__name__)

# 4 MiB of memory per evaluation (128 * r * n bytes): cheap to check, expensive to parallelise on a GPU
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**12, 8, 1
_DOMAIN = b"dragon-swarm identity work v1:"
SECONDS_PER_TRY = 0.01  # measured on this project's 2-core CPU machines; for the estimate in the log line only


def work_digest(peer_id: bytes, nonce: bytes) -> bytes:
    return hashlib.scrypt(_DOMAIN + peer_id, salt=nonce, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)


def leading_zero_bits(digest: bytes) -> int:
    bits = 0
    for byte in digest:
        if byte == 0:
            bits += 8
            continue
        return bits + 8 - byte.bit_length()
    return bits


def work_bits(peer_id: bytes, nonce: bytes) -> int:
    """How many leading zero bits the work (`peer_id`, `nonce`) carries; 0 for a nonce of the wrong size."""
    if len(nonce) != 8:
        return 0
    return leading_zero_bits(work_digest(peer_id, nonce))


def find_work(peer_id: bytes, bits: int, start: int | None = None) -> bytes:
    """An 8-byte nonce whose work carries at least `bits` leading zero bits (expected 2**bits tries)."""
    counter = int.from_bytes(os.urandom(8), "big") if start is None else start
    while True:
        nonce = (counter % 2**64).to_bytes(8, "big")
        if work_bits(peer_id, nonce) >= bits:
            return nonce
        counter += 1


@dataclass(frozen=True)
class IdentityWork:
    peer_id: bytes
    nonce: bytes
    bits: int  # what the nonce carries (at least what was asked)


def work_path(identity_path: Path) -> Path:
    return Path(f"{identity_path}.work")


def load_work(identity_path: Path, peer_id: bytes) -> IdentityWork | None:
    """The saved work for this identity, if the file is there, is for this peer id, and checks out."""
    path = work_path(identity_path)
    try:
        saved = json.loads(path.read_text())
        nonce = bytes.fromhex(saved["nonce"])
        if bytes.fromhex(saved["peer_id"]) != peer_id:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    bits = work_bits(peer_id, nonce)
    return IdentityWork(peer_id, nonce, bits)


def ensure_work(peer_id: bytes, bits: int, identity_path: Path | None = None) -> IdentityWork:
    """Work with at least `bits` bits for `peer_id`: the saved one when it suffices, else found now (and saved
    beside `identity_path` when given; a read-only location only costs finding it again next time)."""
    if identity_path is not None:
        saved = load_work(identity_path, peer_id)
        if saved is not None and saved.bits >= bits:
            return saved
    if bits > 0:
        logger.info(
            f"Proving this identity's work for the swarm: {bits} bits, about {2**bits} scrypt evaluations "
            f"(~{2**bits * SECONDS_PER_TRY:.0f} s on one CPU core, once per identity)"
        )
    started = time.monotonic()
    nonce = find_work(peer_id, bits)
    work = IdentityWork(peer_id, nonce, work_bits(peer_id, nonce))
    if bits > 0:
        logger.info(f"Identity work done: {work.bits} bits in {time.monotonic() - started:.1f} s")
    if identity_path is not None:
        try:
            atomic_write_text(work_path(identity_path), json.dumps({"peer_id": peer_id.hex(), "nonce": nonce.hex(), "bits": work.bits}))
        except OSError as e:
            logger.warning(f"Could not save the identity work beside {identity_path}: {e.strerror or e}")
    return work

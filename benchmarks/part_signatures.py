"""What sealing all-reduce parts costs (`dragon_swarm.averaging.part_signatures`): milliseconds to seal one part
on the sender and to check it on the reducer, and both as a share of a round of the given model size.

    python -m benchmarks.part_signatures --parts 64 --part-bytes 524288 --params 125000000

Prints one JSON object. The model's parameters are split into parts of `--part-bytes` bytes (hivemind's default
part size is 512 KiB, in float32 values); each peer seals every part it sends and checks every part it receives.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p.p2p_daemon import P2P
from hivemind.proto import runtime_pb2

from dragon_swarm.averaging.part_signatures import PartSigner, check_seal, part_statement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=64, help="parts to time")
    parser.add_argument("--part-bytes", type=int, default=2**19, help="float32 bytes per part before compression")
    parser.add_argument("--params", type=int, default=125_000_000, help="model size, for the per-round estimate")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "identity.key"
        P2P.generate_identity(str(path))
        signer = PartSigner.from_identity_file(path)
    part = serialize_torch_tensor(torch.randn(args.part_bytes // 4), runtime_pb2.CompressionType.FLOAT16)
    group = bytes(16)

    started = time.perf_counter()
    seals = []
    for index in range(args.parts):
        seals.append(signer.seal(part_statement(group, signer.peer_id, "QmReducer", index, 1.0, part.SerializeToString())))
    seal_ms = (time.perf_counter() - started) * 1e3 / args.parts

    started = time.perf_counter()
    for index, seal in enumerate(seals):
        problem = check_seal(seal, part_statement(group, signer.peer_id, "QmReducer", index, 1.0, part.SerializeToString()), signer.peer_id)
        assert problem is None, problem
    check_ms = (time.perf_counter() - started) * 1e3 / args.parts

    parts_per_round = -(-args.params * 4 // args.part_bytes)
    print(json.dumps({
        "part_bytes_fp32": args.part_bytes,
        "part_bytes_on_wire": len(part.SerializeToString()),
        "seal_bytes": len(seals[0]),
        "seal_ms_per_part": round(seal_ms, 3),
        "check_ms_per_part": round(check_ms, 3),
        "params": args.params,
        "parts_per_round": parts_per_round,
        "seal_seconds_per_round": round(seal_ms * parts_per_round / 1e3, 3),
        "check_seconds_per_round": round(check_ms * parts_per_round / 1e3, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()

"""What an expert host's announcements cost on its link, apart from any training: bytes per second each DHT node sends
while idle, while re-announcing its experts every `experts.update_period` (our signed replica records and hivemind's
stock records, together and each alone), and while reading the registry as placement does.

    python -m benchmarks.registry_traffic --nodes 5 --experts 8 --update-period 5 --seconds 30

Real hivemind DHT nodes (real p2pd) on loopback, each behind a `benchmarks.wan_link` link that counts bytes (no delay,
no rate cap). Node 0 is the bootstrap; every other node hosts `--experts` experts, its experts overlapping its
neighbour's as replicas do. Prints one JSON object: per phase, the bytes per second each node sent, and the bytes
one host sends per announcement of all its experts.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Callable

from hivemind.moe.server.dht_handler import declare_experts
from hivemind.utils import get_dht_time

from benchmarks.wan_peers import WanLinks
from dragon_swarm.moe.registry import HOST_RECORDS, ExpertHostRecord, declare_hosted_experts, find_replicas, hosts_key
from dragon_swarm.swarm.dht_node import start_dht


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5, help="DHT nodes, the bootstrap included")
    parser.add_argument("--experts", type=int, default=8, help="experts each host announces")
    parser.add_argument("--rows", type=int, default=1, help="MoE layers the experts spread over (dragon-tiny: 2, hrm-smoe-125m: 8)")
    parser.add_argument("--update-period", type=float, default=5.0, help="seconds between announcements")
    parser.add_argument("--expiration", type=float, default=20.0, help="seconds an announcement lives")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each phase")
    args = parser.parse_args()

    links, dhts = WanLinks(), []
    try:
        for _ in range(args.nodes):
            peer = links.new()
            initial = [f"/ip4/127.0.0.1/tcp/{links.links[0].link.port}/p2p/{dhts[0].peer_id}"] if dhts else []
            dhts.append(start_dht(initial_peers=initial, host_maddrs=[peer.host_maddr], announce_maddrs=[peer.announce_maddr]))
        time.sleep(5.0)  # routing tables fill
        hosts = dhts[1:]
        total = max(args.experts, len(hosts) * args.experts // 2)
        uids = [f"expert.{i % args.rows}.{i // args.rows}" for i in range(total)]
        held = {dht: [uids[(k * args.experts // 2 + j) % total] for j in range(args.experts)] for k, dht in enumerate(hosts)}

        def records(dht) -> dict[str, ExpertHostRecord]:
            me = dht.peer_id.to_base58()
            return {uid: ExpertHostRecord(peer_id=me, state="online", throughput=100.0, version=1, adaptive=True) for uid in held[dht]}

        def both() -> None:
            for dht in hosts:
                declare_hosted_experts(dht, records(dht), get_dht_time() + args.expiration)

        def signed_only() -> None:
            for dht in hosts:
                HOST_RECORDS.store_many(dht, {hosts_key(u): r for u, r in records(dht).items()}, get_dht_time() + args.expiration)

        def stock_only() -> None:
            for dht in hosts:
                declare_experts(dht, held[dht], expiration_time=get_dht_time() + args.expiration)

        def read_registry() -> None:
            for dht in hosts:
                find_replicas(dht, uids, only_online=False)

        def phase(action: Callable[[], None] | None, period: float) -> dict:
            before, started, ticks = [links.bytes_sent_by(p) for p in links.links], time.monotonic(), 0
            while time.monotonic() - started < args.seconds:
                tick = time.monotonic()
                if action is not None:
                    action()
                    ticks += 1
                time.sleep(max(period - (time.monotonic() - tick), 0.0))
            seconds = time.monotonic() - started
            sent = [links.bytes_sent_by(p) - b for p, b in zip(links.links, before)]
            per_host = sum(sent[1:]) / len(hosts)
            return {
                "bytes_per_s_per_node": [round(s / seconds) for s in sent],
                "host_bytes_per_s": round(per_host / seconds),
                "host_bytes_per_announcement": round(per_host / ticks) if ticks else None,
            }

        result = {
            "nodes": args.nodes, "experts_per_host": args.experts, "rows": args.rows, "update_period_s": args.update_period,
            "idle": phase(None, args.update_period),
            "announce_both": phase(both, args.update_period),
            "announce_signed_records_only": phase(signed_only, args.update_period),
            "announce_stock_records_only": phase(stock_only, args.update_period),
            "read_registry_every_10s": phase(read_registry, 10.0),
        }  # fmt: skip
        result["host_mb_per_hour_announcing"] = result["announce_both"]["host_bytes_per_s"] * 3600 / 1e6
        print(json.dumps(result))
    finally:
        for dht in dhts:
            dht.shutdown()
        links.stop_all()


if __name__ == "__main__":
    main()

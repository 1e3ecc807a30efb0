"""Run real peers behind :class:`~benchmarks.wan_link.WanLink`: the peer listens on a private loopback port and
announces its link's port, so every connection another peer dials to it crosses the link.

    links = WanLinks()
    try:
        link = links.new(delay_ms=25, mbit=20)
        launcher.start("trainer0", [..., *link.flags])
        ...
        print(link.bytes_out)
    finally:
        links.stop_all()

p2pd (hivemind's libp2p daemon) listens on ``--host-maddrs`` and hands out only ``--announce-maddrs`` as its
addresses (identify, the DHT's initial-peers line), so peers dial the link. A connection that peer A dials to
peer B crosses B's link only, in both directions (see ``benchmarks.wan_link``); libp2p's TCP transport dials from
its listen port (SO_REUSEPORT), so the link on B's side sees A's *private* port as the dialer's source port and
:meth:`WanLinks.bytes_sent_by` can attribute those bytes to A.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.wan_link import WanLink, free_port


@dataclass
class PeerLink:
    """One peer's link: ``private_port`` is where the peer listens, ``link.port`` what it announces."""

    link: WanLink
    private_port: int

    @property
    def host_maddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.private_port}"

    @property
    def announce_maddr(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.link.port}"

    @property
    def flags(self) -> list[str]:
        """The peer's (or bootstrap's) command-line flags that put it behind this link."""
        return ["--host-maddrs", self.host_maddr, "--announce-maddrs", self.announce_maddr]


def link_peer(delay_ms: float = 0.0, mbit: float | None = None) -> PeerLink:
    """A started link in front of a free private port (the caller stops ``.link``)."""
    private_port = free_port()
    return PeerLink(WanLink(private_port, delay_ms, mbit).start(), private_port)


def link_peer_flags(delay_ms: float = 0.0, mbit: float | None = None) -> tuple[WanLink, list[str]]:
    """``(link, flags)``: the started link and the flags ``--host-maddrs <private> --announce-maddrs <link>``."""
    peer = link_peer(delay_ms, mbit)
    return peer.link, peer.flags


class WanLinks:
    """The links of one run; :meth:`stop_all` (call it in a ``finally``) stops every one of them."""

    def __init__(self) -> None:
        self.links: list[PeerLink] = []

    def new(self, delay_ms: float = 0.0, mbit: float | None = None) -> PeerLink:
        peer = link_peer(delay_ms, mbit)
        self.links.append(peer)
        return peer

    def bytes_sent_by(self, peer: PeerLink) -> int:
        """What ``peer`` sent over every link: out of its own link (connections dialed to it) plus into the other
        links on connections it dialed (recognised by its private port as their source port)."""
        sent = peer.link.bytes_out
        for other in self.links:
            if other is not peer:
                sent += other.link.bytes_from_client_port().get(peer.private_port, (0, 0))[0]
        return sent

    def bytes_received_by(self, peer: PeerLink) -> int:
        received = peer.link.bytes_in
        for other in self.links:
            if other is not peer:
                received += other.link.bytes_from_client_port().get(peer.private_port, (0, 0))[1]
        return received

    def unattributed_bytes(self) -> int:
        """Bytes (both ways) on connections whose source port is no peer's private port: what
        :meth:`bytes_sent_by` cannot attribute (libp2p dialed from an ephemeral port). Should stay 0."""
        ours = {peer.private_port for peer in self.links}
        return sum(
            bytes_in + bytes_out
            for peer in self.links
            for port, (bytes_in, bytes_out) in peer.link.bytes_from_client_port().items()
            if port not in ours
        )

    def stop_all(self) -> None:
        for peer in self.links:
            peer.link.stop()

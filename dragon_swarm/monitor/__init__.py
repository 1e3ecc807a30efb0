"""What a volunteer sees: the peer's live status, the terminal panel, the web dashboard and /metrics."""

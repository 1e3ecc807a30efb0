"""What a volunteer sees: the peer's live status, the terminal panel, the web dashboard, /metrics, the swarm view and
the leaderboard. Fed by the events the trainer and host publish; nothing below imports this package."""

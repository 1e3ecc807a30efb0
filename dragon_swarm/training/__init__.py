"""The trainer role: dense trunk, data shard, swarm optimizer, stats."""

"""The trainer role: dense trunk, data shard, the gradient each micro-batch contributes, the swarm optimizer, its
checkpoint and the stats file."""

"""What a peer keeps on disk: safetensors checkpoints, and the one atomic-write helper."""

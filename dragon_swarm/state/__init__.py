"""What a peer keeps on disk: safetensors checkpoints written atomically."""

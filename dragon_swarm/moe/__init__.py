"""Experts over the network: uids, the replica registry, hosting and routing."""

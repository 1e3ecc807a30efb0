"""Tests of dragon_swarm.resources: memory limits, measured batch sizes, peer profiles."""

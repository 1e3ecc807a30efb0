"""Swarm configs shipped with dragon_swarm: packaged as dragon_swarm.configs (see dragon_swarm/paths.py)."""

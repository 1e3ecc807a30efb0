"""Peer resource profiles shipped with dragon_swarm: packaged as dragon_swarm.profiles (see dragon_swarm/paths.py)."""

"""Joining the swarm: DHT node start-up, identity, addresses."""

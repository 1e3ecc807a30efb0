"""Tests of the swarm config schema (dragon_swarm.config), the shipped configs and where package files live."""

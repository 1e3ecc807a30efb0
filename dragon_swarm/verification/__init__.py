"""Verification by recomputation (BTARD's idea): what a trainer sent can be recomputed by another trainer.

Batches are deterministic (swarm seed, peer id, step) and every trainer of one model version holds the same trunk, so
the only inputs a checker lacks are the sender's worker momentum and the answers its remote experts gave. The sender
records those answers (`transcript`), commits to everything that decides its round (`commitment`), and a checker
replays the round through the same code (`recompute`) and compares.
"""

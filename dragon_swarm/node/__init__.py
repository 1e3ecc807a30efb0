"""A peer as a program: its options (one schema, flags and env derived), signals and exit, the processes it owns,
its state-dir lock, start-up and shutdown (`PeerNode`)."""

from pathlib import Path

TEST_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "swarm-test.yaml"

"""Packaging glue that pyproject.toml cannot say: every dragon_swarm package, plus the repository's configs/ and
peers/ folders shipped inside the package as dragon_swarm.configs and dragon_swarm.profiles (package data found
through importlib.resources, see dragon_swarm/paths.py). Everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

SHIPPED = {"dragon_swarm.configs": "configs", "dragon_swarm.profiles": "peers"}

setup(packages=find_namespace_packages(include=["dragon_swarm", "dragon_swarm.*"]) + list(SHIPPED), package_dir=SHIPPED)

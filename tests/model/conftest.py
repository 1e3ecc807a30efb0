import pytest


@pytest.fixture(autouse=True)
def _model_tests_use_one_torch_thread(one_torch_thread):
    """The model tests use toy sizes (see `one_torch_thread` in tests/conftest.py)."""
    yield

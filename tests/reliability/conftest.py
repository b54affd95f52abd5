"""Fixtures shared with tests/serve: the micro model is built once per session for both."""

from tests.serve.conftest import micro_dir  # noqa: F401  (a fixture, used by name)

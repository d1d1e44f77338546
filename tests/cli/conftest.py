"""Shared fixtures of the command-line tests."""

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI configures the ``sparselens`` logger; leave it as other tests expect it."""
    logger = logging.getLogger("sparselens")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved

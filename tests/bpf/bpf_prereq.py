"""Prerequisite checks of the bcc end-to-end test: skip loudly, or fail under CI=true."""

import os

import pytest


def in_ci():
    return os.environ.get("CI", "").lower() == "true"


def need(cond, reason):
    """Skip loudly when a prerequisite is missing; under CI=true, fail."""
    if cond:
        return
    if in_ci():
        pytest.fail("CI=true and a prerequisite is missing: " + reason)
    pytest.skip("SKIPPED, PREREQUISITE MISSING: " + reason)

"""Marker and prerequisite helper of the bcc tracer's end-to-end test."""

import os

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bpf: bcc tracer (bpf/kvmcoredump.py) run inside the emulated L1 machine")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/bpf/" in str(item.fspath):
            item.add_marker(pytest.mark.bpf)


def in_ci():
    return os.environ.get("CI", "").lower() == "true"


def need(cond, reason):
    """Skip loudly when a prerequisite is missing; under CI=true, fail."""
    if cond:
        return
    if in_ci():
        pytest.fail("CI=true and a prerequisite is missing: " + reason)
    pytest.skip("SKIPPED, PREREQUISITE MISSING: " + reason)

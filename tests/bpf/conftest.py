"""Marker of the bcc tracer's end-to-end test (tests/bpf)."""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bpf: bcc tracer (bpf/kvmcoredump.py) run inside the emulated L1 machine")


def pytest_collection_modifyitems(items):
    for item in items:
        if "/tests/bpf/" in str(item.fspath):
            item.add_marker(pytest.mark.bpf)

"""Marker of the bcc tracer's end-to-end test (tests/bpf)."""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bpf: bcc tracer (bpf/kvmcoredump.py) run inside the emulated L1 machine")
    config.addinivalue_line(
        "markers", "bpf_vmx: the bpf tier under Bochs (VMX): too slow for CI, runs with --bpf-vmx")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/bpf/" in str(item.fspath):
            item.add_marker(pytest.mark.bpf)
    if config.getoption("--bpf-vmx"):
        return
    slow = [i for i in items if i.get_closest_marker("bpf_vmx")]
    if slow:     # deselected, never skipped: CI does not count them
        config.hook.pytest_deselected(items=slow)
        items[:] = [i for i in items if not i.get_closest_marker("bpf_vmx")]

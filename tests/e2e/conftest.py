"""The e2e marker on every test here, and the wall time of each boot at the end."""

import pytest

from harness import boots


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


def pytest_terminal_summary(terminalreporter):
    if boots.timings:
        terminalreporter.write_sep("-", "kvmnote e2e boots (wall time per boot)")
        for name, t, n in boots.timings:
            terminalreporter.write_line(f"{name:40s} {t:7.1f} s  ({n} scenarios)")

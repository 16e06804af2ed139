"""Acceptance tests: kvmnote's output read by real software, against real QEMU."""


def pytest_configure(config):
    config.addinivalue_line("markers", "acceptance: real QEMU + Linux guest inside the "
                            "patched kernel under QEMU TCG (minutes; needs root)")

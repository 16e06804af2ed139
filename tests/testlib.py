"""What the test tiers share: the prerequisite check (the L1 machines' kernel command
line, TSC setting included, lives in harness/cmdline.py).

Outside CI a missing tool, package or privilege skips the test, loudly, with the
reason and the fix. Under CI=true (.ci/run sets it) the same is a failure: CI on
this machine must run every tier, never count a skip as a pass.
"""

import os

import pytest

def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(cond: bool, reason: str) -> None:
    """Return if `cond`; else skip with `reason`, or fail under CI=true."""
    if cond:
        return
    if in_ci():
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}")
    pytest.skip(f"SKIPPED, PREREQUISITE MISSING: {reason}")

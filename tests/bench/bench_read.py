"""Time `kvmnote read --json` on a small core, a large sparse core and a 256-vCPU core.

Run: python tests/bench/bench_read.py   (prints figures, asserts nothing)
"""

import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

import corebuilder as cb  # noqa: E402
from kvmnote.cli import main  # noqa: E402

REPEAT = 7


def median_time(path: Path) -> float:
    """Median wall time of an in-process `kvmnote read --json path`."""
    times = []
    for _ in range(REPEAT):
        out = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(out):
            rc = main(["read", "--json", str(path)])
        times.append(time.perf_counter() - start)
        if rc:
            raise SystemExit(f"kvmnote read failed on {path}")
    return statistics.median(times)


def main_bench() -> None:
    """Build the three cores in a temp dir and print the timings."""
    with tempfile.TemporaryDirectory() as d:
        small, large, wide = Path(d) / "small", Path(d) / "large", Path(d) / "wide"
        cb.standard_core(small, nr_vcpus=4)
        cb.standard_core(large, nr_vcpus=4, big=8 << 30)
        cb.standard_core(wide, nr_vcpus=256)
        t_small, t_large, t_wide = median_time(small), median_time(large), median_time(wide)
        print(f"small core ({os.path.getsize(small)} bytes, 4 vCPUs): {t_small * 1e3:.1f} ms")
        print(f"large sparse core ({os.path.getsize(large) / 2**30:.1f} GiB apparent, "
              f"{os.stat(large).st_blocks * 512 // 1024} KiB on disk, 4 vCPUs): "
              f"{t_large * 1e3:.1f} ms")
        print(f"ratio large/small: {t_large / t_small:.2f} (target <= 1.2)")
        print(f"256-vCPU core ({os.path.getsize(wide) // 1024} KiB): {t_wide * 1e3:.1f} ms")


if __name__ == "__main__":
    main_bench()

"""The unit tests import tests/testlib.py (need()) and corebuilder.py by name."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

"""The benchmarks' tests also use the test helpers (``tests/helpers.py``) and fixtures, as the suite does."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if TESTS not in sys.path:
    sys.path.append(TESTS)

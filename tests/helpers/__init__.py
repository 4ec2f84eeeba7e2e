"""Test helpers (test-only: torch + transformers).

Importing this package moves the repository root to the end of sys.path. The tests need the
root importable (for `tests.helpers` and `benchmarks.*`), but its kernels/ and models/
directories are installed as pagedjax.kernels and pagedjax.models: ahead of site-packages,
they would shadow PyPI packages of those names (transformers >= 5.25 imports HF's
`kernels`). The conftest imports this package before any test module, and the subprocess
helpers run as `python -m tests.helpers.<name>`, so it runs first there too.
"""

import os
import sys


def _move_repository_root_last() -> None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    others = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != root]
    sys.path[:] = [*others, root]


_move_repository_root_last()

"""The benchmark scripts run as `python benchmarks/<name>.py`, with benchmarks/ first on
sys.path: a script named after an installed package would be imported in its place (a
benchmarks/kernels.py once shadowed HF's `kernels`, which transformers imports)."""

import importlib.machinery
import os
import sys

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks")


def test_no_script_is_named_after_an_installed_package():
    installed = [p for p in sys.path if os.path.basename(p) in ("site-packages", "dist-packages")]
    assert installed
    names = [f[:-3] for f in os.listdir(BENCHMARKS) if f.endswith(".py")]
    shadowing = [n for n in names if n in sys.stdlib_module_names
                 or importlib.machinery.PathFinder.find_spec(n, installed) is not None]
    assert not shadowing, f"benchmarks/ scripts named after installed packages: {shadowing}"

"""Package discovery for the wheel; all other settings live in pyproject.toml.

models/ and kernels/ sit at the repository's top level but install as pagedjax.models and
pagedjax.kernels. pyproject.toml's `packages.find` cannot express that (it names packages
by their directory and ignores package-dir), and a hand-written list silently drops any
package added later, so the packages are found here, under each of the three roots.
"""

from setuptools import find_packages, setup

# Installed package name -> the directory holding its source.
ROOTS = {"pagedjax": "pagedjax", "pagedjax.models": "models", "pagedjax.kernels": "kernels"}


def discover_packages() -> list[str]:
    """Every package under each root (a directory with an __init__.py), by installed name."""
    packages = []
    for name, directory in ROOTS.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=directory)]
    return packages


# A subpackage's directory follows from its root's (pagedjax.models.x -> models/x).
setup(packages=discover_packages(), package_dir=ROOTS)

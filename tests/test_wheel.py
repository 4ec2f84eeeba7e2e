"""The wheel ships the whole package: built from the repository, installed into a fresh
virtualenv away from the source tree, every source module is there and imports, the C++
kernel source is beside pagedjax.kernels, and the `pagedjax` command runs."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Source directory -> the package it installs as. Stated here rather than read from setup.py,
# so that a discovery bug there cannot hide itself.
SOURCE_ROOTS = {"pagedjax": "pagedjax", "models": "pagedjax.models",
                "kernels": "pagedjax.kernels"}
BUILD_INPUTS = ["pyproject.toml", "setup.py", "README.md", *SOURCE_ROOTS]

# Run inside the fresh venv: import every installed module and report what it found.
IMPORT_ALL = textwrap.dedent("""
    import importlib, json, os, pkgutil, sys
    import pagedjax, pagedjax.kernels

    def fail(name):
        raise ImportError(f"cannot import {name}")

    # walk_packages ignores a package that fails to import unless onerror raises.
    found = ["pagedjax"]
    for info in pkgutil.walk_packages(pagedjax.__path__, "pagedjax.", onerror=fail):
        importlib.import_module(info.name)
        found.append(info.name)
    print(json.dumps({
        "file": pagedjax.__file__,
        "modules": sorted(found),
        "kernel_files": sorted(os.listdir(os.path.dirname(pagedjax.kernels.__file__))),
        "editable_finders": [repr(f) for f in sys.meta_path if "editable" in repr(f)],
    }))
""")


def _run(args, cwd, env, timeout=300):
    # Capture output so a failure shows the child's traceback in the assertion message.
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _source_modules(root: pathlib.Path) -> set[str]:
    # Every .py file under each source root, by the name it must have once installed.
    modules = set()
    for directory, package in SOURCE_ROOTS.items():
        for path in (root / directory).rglob("*.py"):
            parts = path.relative_to(root / directory).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.add(".".join((package, *parts)))
    return modules


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """Build the wheel from a copy of the build inputs, install it into a new virtualenv
    that borrows this venv's dependencies; return (venv dir, source copy, env, cwd)."""
    pytest.importorskip("pip")
    pytest.importorskip("venv")
    import venv

    tmp = tmp_path_factory.mktemp("wheel")
    # Build from a copy: setuptools reuses an in-tree build/ dir, whose stale files (a
    # module deleted since) would go into the wheel, and the shared tree stays untouched.
    source = tmp / "source"
    source.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(JAX_PLATFORMS="cpu", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", str(tmp / "dist"), str(source)], cwd=tmp, env=env)
    (wheel,) = (tmp / "dist").glob("pagedjax-*.whl")

    root = tmp / "venv"
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    # Install before linking the dependencies in, or pip would find this venv's editable
    # pagedjax of the same version and skip the wheel.
    _run([*pip, "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=tmp, env=env)
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                cwd=tmp, env=env).strip()
    # A .pth line adds a directory to sys.path without processing the .pth files in it, so
    # this venv's editable-install finder stays inactive there (checked in the test).
    ours = dict.fromkeys([sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    pathlib.Path(site, "project_venv_deps.pth").write_text("\n".join(ours) + "\n")
    workdir = tmp / "cwd"  # empty: nothing importable from the working directory
    workdir.mkdir()
    return root, source, env, workdir


def test_every_source_module_is_installed_and_imports(fresh_venv):
    """Each .py under pagedjax/, models/ and kernels/ is in the installed wheel (not the
    source tree) and imports; the native kernels' .cc and .h files ship beside pagedjax.kernels."""
    root, source, env, workdir = fresh_venv
    out = _run([str(root / "bin" / "python"), "-c", IMPORT_ALL], cwd=workdir, env=env)
    report = json.loads(out.strip().splitlines()[-1])
    assert pathlib.Path(report["file"]).is_relative_to(root), report["file"]
    assert not report["editable_finders"]
    missing = _source_modules(source) - set(report["modules"])
    assert not missing, f"not in the wheel: {sorted(missing)}"
    cc_files = {p.name for p in (source / "kernels").glob("*.cc")}
    headers = {p.name for p in (source / "kernels").glob("*.h")}
    assert cc_files and headers and cc_files | headers <= set(report["kernel_files"])


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_installed_command_prints_help(fresh_venv, command):
    """The wheel's `pagedjax` console script parses its subcommands."""
    root, _, env, workdir = fresh_venv
    out = _run([str(root / "bin" / "pagedjax"), command, "--help"], cwd=workdir, env=env)
    assert out.startswith(f"usage: pagedjax {command}")

"""Building a C++ XLA FFI kernel on first use, cached on disk per source, shape and machine.

A kernel is compiled by the system C++ compiler (`CXX`, else `c++`, `g++`, `clang++`)
against the XLA FFI headers of the installed jaxlib, with the model's shape constants as
-D flags and `-march=native`, into `~/.cache/pagedjax/native/<key>/` (`PAGEDJAX_NATIVE_DIR`
moves it). The key hashes everything the binary depends on: the source and the headers
beside it, the defines, the compiler's version, jaxlib's version and the CPU's feature
flags, so a shared home directory never hands one machine another's instructions. A build
takes a few seconds, once; later processes load the cached library. `register_kernel`
builds, loads and registers a kernel's handler as an XLA FFI target.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

DEFAULT_NATIVE_DIR = os.path.join("~", ".cache", "pagedjax", "native")
# -w: the XLA FFI headers warn under GCC; a failed build reports its errors all the same.
_OPTIMIZE = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-w"]


class NativeBuildError(RuntimeError):
    """The kernel could not be built here (no compiler, or the compiler failed)."""


def find_compiler() -> str | None:
    """The C++ compiler to build with: `CXX` if set, else the first of c++ / g++ /
    clang++ on PATH; None when there is none."""
    configured = os.environ.get("CXX")
    if configured:
        return shutil.which(configured) or (configured if os.path.isfile(configured)
                                            else None)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def build_library(source: str, defines: dict[str, int]) -> str:
    """Path of the shared library built from `source` (a .cc path) with `defines`,
    compiling it only when no cached build matches. Raises NativeBuildError."""
    import jax.ffi
    import jaxlib

    compiler = find_compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler found (install g++ or set CXX)")
    flags = _OPTIMIZE + _arch_flags() + [f"-D{name}={value}" for name, value in
                                         sorted(defines.items())]
    key = hashlib.sha256(b"\0".join([
        *_source_and_headers(source), " ".join(flags).encode(),
        _compiler_version(compiler).encode(), jaxlib.__version__.encode(),
        _cpu_signature().encode()])).hexdigest()[:24]
    out_dir = os.path.join(os.path.expanduser(
        os.environ.get("PAGEDJAX_NATIVE_DIR") or DEFAULT_NATIVE_DIR), key)
    library = os.path.join(out_dir, os.path.basename(source).rsplit(".", 1)[0] + ".so")
    if os.path.exists(library):
        return library
    os.makedirs(out_dir, exist_ok=True)
    # Compile beside the target and rename: a concurrent process sees no half-written file.
    fd, partial = tempfile.mkstemp(suffix=".so.partial", dir=out_dir)
    os.close(fd)
    command = [compiler, *flags, f"-I{jax.ffi.include_dir()}", source, "-o", partial]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        os.unlink(partial)
        raise NativeBuildError(f"{os.path.basename(compiler)} failed on "
                               f"{os.path.basename(source)}:\n{result.stderr[:2000]}")
    os.replace(partial, library)
    return library


def register_kernel(source: str, defines: dict[str, int], target: str, symbol: str) -> str:
    """Build `source` with `defines`, load it and register its handler `symbol` as the XLA
    FFI CPU target `target` (returned). Raises NativeBuildError."""
    import jax.ffi

    handler = getattr(ctypes.cdll.LoadLibrary(build_library(source, defines)), symbol)
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return target


def _source_and_headers(source: str) -> list[bytes]:
    """The source's bytes and those of every header beside it (what its #include "..."
    lines can reach), so that editing a shared header rebuilds the kernels using it."""
    folder = os.path.dirname(os.path.abspath(source))
    headers = sorted(name for name in os.listdir(folder) if name.endswith(".h"))
    contents = []
    for path in [source] + [os.path.join(folder, name) for name in headers]:
        with open(path, "rb") as f:
            contents.append(f.read())
    return contents


def _arch_flags() -> list[str]:
    # Apple clang on arm64 spells it -mcpu; GCC and clang elsewhere take -march.
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return ["-mcpu=native"]
    return ["-march=native"]


def _compiler_version(compiler: str) -> str:
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return compiler


def _cpu_signature() -> str:
    """The CPU's model and feature flags (Linux), else the machine name."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()

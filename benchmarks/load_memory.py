"""Peak host memory and time of loading a GGUF model (default: SmolLM2-135M-Instruct).

Run in a fresh process so the RSS high-water mark belongs to the load alone:

    python benchmarks/load_memory.py [path.gguf] [--dtype float32|bfloat16] [--json]

Prints the params' size (sum of nbytes), the growth of the peak RSS (VmHWM) over the
baseline after imports, their ratio, and the load time. The streaming loaders keep the
params plus about one tensor in flight, so the ratio should stay well under 1.5.

Like the other benchmarks it imports the installed pagedjax (`make` installs it editable).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time


def _vm_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(path: str | None = None, dtype: str = "float32") -> dict:
    """Load `path` (default model when None) with `load_gguf` and report memory and time."""
    for module in ("numpy", "gguf"):  # imported before the baseline
        importlib.import_module(module)

    from pagedjax.loading import default_gguf_path, load_gguf

    path = path or default_gguf_path()
    _reset_peak()
    baseline = _vm_kib("VmRSS")
    start = time.perf_counter()
    _, params, _ = load_gguf(path, dtype=dtype)
    seconds = time.perf_counter() - start
    peak = _vm_kib("VmHWM")
    leaves = [params[k] for k in params if k != "layers"] + list(params["layers"].values())
    weights = sum(int(x.nbytes) for x in leaves)
    delta = (peak - baseline) * 1024
    return {"path": path, "dtype": dtype, "file_mib": os.path.getsize(path) / 2**20,
            "weights_mib": weights / 2**20, "peak_rss_delta_mib": delta / 2**20,
            "ratio": delta / weights, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default=None, help="GGUF file (default model)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    args = parser.parse_args()
    result = measure(args.path, args.dtype)
    if args.json:
        print(json.dumps(result))
        return
    print(f"model: {result['path']} ({result['file_mib']:.1f} MiB file)")
    print(f"weights MiB: {result['weights_mib']:.1f} ({result['dtype']})")
    print(f"peak RSS delta MiB: {result['peak_rss_delta_mib']:.1f}")
    print(f"ratio: {result['ratio']:.3f}")
    print(f"seconds: {result['seconds']:.2f}")


if __name__ == "__main__":
    main()

"""Start-up cost: process start to first token, cold and from JAX's persistent cache.

    python benchmarks/startup.py              # first token, then warmup(), cold and warm

Each measurement is a fresh Python process on the default model. "cold" points
PAGEDJAX_CACHE_DIR at an empty directory; "warm" runs again on the directory the cold run
filled, as a second start of a notebook or server would. Reports the time from process
start to the first generated token (imports, model load, the compiles that token needs),
and the cost of `warmup()` (every bucket program) in each state. Writes
benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import json, os, sys, time
start = float(os.environ["STARTUP_T0"])
from pagedjax import LLM, SamplingParams
imported = time.time()
llm = LLM()
loaded = time.time()
report = {"import_s": imported - start, "load_s": loaded - imported}
if sys.argv[1] == "first-token":
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    report["first_token_s"] = time.time() - start
    report["text"] = out[0].outputs[0].text
else:
    llm.warmup()
    report["warmup_s"] = time.time() - loaded
report["programs"] = llm.num_compiles
report["compile_s"] = llm.engine.compile_seconds
print("REPORT " + json.dumps(report))
"""


def measure(what: str, cache_dir: str) -> dict:
    """One fresh process doing `what` ("first-token" or "warmup") on `cache_dir`."""
    env = dict(os.environ, PAGEDJAX_CACHE_DIR=cache_dir, STARTUP_T0=repr(time.time()),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("PAGEDJAX_COMPILATION_CACHE", None)
    done = subprocess.run([sys.executable, "-c", CHILD, what], env=env, check=True,
                          capture_output=True, text=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def main(argv=None) -> dict:
    """Measure first token and warmup(), cold then warm; print and save JSON."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as first, tempfile.TemporaryDirectory() as second:
        # Separate cache dirs so the cold warmup() is not warmed by the first-token run.
        for what, cache_dir in (("first-token", first), ("warmup", second)):
            for state in ("cold", "warm"):
                report = measure(what, cache_dir)
                results[f"{what} {state}"] = report
                summary = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v!r}"
                                    for k, v in report.items())
                print(f"{what:12s} {state:5s} {summary}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "startup.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()

"""This CPU's float32 peak, for model-FLOPs utilisation against the hardware rather than
against a `jnp.dot` roofline: the nominal peak from its flags and clock (cores x FMA units x
vector lanes x 2 flops x GHz) and a measured one, a C loop of independent vector FMAs
(compiled with gcc on first use, one thread per core).

    python benchmarks/cpu_peak.py [--seconds 2] [--fma-units 2]

The FMA unit count is not in /proc/cpuinfo: 2 for AMD Zen and Intel cores since Haswell
(server Skylake and later run 2 AVX-512 FMAs; some client parts 1), hence the flag.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

# Twelve independent accumulator chains per thread: more than the FMA latency (4-5
# cycles) times the 2 FMA ports needs, so the loop is throughput-bound.
FMA_LOOP = r"""
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__AVX512F__)
typedef __m512 vec;
#define LANES 16
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define SUM(v) _mm512_reduce_add_ps(v)
#else
typedef __m256 vec;
#define LANES 8
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
static float SUM(__m256 v) { float out[8]; _mm256_storeu_ps(out, v); float s = 0;
  for (int i = 0; i < 8; ++i) s += out[i]; return s; }
#endif
#define CHAINS 12

static long iterations;
static float sink[64];

static void *work(void *arg) {
  long id = (long)arg;
  vec a = SET1(0.999999f), b = SET1(1e-7f);
  vec c0 = SET1(0.1f), c1 = SET1(0.2f), c2 = SET1(0.3f), c3 = SET1(0.4f), c4 = SET1(0.5f),
      c5 = SET1(0.6f), c6 = SET1(0.7f), c7 = SET1(0.8f), c8 = SET1(0.9f), c9 = SET1(1.0f),
      c10 = SET1(1.1f), c11 = SET1(1.2f);
  for (long i = 0; i < iterations; ++i) {
    c0 = FMA(c0, a, b); c1 = FMA(c1, a, b); c2 = FMA(c2, a, b); c3 = FMA(c3, a, b);
    c4 = FMA(c4, a, b); c5 = FMA(c5, a, b); c6 = FMA(c6, a, b); c7 = FMA(c7, a, b);
    c8 = FMA(c8, a, b); c9 = FMA(c9, a, b); c10 = FMA(c10, a, b); c11 = FMA(c11, a, b);
    /* an empty asm that "changes" every accumulator: gcc may not fold the chains */
    __asm__ volatile("" : "+x"(c0), "+x"(c1), "+x"(c2), "+x"(c3), "+x"(c4), "+x"(c5),
                     "+x"(c6), "+x"(c7), "+x"(c8), "+x"(c9), "+x"(c10), "+x"(c11));
  }
  sink[id] = SUM(c0) + SUM(c1) + SUM(c2) + SUM(c3) + SUM(c4) + SUM(c5) + SUM(c6)
           + SUM(c7) + SUM(c8) + SUM(c9) + SUM(c10) + SUM(c11);  /* keeps the loop alive */
  return NULL;
}

int main(int argc, char **argv) {
  int threads = atoi(argv[1]);
  iterations = atol(argv[2]);
  pthread_t pool[64];
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long t = 0; t < threads; ++t) pthread_create(&pool[t], NULL, work, (void *)t);
  for (int t = 0; t < threads; ++t) pthread_join(pool[t], NULL);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double seconds = (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
  double flops = 2.0 * LANES * CHAINS * (double)iterations * threads;
  printf("%d %.6f %.3f\n", LANES, seconds, flops / seconds / 1e9);
  return 0;
}
"""


def cpu_info() -> dict:
    """Model name, flags and clock (MHz) from /proc/cpuinfo."""
    info = {"model": "unknown", "flags": set(), "mhz": None}
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                info["model"] = value
            elif key == "flags":
                info["flags"] = set(value.split())
            elif key == "cpu MHz" and info["mhz"] is None:
                info["mhz"] = float(value)
            elif key == "bogomips" and info["mhz"] is None:
                info["bogomips_mhz"] = float(value) / 2  # x86 bogomips = 2 x clock
    if info["mhz"] is None:
        info["mhz"] = info.get("bogomips_mhz")
    return info


def build_loop(avx512: bool, folder: str) -> str:
    """Compile the FMA loop into `folder`; return the binary's path."""
    source, binary = os.path.join(folder, "fma.c"), os.path.join(folder, "fma")
    with open(source, "w", encoding="utf-8") as f:
        f.write(FMA_LOOP)
    isa = ["-mavx512f"] if avx512 else ["-mavx2", "-mfma"]
    subprocess.run(["gcc", "-O2", *isa, "-pthread", source, "-o", binary], check=True)
    return binary


def measured_peak(binary: str, threads: int, seconds: float) -> float:
    """GFLOP/s of the FMA loop on `threads` threads, sized to run about `seconds`."""
    iterations = 10_000_000
    while True:
        out = subprocess.run([binary, str(threads), str(iterations)], check=True,
                             capture_output=True, text=True).stdout.split()
        elapsed, gflops = float(out[1]), float(out[2])
        if elapsed >= seconds / 2:
            return gflops
        iterations = int(iterations * seconds / max(elapsed, 1e-3))


def main() -> None:
    """Print nominal and measured fp32 peaks, total and per core."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--fma-units", type=int, default=2, help="FMA pipes per core")
    args = parser.parse_args()
    info = cpu_info()
    cores = os.cpu_count() or 1
    avx512 = "avx512f" in info["flags"]
    if not avx512 and not {"avx2", "fma"} <= info["flags"]:
        raise SystemExit("this CPU has neither AVX-512 nor AVX2 + FMA")
    lanes = 16 if avx512 else 8
    ghz = (info["mhz"] or 0) / 1000
    nominal = cores * args.fma_units * lanes * 2 * ghz
    with tempfile.TemporaryDirectory(prefix="cpu_peak_") as folder:
        binary = build_loop(avx512, folder)
        one = measured_peak(binary, 1, args.seconds)
        every = measured_peak(binary, cores, args.seconds)
    print(f"cpu: {info['model']}, {cores} cores, {'AVX-512' if avx512 else 'AVX2'} "
          f"({lanes} fp32 lanes), {args.fma_units} FMA units, {ghz:.2f} GHz reported")
    print(f"nominal fp32 peak: {nominal:.1f} GFLOP/s "
          f"({cores} x {args.fma_units} x {lanes} x 2 x {ghz:.2f})")
    print(f"measured FMA loop: {one:.1f} GFLOP/s on 1 thread, {every:.1f} on {cores} "
          f"(effective clock {every / (cores * args.fma_units * lanes * 2):.2f} GHz)")


if __name__ == "__main__":
    if not re.match(r"^(x86_64|AMD64)$", os.uname().machine):
        raise SystemExit("cpu_peak.py measures x86 vector FMAs only")
    main()

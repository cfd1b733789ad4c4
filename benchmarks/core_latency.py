"""Where the host put this machine's two vCPUs: the round trip of a cache line between
threads pinned to two CPUs.

On the shared 2-vCPU machines here it reads about 70-110 ns at some times and 330-370 ns
at others, switching every few seconds to minutes (the host moves the vCPUs; the far
reading is that of cores that share no cache). The compiled loops run both threads in
lock step, exchanging h_t at every step, and ran the mid configuration's forward at 39-41
ms in the near state and 61-67 ms in the far one, in the same process, while nn.LSTM
moved much less; rnn_speed.py reports its ratios split by this reading.

    python benchmarks/core_latency.py      # a few readings, one per second

The probe is a small C program built with the system C compiler ($CC or cc) on first use;
without a compiler, or with fewer than two CPUs, the reading is None.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A reading above this is "far" (between the two clusters of readings seen here).
FAR_NS = 200.0

SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Alignas(64) atomic_long flag;
static long iters;

static void pin(int cpu) {
  cpu_set_t s;
  CPU_ZERO(&s);
  CPU_SET(cpu, &s);
  pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

static void* other(void* arg) {  /* answers each odd value with the next even one */
  pin(*(int*)arg);
  for (long i = 0; i < iters; i++) {
    while (atomic_load(&flag) != 2 * i + 1) {}
    atomic_store(&flag, 2 * i + 2);
  }
  return 0;
}

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static int cmp(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return (x > y) - (x < y);
}

int main(int argc, char** argv) {  /* cpu_a cpu_b iterations repeats: median ns */
  int a = atoi(argv[1]), b = atoi(argv[2]), reps = atoi(argv[4]);
  iters = atol(argv[3]);
  double r[64];
  if (reps > 64) reps = 64;
  pin(a);
  for (int k = 0; k < reps; k++) {
    pthread_t t;
    atomic_store(&flag, 0);
    pthread_create(&t, 0, other, &b);
    double t0 = 0;
    const long warm = iters / 5;  /* the other thread started and both caches warm */
    for (long i = 0; i < iters; i++) {
      if (i == warm) t0 = now();
      atomic_store(&flag, 2 * i + 1);
      while (atomic_load(&flag) != 2 * i + 2) {}
    }
    r[k] = (now() - t0) / (iters - warm) * 1e9;
    pthread_join(t, 0);
  }
  qsort(r, reps, sizeof r[0], cmp);
  printf("%.1f\n", r[reps / 2]);
  return 0;
}
"""


class CoreLatency:
    """``probe()``: the median round trip in ns between the first two CPUs this process may
    run on (a few ms of spinning on both), or None where it cannot be measured."""

    def __init__(self) -> None:
        self.exe: Path | None = None
        self.cpus = sorted(os.sched_getaffinity(0))[:2]
        cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if len(self.cpus) < 2 or cc is None:
            return
        self._dir = tempfile.TemporaryDirectory(prefix="bnrnn-core-latency-")
        src = Path(self._dir.name) / "core_latency.c"
        src.write_text(SOURCE)
        exe = Path(self._dir.name) / "core_latency"
        res = subprocess.run(
            [cc, "-O2", "-pthread", "-o", str(exe), str(src)], capture_output=True, text=True
        )
        if res.returncode == 0:
            self.exe = exe
        else:
            print(f"(core latency probe not built: {res.stderr.strip()[:200]})", file=sys.stderr)

    def probe(self, iters: int = 5000, repeats: int = 3) -> float | None:
        if self.exe is None:
            return None
        args = [str(self.exe), *map(str, self.cpus), str(iters), str(repeats)]
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=10)
            return float(res.stdout.strip())
        except (subprocess.SubprocessError, ValueError):
            return None


def placement(ns: float | None) -> str:
    """ "near", "far" or "?" for a reading."""
    return "?" if ns is None else ("far" if ns > FAR_NS else "near")


def main() -> None:
    lat = CoreLatency()
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
        ns = lat.probe()
        print("unavailable" if ns is None else f"{ns:6.0f} ns  {placement(ns)}", flush=True)
        time.sleep(1)


if __name__ == "__main__":
    main()

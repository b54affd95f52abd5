"""Run a command and report the CPU seconds every Ray / Serve process used meanwhile.

    python scripts/process_cpu.py flora bench serve ...

The serving path's cost (proxy, ingress) shows beside the replica's; per-chunk overhead is
these CPU seconds over the tokens served.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

KINDS = ("ProxyActor", "StarCoderReplica", "Ingress", "ServeController", "raylet", "gcs_server",
         "dashboard", "serve run")  # fmt: skip


def cpu_seconds() -> dict[str, float]:
    totals = dict.fromkeys(KINDS, 0.0)
    for p in psutil.process_iter(["cmdline"]):
        line = " ".join(p.info["cmdline"] or [])
        kind = next((k for k in KINDS if k in line), None)
        if kind is None:
            continue
        try:
            times = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        totals[kind] += times.user + times.system
    return totals


def main() -> int:
    before, started = cpu_seconds(), time.monotonic()
    result = subprocess.run(sys.argv[1:])
    after, wall = cpu_seconds(), time.monotonic() - started
    print(f"\nCPU seconds per process while the command ran ({wall:.1f}s wall):")
    for kind in KINDS:
        used = after[kind] - before[kind]
        print(f"  {kind:18s} {used:7.1f} cpu-s  ({used / wall:.2f} cores)")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())

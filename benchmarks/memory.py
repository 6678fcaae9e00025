"""Peak resident memory of the benchmark processes (imported by the scripts beside it)."""
from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """This process's own peak RSS: VmHWM, not ru_maxrss, which Linux carries over from a forked
    parent across exec (a launcher or a parent holding generated rows would be reported instead);
    ru_maxrss only where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

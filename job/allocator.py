"""Run the job under tcmalloc when the system has it.

TensorFlow on CPU allocates and frees tensors of tens of MB every step; glibc's malloc hands those back to
the kernel each time, and the page faults that follow cost most of the step (measured here: MobileNetV2
at 64 px, batch 256, 53 samples/s with glibc malloc vs 146 with tcmalloc, 100% system time before).
The allocator must be chosen before the process starts, so `python -m job` re-executes itself once with
LD_PRELOAD set. JOB_ALLOCATOR=system turns this off.
"""

from __future__ import annotations

import glob
import os
import sys

LIBRARY_PATTERNS = ("/usr/lib/*/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
ENV_SWITCH = "JOB_ALLOCATOR"


def find_tcmalloc() -> str | None:
    for pattern in LIBRARY_PATTERNS:
        if found := sorted(glob.glob(pattern)):
            return found[0]
    return None


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command with tcmalloc preloaded (no-op when set or absent)."""
    if os.environ.get(ENV_SWITCH) or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    library = find_tcmalloc()
    if library is None:
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD", "")]))
    env = dict(os.environ, LD_PRELOAD=preload, **{ENV_SWITCH: "tcmalloc"})
    os.execve(sys.executable, [sys.executable, "-m", "job", *sys.argv[1:]], env)

"""Transparent huge pages for XLA's CPU scratch memory (Linux, glibc).

XLA's CPU runtime mallocs each executable's scratch buffer on every call and frees it afterwards.
glibc serves a buffer that large with a fresh mmap, so every call touches every page of it anew. On
the 2-core CI VM a CIFAR-10 ADM training step (2.9 GB scratch) took 744k page faults and 2.2 s of
kernel time out of 5.9 s. glibc's `glibc.malloc.hugetlb=1` tunable makes malloc ask for transparent
huge pages on such mappings (2 MiB faults): 1.6k faults and a 5.0 s step.

glibc reads its tunables only at process start, so it is an explicit opt-in of the command line:
`python -m diffjax COMMAND --hugepages ...` calls `reexec()` first, and if the tunable would help
and is not set, the process replaces itself (same PID, arguments and environment) with one that
has it. In a notebook, start Jupyter with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its
environment instead.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
    """Linux with glibc >= 2.35 (the tunable's first release) and transparent huge pages in
    "madvise" mode ("always" needs no advice, "never" ignores it)."""
    if sys.platform != "linux":
        return False
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        if name != "glibc" or tuple(int(v) for v in version.split(".")[:2]) < (2, 35):
            return False
        with open(_THP) as f:
            return "[madvise]" in f.read()
    except (OSError, ValueError, AttributeError):
        return False


def wanted() -> bool:
    """True when setting TUNABLE would change anything: `supported()` and no hugetlb tunable set
    already."""
    return "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "") and supported()


def reexec() -> None:
    """Replace this process by the same command with TUNABLE in GLIBC_TUNABLES, when `wanted()`.

    Call only from a command-line entry point, before any work: the process image is replaced."""
    if not wanted():
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

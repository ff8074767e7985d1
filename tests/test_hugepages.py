"""diffjax.hugepages: the CLIs restart themselves once with glibc's hugetlb malloc tunable, which
turns XLA's per-call scratch mmap from 4 KiB page faults into 2 MiB ones.

Truth: the kernel's own page-fault counter (getrusage ru_minflt) for a fresh 256 MiB allocation,
with and without the tunable, and the process identity and environment after the restart.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from tests._util import REPO

from diffjax import hugepages

_FAULTS = textwrap.dedent("""
    import ctypes, resource
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    n = 2**28                        # 256 MiB: glibc serves it by mmap (numpy would madvise itself)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(libc.malloc(n), 1, n)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")

def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DIFFJAX_HUGEPAGES")}
    # This checkout's diffjax, whichever one an editable install points at.
    path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return {**env, "PYTHONPATH": path, **extra}


needs_thp = pytest.mark.skipif(not hugepages.supported(),
                               reason="this machine has no madvise-mode transparent huge pages "
                                      "or no glibc >= 2.35, so the tunable changes nothing here")


@needs_thp
def test_tunable_cuts_page_faults_of_a_large_allocation():
    plain = int(subprocess.run([sys.executable, "-c", _FAULTS], env=_env(), check=True,
                               capture_output=True, text=True).stdout)
    huge = int(subprocess.run([sys.executable, "-c", _FAULTS], env=_env(GLIBC_TUNABLES=hugepages.TUNABLE),
                              check=True, capture_output=True, text=True).stdout)
    assert plain >= 2**28 // 4096 * 0.9      # one fault per 4 KiB page
    assert huge < plain / 20, (plain, huge)


@needs_thp
def test_reexec_restarts_once_with_the_tunable_and_same_pid(tmp_path):
    script = tmp_path / "cli.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:], flush=True)
        from diffjax import hugepages
        hugepages.reexec()
        print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), hugepages.wanted(), flush=True)
    """))
    out = subprocess.run([sys.executable, str(script), "--x", "1"], env=_env(), check=True,
                         capture_output=True, text=True).stdout.split("\n")
    first, second, after = out[0].split(), out[1].split(), out[2].split()
    assert first[0] == second[0] == "start" and first[1] == second[1] == after[1]  # same process
    assert first[2] == "None" and second[2] == hugepages.TUNABLE and "'--x'," in out[1]
    assert after[2] == hugepages.TUNABLE and after[3] == "False"                   # exactly once


def test_existing_tunable_is_respected(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")
    assert not hugepages.wanted()


def test_the_command_line_restarts_only_when_asked(monkeypatch):
    """Huge pages are an explicit opt-in of `python -m diffjax COMMAND --hugepages`."""
    from diffjax import cli

    calls = []
    monkeypatch.setattr(hugepages, "reexec", lambda: calls.append(1))
    monkeypatch.setitem(cli.COMMANDS, "check", type("C", (), {"main": staticmethod(lambda a: 0)}))
    assert cli.main(["check"]) == 0 and calls == []
    assert cli.main(["check", "--hugepages"]) == 0 and calls == [1]

"""The code sandbox: hostile programs are contained and reported, and the host is unaffected.

Each hostile program runs under every isolation mechanism that works here (bubblewrap and the weaker
unshare fallback); a mechanism that does not work skips its tests, saying why. Limits are kept small
so the whole file stays fast on a busy two-core machine.
"""

from __future__ import annotations

import functools
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from afm.rl import sandbox

ROOT = Path(__file__).resolve().parent.parent
EARLY_EXITS = ["import sys; sys.exit(0)", "import os; os._exit(0)", "raise SystemExit"]
LIMITS = {"timeout_s": 5.0, "cpu_s": 5.0, "memory_mb": 512, "max_output_bytes": 1_000_000, "max_procs": 32}


@functools.cache
def _backend(kind: str) -> sandbox._Backend | sandbox._Unavailable:
    try:
        return {"bwrap": sandbox._bwrap_backend, "unshare": sandbox._unshare_backend}[kind]()
    except sandbox._Unavailable as e:
        return e


@pytest.fixture(params=["bwrap", "unshare"])
def backend(request) -> sandbox._Backend:
    found = _backend(request.param)
    if isinstance(found, sandbox._Unavailable):
        pytest.skip(f"{request.param} isolation unavailable here: {found}")
    return found


@pytest.fixture
def isolated() -> None:
    if not sandbox.available():
        pytest.skip(f"no sandbox isolation here: {sandbox.isolation()}")


def run(backend: sandbox._Backend, code: str, stdin: str = "", **limits) -> sandbox.SandboxResult:
    return sandbox._execute(backend, code, stdin, **{**LIMITS, **limits})


def _cmdlines() -> dict[int, bytes]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                out[int(name)] = Path(f"/proc/{name}/cmdline").read_bytes()
            except OSError:  # exited meanwhile
                pass
    return out


def _leftovers(marker: str, wait_s: float = 3.0) -> list[int]:
    """Host processes still carrying `marker` after up to `wait_s` (a killed namespace takes a moment)."""
    deadline = time.monotonic() + wait_s
    while True:
        left = [pid for pid, cmd in _cmdlines().items() if marker.encode() in cmd]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _sandbox_uid_differs() -> bool:
    """Whether the unshare fallback runs under another uid than the test (true when the host is root)."""
    return os.geteuid() == 0


# --- ordinary programs -------------------------------------------------------------------------------


def test_normal_program_and_stdin(isolated):
    r = sandbox.run_python("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="1 2 3\n")
    assert (r.status, r.returncode, r.stdout, r.reason) == ("ok", 0, "6\n", "")
    assert sandbox.isolation().startswith(("bwrap", "unshare"))


def test_exit_status_exception_and_signal(backend):
    r = run(backend, "import sys; sys.exit(3)")
    assert (r.status, r.returncode, r.reason) == ("error", 3, "exited with status 3")
    r = run(backend, "raise ValueError('nope')")
    assert r.status == "error" and r.returncode == 1 and "ValueError: nope" in r.stderr
    r = run(backend, "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert (r.status, r.returncode) == ("killed", -15) and "SIGTERM" in r.reason
    r = run(backend, "import os, signal\nos.kill(1, signal.SIGKILL)\nprint('still here')")  # init is immune
    assert (r.status, r.stdout) == ("ok", "still here\n")


def test_interpreter_is_the_hosts_in_isolated_mode(backend):
    r = run(backend, "import sys; print(sys.version); print(sys.flags.isolated, sys.flags.no_site)")
    assert r.stdout.splitlines() == [sys.version, "1 1"]


def test_humaneval_solution_passes_and_wrong_one_fails(isolated):
    tests = ("METADATA = {}\n\n"
             "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n")
    good = sandbox.run_tests("def add(a, b):\n    return a + b\n", tests, "add")
    assert good.passed and good.result.status == "ok", good.result
    bad = sandbox.run_tests("def add(a, b):\n    return a - b\n", tests, "add")
    assert not bad.passed and bad.result.status == "error"
    assert "assert candidate(2, 3) == 5" in bad.result.stderr  # tracebacks show the program's lines
    missing = sandbox.run_tests("def plus(a, b):\n    return a + b\n", tests, "add")
    assert not missing.passed and "has no attribute 'add'" in missing.result.stderr


def test_assert_style_tests_and_output(isolated):
    r = sandbox.run_tests("def sq(x):\n    print('called')\n    return x * x\n", "assert sq(3) == 9\n")
    assert r.passed and r.result.stdout == "called\n"


@pytest.mark.parametrize("exit_call", EARLY_EXITS)
def test_exiting_early_does_not_pass(isolated, exit_call):
    """The classic reward hack: leave with status 0 before the tests run."""
    r = sandbox.run_tests(f"{exit_call}\ndef add(a, b):\n    return 0\n",
                          "def check(candidate):\n    assert candidate(1, 1) == 2\n", "add")
    assert not r.passed and r.result.status == "error" and "before the tests finished" in r.result.reason


def test_no_isolation_refuses(monkeypatch):
    monkeypatch.setattr(sandbox, "_backend", sandbox._Unavailable("bwrap not found; unshare not found"))
    assert not sandbox.available() and sandbox.isolation().startswith("none: bwrap not found")
    r = sandbox.run_python("print(1)")
    assert r.status == "sandbox_error" and r.returncode is None and "no isolation" in r.reason
    assert not sandbox.run_tests("x = 1", "assert x == 1").passed


def test_invalid_limits_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        sandbox.run_python("print(1)", timeout_s=0)


# --- CPU, memory, processes --------------------------------------------------------------------------


def test_infinite_loop(backend):
    r = run(backend, "while True:\n    pass\n", timeout_s=1.5, cpu_s=1)
    assert r.status in ("cpu_limit", "timeout"), r
    assert r.duration_s < 4


def test_catching_sigxcpu_does_not_escape_the_cpu_limit(backend):
    code = "import signal\nsignal.signal(signal.SIGXCPU, lambda *_: None)\nwhile True:\n    pass\n"
    r = run(backend, code, timeout_s=6, cpu_s=1)
    assert (r.status, r.returncode) == ("cpu_limit", -9), r  # SIGKILL at the hard limit, one second on


def test_sleeping_forever_times_out(backend):
    r = run(backend, "import time\ntime.sleep(60)\n", timeout_s=1)
    assert (r.status, r.returncode) == ("timeout", None) and 1 <= r.duration_s < 3


@pytest.mark.parametrize("code", ["x = bytearray(8 << 30)\n",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))\n"])
def test_huge_allocation(backend, code):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = run(backend, code, memory_mb=256)
    assert r.status == "memory_limit" and "MemoryError" in r.stderr, r
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: the host is fine


def test_process_limit_is_enforced(backend):
    """RLIMIT_NPROC holds inside the user namespace: forks fail near max_procs (the sandbox's own init
    and the program count too)."""
    code = (
        "import os, time\n"
        "n = 0\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(10)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(n)\n"
    )
    r = run(backend, code, max_procs=16)
    assert r.status == "ok", r
    assert 10 <= int(r.stdout) < 16
    assert r.duration_s < 3  # the sleeping children die with the namespace when the program exits


def test_fork_bomb_is_contained(backend):
    marker = f"afm-bomb-{uuid.uuid4().hex}"
    bomb = "import os\\nwhile True:\\n    try:\\n        os.fork()\\n    except OSError:\\n        pass\\n"
    # Exec first so that every fork carries the marker on its command line, visible from the host.
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', '{bomb}', '{marker}'])\n"
    baseline = len(_cmdlines())
    r = run(backend, code, timeout_s=1.5, cpu_s=1)
    assert r.status in ("timeout", "cpu_limit", "killed"), r
    assert r.duration_s < 4
    assert _leftovers(marker) == []
    assert len(_cmdlines()) <= baseline + 10  # back to normal (other host processes come and go)


def test_processes_outliving_the_program_are_killed(backend):
    marker = f"afm-daemon-{uuid.uuid4().hex}"
    code = (
        "import os, subprocess, sys\n"
        f"argv = [sys.executable, '-c', 'import time; time.sleep(60)', '{marker}']\n"
        "subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL,\n"
        "                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "if os.fork() == 0:\n"  # a classic double-fork daemon, in its own session
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, argv)\n"
        "    os._exit(0)\n"
        "print('spawned', flush=True)\n"
    )
    r = run(backend, code)
    assert r.status == "ok" and r.stdout == "spawned\n", r
    assert _leftovers(marker) == []
    r = run(backend, code + "import time\ntime.sleep(60)\n", timeout_s=1)
    assert r.status == "timeout" and r.stdout == "spawned\n"
    assert _leftovers(marker) == []


def test_killing_parents_and_host_processes_fails(backend):
    victim = subprocess.Popen(["sleep", "30"])
    try:
        code = (
            "import os, signal\n"
            f"for name, pid in [('host test', {os.getpid()}), ('host victim', {victim.pid}), ('init', 1),\n"
            "                  ('parent', os.getppid()), ('everyone', -1)]:\n"
            "    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n"
            "        print(name, 'sent', flush=True)\n"
            "    except OSError as e:\n"
            "        print(name, type(e).__name__, flush=True)\n"
            "os.killpg(0, signal.SIGKILL)\n"
        )
        r = run(backend, code)
        assert "host test ProcessLookupError" in r.stdout and "host victim ProcessLookupError" in r.stdout, r
        assert victim.poll() is None  # the host's processes are out of reach
        assert r.status != "sandbox_error"
    finally:
        victim.kill()
        victim.wait()


# --- output and files --------------------------------------------------------------------------------


def test_printing_gigabytes_hits_the_output_limit(backend):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code = ("import sys\nchunk = 'x' * (1 << 16)\n"
            "while True:\n    sys.stdout.write(chunk)\n    sys.stderr.write(chunk)\n")
    r = run(backend, code, max_output_bytes=1 << 20)
    assert r.status == "output_limit", r
    assert len(r.stdout) + len(r.stderr) == 1 << 20 and r.duration_s < 3
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_huge_file_is_limited(backend):
    r = run(backend, "with open('big.bin', 'wb') as f:\n    f.write(bytes(100 << 20))\n")
    assert r.status == "error" and "File too large" in r.stderr, r


def test_many_files_fill_only_the_sized_workdir(backend):
    if not backend.tmpfs_workdir:
        pytest.skip(f"{backend.kind} has no size-capped working directory (it would fill the host disk)")
    code = "import itertools\nfor i in itertools.count():\n    open(f'f{i}', 'wb').write(bytes(8 << 20))\n"
    r = run(backend, code)
    assert r.status == "error" and "No space left on device" in r.stderr, r


def test_host_files_are_hidden_or_protected(backend, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o600)
    keep = tmp_path / "keep.txt"
    keep.write_text("keep me")
    marker = f"afm-escape-{uuid.uuid4().hex}"
    code = (
        "import os, shutil\n"
        f"for path in ['/etc/passwd', {str(secret)!r}, {str(ROOT / 'pyproject.toml')!r}]:\n"
        "    try:\n"
        "        open(path).read()\n"
        "        print(path, 'read')\n"
        "    except OSError as e:\n"
        "        print(path, type(e).__name__)\n"
        f"for path in [{str(keep)!r}, {str(tmp_path)!r}]:\n"
        "    try:\n"
        "        os.remove(path) if path.endswith('.txt') else shutil.rmtree(path)\n"
        "        print(path, 'deleted')\n"
        "    except OSError as e:\n"
        "        print(path, type(e).__name__)\n"
        f"open('/tmp/{marker}', 'w').write('x')\n"
    )
    r = run(backend, code)
    assert r.status == "ok", r
    lines = set(r.stdout.splitlines())
    if backend.kind == "bwrap":  # nothing of the host's filesystem is there
        for path in ("/etc/passwd", str(secret), str(ROOT / "pyproject.toml"), str(keep), str(tmp_path)):
            assert f"{path} FileNotFoundError" in lines
        assert not Path(tempfile.gettempdir(), marker).exists()  # its /tmp is its own
    else:  # documented weakness: the host filesystem is visible, guarded by permissions only
        assert "/etc/passwd read" in lines
        os.unlink(Path("/tmp", marker))  # a world-writable host directory: writable from the sandbox
        if _sandbox_uid_differs():
            assert f"{secret} PermissionError" in lines and f"{keep} PermissionError" in lines
    if backend.kind == "bwrap" or _sandbox_uid_differs():
        assert keep.read_text() == "keep me" and secret.read_text() == "top secret"


def test_network_is_unreachable(backend):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        code = (
            "import socket\n"
            f"for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
            "    try:\n"
            "        socket.create_connection(addr, timeout=2).close()\n"
            "        print(addr, 'connected')\n"
            "    except OSError as e:\n"
            "        print(addr, 'blocked', e.errno)\n"
        )
        r = run(backend, code)
        assert r.status == "ok" and r.stdout.count("blocked") == 3, r
        listener.settimeout(0.1)
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing reached the host's loopback


def test_temporary_directories_are_removed(backend):
    pattern = "afm-sandbox-"
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith(pattern)}
    run(backend, "import os\nos.makedirs('a/b')\nopen('a/b/f', 'w').write('x')\nos.chmod('a/b', 0)\n"
                 "os.chmod('a', 0)")
    run(backend, "import time\ntime.sleep(60)\n", timeout_s=0.5)
    after = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith(pattern)}
    assert after <= before

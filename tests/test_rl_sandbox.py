"""The code sandbox: hostile programs are contained and reported, and the host is unaffected.

Each hostile program runs under every isolation mechanism that works here (bubblewrap and the weaker
unshare fallback); a mechanism that does not work skips its tests, saying why. Limits are kept small
so the whole file stays fast on a busy two-core machine.
"""

from __future__ import annotations

import ast
import functools
import logging
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
def through(backend, monkeypatch) -> sandbox._Backend:
    """`run_tests` (which uses the selected mechanism) runs through `backend`."""
    monkeypatch.setattr(sandbox, "_backend", backend)
    return backend


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
    assert not missing.passed and "the solution defines no function 'add'" in missing.result.stderr


def test_assert_style_tests_and_output(isolated):
    r = sandbox.run_tests("def sq(x):\n    print('called')\n    return x * x\n", "assert sq(3) == 9\n")
    assert r.passed and r.result.stdout == "called\n"


@pytest.mark.parametrize("exit_call", EARLY_EXITS)
def test_exiting_early_does_not_pass(isolated, exit_call):
    """The classic reward hack: leave with status 0 before the tests run."""
    r = sandbox.run_tests(f"{exit_call}\ndef add(a, b):\n    return 0\n",
                          "def check(candidate):\n    assert candidate(1, 1) == 2\n", "add")
    assert not r.passed and r.result.status == "error", r.result
    assert "the solution's process ended before the tests finished (exit status 0)" in r.result.stderr


# --- reward hacks: wrong solutions that once passed, and the harness's secrets ---

ADD_TESTS = ("def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
             "    assert abs(candidate(0.5, 0.25) - 0.75) < 1e-9\n")
WRONG = "def add(a, b):\n    return a - b\n"
FORGE = "os.write(1, b'\\n' + bytes(token) + b'\\n'); os._exit(0)"  # print a found token as the harness would
HACKS = {
    "sys.exit patched to a no-op": "import sys\nsys.exit = lambda *a, **k: None\n" + WRONG,
    "os._exit patched to a no-op": "import os, sys\nos._exit = sys.exit = lambda *a, **k: None\n" + WRONG,
    "an object equal to everything": (
        "class Any:\n    def __eq__(self, other): return True\n    def __ne__(self, other): return False\n"
        "    def __lt__(self, other): return True\n    def __sub__(self, other): return self\n"
        "    def __rsub__(self, other): return self\n    def __abs__(self): return 0\n"
        "def add(a, b):\n    return Any()\n"),
    "an int subclass equal to everything": (
        "class I(int):\n    def __eq__(self, other): return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(7)\n"),
    "the token from the harness's stack frames": (
        "import os, sys\ndef add(a, b):\n    f = sys._getframe()\n    while f is not None:\n"
        "        for scope in (f.f_locals, f.f_globals):\n            token = scope.get('token')\n"
        f"            if isinstance(token, (bytes, str)):\n                token = token.encode() if isinstance(token, str) else token\n                {FORGE}\n"
        "        f = f.f_back\n    return 0\n"),
    "the token from gc.get_objects": (
        "import gc, os, re\ndef add(a, b):\n    for o in gc.get_objects():\n"
        "        for token in (o.values() if isinstance(o, dict) else o if isinstance(o, (list, tuple)) else ()):\n"
        "            if isinstance(token, bytes) and re.fullmatch(rb'[0-9a-f]{32}', token):\n"
        f"                {FORGE}\n    return 0\n"),
    "the token from the harness's memory": (
        "import os, re\ndef add(a, b):\n    pid = os.getppid()\n"
        "    with open(f'/proc/{pid}/maps') as maps, open(f'/proc/{pid}/mem', 'rb', 0) as mem:\n"
        "        for line in maps:\n            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))\n"
        "            try:\n                mem.seek(lo)\n                chunk = mem.read(min(hi - lo, 1 << 24))\n"
        "            except OSError:\n                continue\n"
        "            for token in set(re.findall(rb'\\n([0-9a-f]{32})\\n', chunk)):\n"
        f"                {FORGE.replace('os._exit(0)', 'pass')}\n"
        "    os._exit(0)\n"),
    "the tests from the harness's stdin": (
        "import os\ndef add(a, b):\n    for pid in (1, os.getppid()):\n"
        "        os.write(1, open(f'/proc/{pid}/fd/0', 'rb').read())\n    return 0\n"),
    "a fake verdict on every descriptor": (
        "import os\nfor fd in range(64):\n    try:\n"
        "        os.write(fd, b'\\nE 0 0.0\\n' + os.urandom(16).hex().encode() + b'\\n')\n"
        "    except OSError:\n        pass\n" + WRONG),
    "SystemExit(0) before the tests": "raise SystemExit(0)\n" + WRONG,
    "os._exit(0) inside the call": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "builtins patched": ("import builtins\nclass Never(BaseException): pass\nbuiltins.AssertionError = Never\n"
                         "builtins.abs = lambda x: 0\nbuiltins.isinstance = lambda *a: True\n" + WRONG),
    "builtins shadowed by the solution's globals": "def abs(x):\n    return 0\n" + WRONG,
    "the harness's check replaced": "def check(candidate):\n    pass\n" + WRONG,
    "a forged reply": (
        "import json, os, sys\ndef add(a, b):\n    data = json.dumps({'value': {'object': 5}}).encode()\n"
        "    os.write(int(sys.argv[2]), len(data).to_bytes(4, 'big') + data)\n    return 0\n"),
    "the harness killed": "import os, signal\ndef add(a, b):\n    os.kill(os.getppid(), signal.SIGKILL)\n",
}


@pytest.mark.parametrize("hack", list(HACKS))
def test_reward_hacks_fail(through, hack):
    r = sandbox.run_tests(HACKS[hack], ADD_TESTS, "add", timeout_s=3)
    assert not r.passed and r.result.status != "ok", r.result


def test_the_harness_is_out_of_the_solutions_reach(through):
    """What the hacks above tried, checked directly: the harness's memory, descriptors and tests cannot
    be read from the solution's process, and the harness cannot be traced."""
    probe = (
        "import ctypes, errno, os\n"
        "def add(a, b):\n"
        "    out = []\n"
        "    for path in ['mem', 'maps', 'environ', 'fd/0', 'fd/1']:\n"
        "        try:\n"
        "            open(f'/proc/{os.getppid()}/{path}', 'rb').read(1)\n"
        "            out.append(path + ' readable')\n"
        "        except OSError as e:\n"
        "            out.append(f'{path} {errno.errorcode[e.errno]}')\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    out.append(f'ptrace {libc.ptrace(16, os.getppid(), 0, 0)} {ctypes.get_errno()}')\n"  # PTRACE_ATTACH
        "    seen = open(f'/proc/{os.getppid()}/cmdline', 'rb').read()\n"
        "    if os.path.exists('/program.py'):\n"
        "        seen += open('/program.py', 'rb').read()\n"
        "    out.append('tests ' + ('seen' if b'SECRET-EXPECTED' in seen else 'unseen'))\n"
        "    return out\n"
    )
    tests = "def check(candidate):\n    print(candidate(1, 2))\n    assert 'SECRET-EXPECTED'\n"
    r = sandbox.run_tests(probe, tests, "add")
    assert r.passed, r.result
    seen = ast.literal_eval(r.result.stdout)  # the probe's list, printed by the tests
    assert seen == ["mem EACCES", "maps EACCES", "environ EACCES", "fd/0 EACCES", "fd/1 EACCES", "ptrace -1 1",
                    "tests unseen"]


def test_a_test_swallowing_the_solutions_end_still_fails(through):
    """The tests run in the harness: one that catches everything must not turn the solution's process
    ending (a BaseException there) into a pass."""
    tests = ("def check(candidate):\n    try:\n        assert candidate(2, 3) == 5\n"
             "    except BaseException:\n        pass\n")
    r = sandbox.run_tests("import os\ndef add(a, b):\n    os._exit(0)\n", tests, "add")
    assert not r.passed and "the solution's process ended before the tests finished" in r.result.stderr


GOOD = {  # (solution, assert-style tests)
    "values of every type that crosses": ("""
def f(x):
    return {'t': (x, [x]), 's': {x}, 'fs': frozenset([x]), 'b': bytes([x]), 'ba': bytearray([x]),
            'c': complex(x, 1), 'n': None, 'yes': x > 0, 'third': x / 3, 'big': 7 ** 9000, 1: 'int key'}
""", """
r = f(7)
assert r == {'t': (7, [7]), 's': {7}, 'fs': frozenset([7]), 'b': b'\\x07', 'ba': bytearray(b'\\x07'),
             'c': 7 + 1j, 'n': None, 'yes': True, 'third': 7 / 3, 'big': 7 ** 9000, 1: 'int key'}
assert type(r['t']) is tuple and type(r['ba']) is bytearray and r['yes'] is True
"""),
    "subclasses become their base type": ("""
from collections import Counter, namedtuple
Point = namedtuple('Point', 'x y')
def point():
    return Point(1, 2)
def count(s):
    return Counter(s)
""", "assert point() == (1, 2) and count('aab') == {'a': 2, 'b': 1}\n"),
    "floats exactly": ("""
def f():
    return [float('nan'), -0.0, float('inf'), 0.1 + 0.2]
""", """
import math
nan, zero, inf, x = f()
assert math.isnan(nan) and math.copysign(1, zero) < 0 and inf == math.inf and x == 0.1 + 0.2
"""),
    "expected exceptions and keyword arguments": ("""
def div(a, b=1):
    if b == 0:
        raise ZeroDivisionError('b is zero')
    return a // b
""", """
assert div(7, b=2) == 3
try:
    div(1, 0)
except ZeroDivisionError as e:
    assert 'b is zero' in str(e)
else:
    raise AssertionError('no error')
"""),
    "helpers the tests call, and output": ("""
def encode(s):
    return s[::-1]
def decode(s):
    print('decoding', s)
    return s[::-1]
""", """
def check(candidate):
    assert candidate(encode('abc')) == 'abc'
check(decode)
"""),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_right_solutions_still_pass(through, case):
    solution, tests = GOOD[case]
    r = sandbox.run_tests(solution, tests)
    assert r.passed and r.result.status == "ok", r.result
    if case == "helpers the tests call, and output":
        assert r.result.stdout == "decoding cba\n"


def test_values_that_cannot_cross_fail_clearly(through):
    r = sandbox.run_tests("def gen(n):\n    return (i for i in range(n))\n", "assert list(gen(3)) == [0, 1, 2]\n")
    assert not r.passed and "TypeError: a generator cannot pass between the solution and the tests" in r.result.stderr
    r = sandbox.run_tests("def apply(f, x):\n    return f(x)\n", "assert apply(lambda x: x + 1, 1) == 2\n")
    assert not r.passed and "cannot pass these arguments to the solution's apply" in r.result.stderr


def test_the_code_environment_warns_about_and_reports_its_sandbox(through, caplog):
    from afm.rl.envs import CodeEnv

    with caplog.at_level(logging.WARNING, logger="afm.rl.envs"):
        env = CodeEnv()
    weaker = [r for r in caplog.records if "WEAKER unshare sandbox" in r.getMessage()]
    assert len(weaker) == (1 if through.kind == "unshare" else 0)
    sample = env.dataset(1, 0)[0]
    assert env.report() == {}  # nothing ran yet
    assert env.score("```python\ndef f0(x):\n    return 'wrong'\n```", sample).total == 0.0
    assert env.report() == {"sandbox": through.kind}


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
    code = "import itertools\nfor i in itertools.count():\n    open(f'f{i}', 'wb').write(bytes(1 << 20))\n"
    r = run(backend, code, workdir_bytes=4 << 20)
    assert r.status == "error" and "No space left on device" in r.stderr, r


# Every place a program might write: the root (a tmpfs bubblewrap made, once writable and unbounded:
# 3 GiB in 1.6 s), /tmp, the working directory, /dev/shm (host memory under unshare), /var/tmp, home.
FILL = """\
import errno, os
def fill(n, directory):
    written = 0
    try:
        for i in range(16):
            with open(os.path.join(directory, f"afm-fill-{n}-{i}"), "xb") as f:
                for _ in range(2):
                    f.write(bytes(1 << 20))
                    f.flush()
                    written += 1
    except OSError as e:
        return errno.errorcode[e.errno], written
    return "unbounded", written
for n, directory in enumerate((".", "/", "/tmp", "/dev/shm", "/var/tmp", "/usr", os.environ["HOME"] + "/")):
    print(directory, *fill(n, directory))
"""


def test_writes_stop_at_a_read_only_root_or_a_size_cap(backend):
    """At most `workdir_bytes` in all, wherever the program writes; each place either
    read-only (EROFS), absent (ENOENT) or the capped working directory (ENOSPC)."""
    r = run(backend, FILL, workdir_bytes=4 << 20, max_file_bytes=2 << 20)
    assert r.status == "ok", r
    outcome = {line.split()[0]: (line.split()[1], int(line.split()[2])) for line in r.stdout.splitlines()}
    assert all(error in ("EROFS", "ENOSPC", "ENOENT") for error, _ in outcome.values()), outcome
    assert outcome["/"] == ("EROFS", 0) and outcome["/usr"] == ("EROFS", 0)
    assert outcome["/dev/shm"][0] in ("EROFS", "ENOENT") and outcome["/var/tmp"][0] in ("EROFS", "ENOENT")
    assert outcome["."][0] == "ENOSPC" and 2 <= outcome["."][1] <= 4
    assert sum(mib for _, mib in outcome.values()) <= 4  # MiB: /tmp and home are the capped directory, or read-only
    if backend.kind == "unshare":  # the host's world-writable directories stay out of reach
        assert outcome["/tmp"] == ("EROFS", 0) and outcome["/dev/shm"] == ("EROFS", 0)


def test_one_file_is_capped_at_max_file_bytes(backend):
    code = "with open('big.bin', 'wb') as f:\n    f.write(bytes(2 << 20))\n"
    r = run(backend, code, max_file_bytes=1 << 20)
    assert r.status == "error" and "[Errno 27] File too large" in r.stderr, r  # EFBIG


def test_programs_cannot_regain_the_power_to_mount(backend):
    """No capabilities, no nested user namespace in which to get them (a tmpfs of its own would be
    unbounded), no mount."""
    code = (
        "import ctypes, os\n"
        "status = dict(line.split(':\\t') for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)\n"
        "print('caps', status['CapEff'], status['CapPrm'], status['CapBnd'])\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for what, call in [('userns', lambda: libc.unshare(0x10000000)),\n"
        "                   ('mount', lambda: libc.mount(b'tmpfs', b'.', b'tmpfs', 0, None)),\n"
        "                   ('remount', lambda: libc.mount(None, b'/', None, 32 | 4096, None))]:\n"
        "    print(what, call(), ctypes.get_errno())\n"
    )
    r = run(backend, code)
    assert r.status == "ok", r
    lines = r.stdout.splitlines()
    assert lines[0] == "caps 0000000000000000 0000000000000000 0000000000000000"
    for line in lines[1:]:
        _, ret, err = line.split()
        assert ret == "-1" and int(err) in (1, 28), line  # EPERM, or ENOSPC: a user-namespace limit of 0


def _host_shm_segments() -> set[str]:
    return set(Path("/proc/sysvipc/shm").read_text().splitlines()[1:])


def test_system_v_shared_memory_stays_in_the_sandbox(backend):
    """The unshare fallback once shared the host's IPC namespace: segments outlived the run, in host
    memory. Now every sandbox has its own (and under unshare, no segments at all)."""
    before = _host_shm_segments()
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.shmget(0, 1 << 20, 0o1600), ctypes.get_errno())\n"  # IPC_PRIVATE, IPC_CREAT | 0600
    )
    r = run(backend, code)
    assert r.status == "ok", r
    if backend.kind == "unshare":
        assert r.stdout.split() == ["-1", "28"]  # ENOSPC: shmmni is 0
    assert _host_shm_segments() <= before


def test_the_host_stays_writable(backend):
    """The sandbox's mounts are its own: remounting them read-only changes nothing on the host."""
    assert run(backend, "print(1)").status == "ok"
    for directory in (tempfile.gettempdir(), "/dev/shm"):
        if os.path.isdir(directory):
            with tempfile.NamedTemporaryFile(dir=directory) as f:
                f.write(b"still writable")


def test_host_files_are_hidden_or_read_only(backend, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    secret.chmod(0o600)
    keep = tmp_path / "keep.txt"
    keep.write_text("keep me")
    marker = f"afm-escape-{uuid.uuid4().hex}"
    code = (
        "import errno, os, shutil\n"
        f"for path in ['/etc/passwd', {str(secret)!r}, {str(ROOT / 'pyproject.toml')!r}]:\n"
        "    try:\n"
        "        open(path).read()\n"
        "        print(path, 'read')\n"
        "    except OSError as e:\n"
        "        print(path, errno.errorcode[e.errno])\n"
        f"for path in [{str(keep)!r}, {str(tmp_path)!r}, '/tmp/{marker}']:\n"
        "    try:\n"
        "        if path.endswith('.txt'):\n"
        "            os.remove(path)\n"
        "        elif 'afm-escape' in path:\n"
        "            open(path, 'w').write('x')\n"
        "        else:\n"
        "            shutil.rmtree(path)\n"
        "        print(path, 'changed')\n"
        "    except OSError as e:\n"
        "        print(path, errno.errorcode[e.errno])\n"
    )
    r = run(backend, code)
    assert r.status == "ok", r
    lines = set(r.stdout.splitlines())
    if backend.kind == "bwrap":  # nothing of the host's filesystem is there
        for path in ("/etc/passwd", str(secret), str(ROOT / "pyproject.toml"), str(keep), str(tmp_path)):
            assert f"{path} ENOENT" in lines
        assert f"/tmp/{marker} changed" in lines  # its /tmp is its own tmpfs
    else:  # documented weakness: the host filesystem is visible (read-only), guarded by permissions
        assert "/etc/passwd read" in lines
        assert f"/tmp/{marker} EROFS" in lines  # world-writable on the host, read-only here
        for path in (keep, tmp_path):  # not even reachable where the host runs as root (mode 0700 above)
            assert f"{path} EROFS" in lines or f"{path} EACCES" in lines, lines
        if _sandbox_uid_differs():
            assert f"{secret} EACCES" in lines
    assert not Path(tempfile.gettempdir(), marker).exists()
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

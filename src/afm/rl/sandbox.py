"""Run untrusted, model-written Python programs and report what happened, whatever the program does.

Threat model
------------
The code comes from a policy being optimised against a reward: it is hostile by assumption, whether by
accident (infinite loops, runaway allocations, fork bombs, gigabytes of output) or because optimisation
found that attacking the harness pays (killing the grader, rewriting the tests, exiting 0 early,
phoning home). The host runs the trainer, so the sandbox must keep the host's processes, files, network
and memory out of reach, always end every process it started, and always return a `SandboxResult`:
nothing a program does makes `run_python` raise.

Isolation (chosen once per process at the first call, see `isolation()`)
-------------------------------------------------------------------------
1. ``bwrap`` (bubblewrap): new user, pid, network, IPC, UTS and cgroup namespaces; nested user
   namespaces disabled (bubblewrap >= 0.8); no capabilities; ``no_new_privs``; a new session (no
   terminal injection). The filesystem is a fresh root holding only read-only binds of /usr, /lib*,
   /bin and the interpreter's install prefix, a minimal read-only /dev, the sandbox's own /proc, the
   program at /program.py and a writable, size-capped tmpfs at /sandbox (also reachable as /tmp) that
   is the working directory: no /etc, no /root or home directories, no project, no host /tmp. The
   network namespace holds only its own loopback (bubblewrap brings it up; nothing else listens there).
2. ``unshare`` (util-linux), when bubblewrap is missing or cannot start: user, network (loopback down),
   pid and mount namespaces (with the sandbox's own /proc) and a private working directory. Weaker:
   the host's whole filesystem stays visible, protected only by ordinary permissions of the sandbox's
   uid. It can read every world-readable file (/etc/passwd, world-readable projects), write to
   world-writable directories (/tmp, /dev/shm) and, when the host does not run as root, read and write
   everything the host user owns. Processes, network and resource limits are contained as with
   bubblewrap.
3. Neither works: `available()` is false and `run_python` refuses with ``sandbox_error`` rather than
   run hostile code bare.

When the host runs as root, the sandbox never does: it runs as uid/gid 65534 (nobody). Besides least
privilege this is what makes RLIMIT_NPROC work, since the kernel exempts uid 0 from it even inside a
user namespace. The interpreter may live where nobody cannot reach it (pyenv under /root, mode 0700),
so then a root launcher, in a private mount namespace that disappears with the run, covers that
directory with an empty tmpfs and binds the interpreter's install prefix back at its own path,
read-only (its path must not change: the binary finds libpython through an absolute RUNPATH). As a
side effect the fallback cannot see the rest of that directory either. The host's mounts are
untouched.

Limits (set by a trusted bootstrap inside the sandbox, before any untrusted code runs; the untrusted
program inherits them across ``exec`` and cannot raise them: that needs CAP_SYS_RESOURCE in the host's
user namespace)
--------------------------------------------------------------------------------------------------
- ``timeout_s``: wall clock, enforced by the host, which then kills the sandbox (status ``timeout``).
- ``cpu_s``: RLIMIT_CPU per process, rounded up to whole seconds: SIGXCPU at the limit, SIGKILL one
  second later for programs that catch SIGXCPU (status ``cpu_limit``). Processes that share the work
  out are stopped by the wall clock.
- ``memory_mb``: RLIMIT_AS per process (address space, which bounds what it can allocate; Python
  raises MemoryError, status ``memory_limit``).
- ``max_procs``: RLIMIT_NPROC, counted per sandbox because every run has its own user namespace. It
  counts threads, the sandbox's init and, under unshare, the launcher that created the namespace, so
  a program gets ``max_procs - 2`` (bubblewrap) or ``max_procs - 3`` (unshare) more processes. Fork
  bombs stop there, and the pid namespace makes ending them all one kill.
- ``max_output_bytes``: stdout plus stderr together; the host stops reading and kills the sandbox past
  it (status ``output_limit``), so a program printing gigabytes costs at most this much host memory.
- `MAX_FILE_BYTES` per written file (RLIMIT_FSIZE; Python ignores SIGXFSZ, so the write fails with
  EFBIG) and `WORKDIR_BYTES` for the whole bubblewrap working directory (tmpfs ``size``; the unshare
  fallback writes to the host's disk, bounded per file only).
- `MAX_OPEN_FILES` (RLIMIT_NOFILE) and no core dumps (RLIMIT_CORE 0).

Ending: the sandbox's init is the trusted bootstrap; it runs the program as its child and exits when
the program does, and the kernel then kills everything else in the pid namespace, daemons included.
The launcher leads its own session and process group; at the end of every run (normal exit, timeout,
output limit) the host SIGKILLs that group before reaping the launcher, so the group's id cannot have
been reused, and init dies with the launcher (``--die-with-parent`` / ``--kill-child``). The launcher
in turn dies with the host process; only the run's temporary folder (a few KiB) outlives a SIGKILLed
host.

Not covered (would need cgroups or seccomp): kernel memory that RLIMIT_AS does not count (SysV shared
memory, memfd and pipe buffers, all freed when the sandbox ends) and the kernel's attack surface in
general.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Literal

from afm.errors import ConfigError

Status = Literal[
    "ok", "error", "timeout", "cpu_limit", "memory_limit", "output_limit", "killed", "sandbox_error"
]

MAX_FILE_BYTES = 16 << 20
"""RLIMIT_FSIZE: the largest file a sandboxed program may write."""
WORKDIR_BYTES = 64 << 20
"""Size of bubblewrap's tmpfs working directory: all files a program writes, together."""
MAX_OPEN_FILES = 64
"""RLIMIT_NOFILE: also bounds the memfd and pipe memory that RLIMIT_AS does not count."""
SANDBOX_UID = 65534
"""The uid (nobody) the sandbox runs as when the host runs as root."""

_SANDBOX_DIR = "/sandbox"  # bubblewrap's working directory inside the sandbox
_SANDBOX_PROGRAM = "/program.py"  # where bubblewrap shows the program, read-only
_DRAIN_GRACE_S = 1.0  # after the launcher exits, how long its pipes may take to reach EOF
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_PYTHON = os.path.realpath(sys.executable)
_DROP_ROOT = [f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups"]  # setpriv options

# The first code that runs inside the sandbox, trusted, as the pid namespace's init: lower the limits
# (never above what the host already imposes), tell the host the sandbox started (so a launcher
# failure is told apart from a program failure), run the program as its child, reap every orphan, and
# on the program's end report its exact status and CPU time on the control pipe, then exit, which
# kills whatever is left in the namespace. The program runs as a child, not as init itself, because
# the kernel shields init from signals sent inside its namespace: the program could not even kill
# itself. The report is a diagnostic: were the program to write to init's pipe (through /proc), it
# would gain nothing it could not get by exiting the same way.
_BOOTSTRAP = """\
import os, resource, signal, sys
fd, cpu, mem, nproc, fsize, nofile = map(int, sys.argv[1:7])
for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                        (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
                        (resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0)):
    old = resource.getrlimit(res)[1]
    hard = hard if old == resource.RLIM_INFINITY else min(hard, old)
    resource.setrlimit(res, (min(soft, hard), hard))
os.write(fd, b"S\\n")
child = os.fork()
if child == 0:
    os.close(fd)
    try:
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-X", "utf8", sys.argv[7]])
    except OSError as e:
        os.write(2, f"cannot start the program: {e}\\n".encode())
    os._exit(127)
signal.signal(signal.SIGINT, signal.SIG_DFL)  # ignored, like every signal sent to init from inside
while True:
    pid, status, usage = os.wait3(0)
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os.write(fd, b"E %d %.3f\\n" % (code, usage.ru_utime + usage.ru_stime))
        os._exit(code if code >= 0 else 128 - code)
"""

# Run as root in a private mount namespace; arguments: mount, (root stage)* --, hidden* --,
# (stage root)* --, command. Bind each interpreter root aside, cover each directory the sandbox uid
# cannot traverse with an empty tmpfs, bind the roots back at their own paths, read-only, run the command.
_EXPOSE_SCRIPT = """\
m=$1; shift
while [ "$1" != -- ]; do "$m" --bind -o ro -- "$1" "$2" || exit 125; shift 2; done; shift
while [ "$1" != -- ]; do "$m" -t tmpfs -o mode=755,size=64k tmpfs "$1" || exit 125; shift; done; shift
while [ "$1" != -- ]; do mkdir -p -- "$2" && "$m" --bind -o ro -- "$1" "$2" || exit 125; shift 2; done; shift
exec "$@"
"""


@dataclass(frozen=True)
class SandboxResult:
    """What happened to one sandboxed program.

    `status` is "ok" (exit 0), "error" (non-zero exit), "timeout" (wall clock), "cpu_limit",
    "memory_limit", "output_limit", "killed" (another signal) or "sandbox_error" (the sandbox itself
    could not start; `reason` says why). `returncode` is the exit status, minus the signal number for a
    program killed by a signal, None when the program never started or the host stopped it (timeout,
    output limit). `stdout`/`stderr` are decoded as UTF-8
    (invalid bytes replaced) and hold at most `max_output_bytes` together. `reason` explains any status
    but "ok". Statuses other than "ok" and "sandbox_error" are diagnostics: the program controls how it
    ends, so it can fake any of them.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str


@dataclass(frozen=True)
class TestResult:
    """Outcome of `run_tests`: `passed` iff the program exited 0 within its limits after the tests ran."""

    __test__ = False  # not a pytest test class, despite the name

    passed: bool
    result: SandboxResult


@dataclass(frozen=True)
class _Backend:
    """A working isolation mechanism and the tools it uses (absolute paths)."""

    kind: Literal["bwrap", "unshare"]
    description: str
    tool: str  # bwrap or unshare
    setpriv: str | None  # uid drop (root host) and, for unshare, death with the host process
    launcher: tuple[str, str] | None  # unshare and mount, where the interpreter must be exposed
    bwrap_options: tuple[str, ...] = ()  # version-dependent hardening: --disable-userns
    tmpfs_workdir: bool = False  # bubblewrap can size a tmpfs (>= 0.7); else the host work dir is bound


class _Unavailable(Exception):
    """An isolation mechanism cannot be used here; the message says why."""


@dataclass(frozen=True)
class _RunDir:
    """The host side of one run: a private temporary folder with the program, the working directory
    (for the unshare fallback, or bubblewrap without tmpfs sizes) and, where the interpreter must be
    exposed, the mount points where its roots are staged."""

    base: str
    program: str
    work: str
    staged: tuple[tuple[str, str], ...]  # (interpreter root, staging mount point)

    @classmethod
    def create(cls, code: str) -> _RunDir:
        base = tempfile.mkdtemp(prefix="afm-sandbox-")
        try:
            os.chmod(base, 0o711)  # the sandbox uid may traverse, not list
            program = os.path.join(base, "program.py")
            with open(program, "w", encoding="utf-8") as f:
                f.write(code)
            os.chmod(program, 0o644)
            work = os.path.join(base, "work")
            os.mkdir(work, 0o700)
            staged = []
            if _hidden_dirs():
                for i, root in enumerate(_interpreter_roots()):
                    stage = os.path.join(base, f"python{i}")
                    os.mkdir(stage, 0o700)
                    staged.append((root, stage))
            if os.geteuid() == 0:
                os.chown(work, SANDBOX_UID, SANDBOX_UID)
        except BaseException:
            _remove_tree(base)
            raise
        return cls(base, program, work, tuple(staged))


def _outermost(paths: set[str]) -> list[str]:
    return sorted(p for p in paths if not any(q != p and _inside(p, q) for q in paths))


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@functools.cache
def _interpreter_roots() -> tuple[str, ...]:
    """Directories the interpreter needs besides the system ones: its install prefixes and binary."""
    places = (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_PYTHON))
    candidates = {os.path.realpath(p) for p in places}
    return tuple(_outermost({p for p in candidates if not any(_inside(p, d) for d in _SYSTEM_DIRS)}))


@functools.cache
def _hidden_dirs() -> tuple[str, ...]:
    """For a root host: the outermost directories above the interpreter's roots that the sandbox uid
    (nobody: "other" permissions) cannot traverse, which the root launcher covers with a tmpfs."""
    if os.geteuid() != 0:
        return ()
    hidden = set()
    for root in _interpreter_roots():
        path = "/"
        for part in root.strip("/").split("/")[:-1]:
            path = os.path.join(path, part)
            if not os.stat(path).st_mode & 0o001:
                hidden.add(path)
                break
    return tuple(_outermost(hidden))


def _command(backend: _Backend, run: _RunDir, control_fd: int, limits: list[int]) -> list[str]:
    """The full command line of one run: optional root launcher, isolation tool, bootstrap."""
    program = _SANDBOX_PROGRAM if backend.kind == "bwrap" else run.program
    inner = [_PYTHON, "-I", "-S", "-X", "utf8", "-c", _BOOTSTRAP, str(control_fd), *map(str, limits), program]
    as_root = os.geteuid() == 0
    if backend.kind == "bwrap":
        cmd = [backend.tool, "--unshare-all", "--unshare-user", *backend.bwrap_options, "--die-with-parent",
               "--new-session", "--as-pid-1", "--hostname", "sandbox"]
        for d in _SYSTEM_DIRS:
            if os.path.islink(d):
                cmd += ["--symlink", os.readlink(d), d]
            elif os.path.isdir(d):
                cmd += ["--ro-bind", d, d]
        for prefix in _interpreter_roots():
            cmd += ["--ro-bind", prefix, prefix]
        cmd += ["--dev", "/dev", "--remount-ro", "/dev", "--proc", "/proc"]
        if backend.tmpfs_workdir:
            cmd += ["--size", str(WORKDIR_BYTES), "--tmpfs", _SANDBOX_DIR]
        else:
            cmd += ["--bind", run.work, _SANDBOX_DIR]
        if not any(_inside(prefix, "/tmp") for prefix in _interpreter_roots()):  # else /tmp holds it
            cmd += ["--symlink", _SANDBOX_DIR, "/tmp"]
        cmd += ["--ro-bind", run.program, _SANDBOX_PROGRAM, "--chdir", _SANDBOX_DIR, *inner]
        if as_root:  # bubblewrap guards its own lifetime; setpriv only drops root
            assert backend.setpriv is not None  # resolved for a root host
            cmd = [backend.setpriv, *_DROP_ROOT, *cmd]
    else:
        assert backend.setpriv is not None  # always resolved for unshare
        cmd = [backend.setpriv, "--no-new-privs", "--pdeathsig=KILL"]
        if as_root:
            cmd += _DROP_ROOT
        cmd += [backend.tool, "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child",
                "--mount-proc", *inner]
    if backend.launcher is not None:
        unshare, mount = backend.launcher
        aside = [p for prefix, stage in run.staged for p in (prefix, stage)]
        back = [p for prefix, stage in run.staged for p in (stage, prefix)]
        cmd = [unshare, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _EXPOSE_SCRIPT, "sh",
               mount, *aside, "--", *_hidden_dirs(), "--", *back, "--", *cmd]
    return cmd


def _environment(backend: _Backend, run: _RunDir) -> dict[str, str]:
    """A minimal environment: nothing of the host's (tokens, paths) leaks in."""
    home = _SANDBOX_DIR if backend.kind == "bwrap" else run.work
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _tool(name: str) -> str:
    path = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise _Unavailable(f"{name} not found")
    return path


def _root_launcher() -> tuple[str, str] | None:
    return (_tool("unshare"), _tool("mount")) if _hidden_dirs() else None


def _tools_output(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _Unavailable(f"{args[0]} {args[1]} failed: {e}") from e
    return done.stdout + done.stderr


def _bwrap_backend() -> _Backend:
    """Bubblewrap, if installed and able to start a sandbox here."""
    bwrap = _tool("bwrap")
    root = os.geteuid() == 0
    setpriv = _tool("setpriv") if root else None
    help_text = _tools_output(bwrap, "--help")
    version = _tools_output(bwrap, "--version").strip()
    options = ("--disable-userns",) if "--disable-userns" in help_text else ()
    tmpfs = "--size" in help_text
    description = (
        f"bwrap ({version}): user/pid/net/ipc/uts/cgroup namespaces"
        + (", nested user namespaces disabled" if options else "")
        + ", no capabilities, read-only /usr, /lib*, /bin and interpreter, no /etc or home directories, "
        + (f"{WORKDIR_BYTES >> 20} MiB tmpfs working directory" if tmpfs else "private working directory")
        + (f", uid {SANDBOX_UID} (host runs as root)" if root else f", host uid {os.geteuid()}")
    )
    return _checked(_Backend("bwrap", description, bwrap, setpriv, _root_launcher(), options, tmpfs))


def _unshare_backend() -> _Backend:
    """The util-linux fallback, if it can start a sandbox here."""
    unshare, setpriv = _tool("unshare"), _tool("setpriv")
    root = os.geteuid() == 0
    version = _tools_output(unshare, "--version").strip()
    who = (f"uid {SANDBOX_UID} (host runs as root)" if root
           else f"the host uid {os.geteuid()}, whose files it can change")
    description = (
        f"unshare ({version}): user/net/pid/mount namespaces, private working directory; WEAKER than bwrap: "
        f"the host filesystem is visible with the permissions of {who}"
    )
    return _checked(_Backend("unshare", description, unshare, setpriv, _root_launcher()))


def _checked(backend: _Backend) -> _Backend:
    """Run a trivial program through `backend`; raise `_Unavailable` with the reason if it fails."""
    result = _execute(backend, "print(6 * 7)", "", timeout_s=30.0, cpu_s=10.0, memory_mb=512,
                      max_output_bytes=4096, max_procs=32)
    if result.status != "ok" or result.stdout.strip() != "42":
        raise _Unavailable(f"{backend.kind} cannot start a sandbox here: {result.status}: "
                           f"{(result.reason or result.stderr).strip()[:500]}")
    return backend


_backend_lock = threading.Lock()
_backend: _Backend | _Unavailable | None = None


def _selected() -> _Backend | _Unavailable:
    """The best working backend, probed once per process (thread-safe), or why there is none."""
    global _backend
    with _backend_lock:
        if _backend is None:
            reasons: list[str] = []
            for probe in (_bwrap_backend, _unshare_backend):
                try:
                    found = probe()
                except (_Unavailable, OSError) as e:
                    reasons.append(str(e))
                    continue
                if reasons:  # say why the stronger mechanism is not in use
                    found = dataclasses.replace(found, description=f"{found.description} ({reasons[0]})")
                _backend = found
                break
            else:
                _backend = _Unavailable("; ".join(reasons))
        return _backend


def isolation() -> str:
    """What isolates sandboxed programs here. Starts with "bwrap", "unshare" or "none", then details
    (for "none": why each mechanism failed)."""
    backend = _selected()
    return backend.description if isinstance(backend, _Backend) else f"none: {backend}"


def available() -> bool:
    """Whether `run_python` can isolate programs here (if not, it returns "sandbox_error")."""
    return isinstance(_selected(), _Backend)


def run_python(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    cpu_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1_000_000,
    max_procs: int = 32,
) -> SandboxResult:
    """Run the Python program `code` in the sandbox, feeding it `stdin`, under the limits in the
    module docstring. Runs the host's own interpreter in isolated mode (``-I -S``: no environment
    variables, no site-packages, no script directory on the path), so programs get the standard
    library only. Never raises for anything the program does; raises `ConfigError` for invalid limits.
    """
    if min(timeout_s, cpu_s) <= 0 or min(memory_mb, max_output_bytes, max_procs) < 1:
        raise ConfigError("sandbox limits must be positive: "
                          f"{timeout_s=} {cpu_s=} {memory_mb=} {max_output_bytes=} {max_procs=}")
    backend = _selected()
    if isinstance(backend, _Unavailable):
        return SandboxResult("sandbox_error", None, "", "", 0.0, f"no isolation available: {backend}")
    return _execute(backend, code, stdin, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                    max_output_bytes=max_output_bytes, max_procs=max_procs)


def _execute(
    backend: _Backend,
    code: str,
    stdin: str,
    *,
    timeout_s: float,
    cpu_s: float,
    memory_mb: int,
    max_output_bytes: int,
    max_procs: int,
) -> SandboxResult:
    """`run_python` with a given backend."""
    start = time.monotonic()
    cpu_limit = math.ceil(cpu_s)
    limits = [cpu_limit, memory_mb << 20, max_procs, MAX_FILE_BYTES, MAX_OPEN_FILES]
    try:
        run = _RunDir.create(code)
        try:
            pump, exit_code = _supervise(backend, run, limits, stdin.encode("utf-8"), start + timeout_s,
                                              max_output_bytes)
        finally:
            _remove_tree(run.base)
    except OSError as e:  # no temporary directory, no launcher, or no pidfd_open (Linux < 5.3)
        return SandboxResult("sandbox_error", None, "", "", time.monotonic() - start,
                             f"cannot run the sandbox: {e}")
    stdout = bytes(pump.stdout).decode("utf-8", errors="replace")
    stderr = bytes(pump.stderr).decode("utf-8", errors="replace")
    status, returncode, reason = _classify(exit_code, pump, stderr, cpu_limit, timeout_s, memory_mb,
                                           max_output_bytes)
    return SandboxResult(status, returncode, stdout, stderr, time.monotonic() - start, reason)


def _supervise(
    backend: _Backend, run: _RunDir, limits: list[int], stdin: bytes, deadline: float, cap: int
) -> tuple[_Pumped, int]:
    """Start the sandbox, pump its pipes, end it and reap it: (what it said, the launcher's exit code)."""
    control_r, control_w = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                _command(backend, run, control_w, limits), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, pass_fds=(control_w,), cwd=run.work, env=_environment(backend, run),
                start_new_session=True,  # its own process group, killed as one
            )
        finally:
            os.close(control_w)  # the sandbox has its own copy
        try:
            pump = _pump(proc, control_r, stdin, deadline, cap)
        finally:
            _kill_group(proc)  # the launcher is not reaped yet: its group id cannot have been reused
            proc.wait()
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
    finally:
        os.close(control_r)
    return pump, proc.returncode


@dataclass
class _Pumped:
    stdout: bytearray
    stderr: bytearray
    control: bytearray  # from the sandbox's init: "S\n" once started, "E <exit code> <CPU s>\n" at the end
    stopped: Literal["timeout", "output"] | None  # why the host killed the sandbox, if it did

    @property
    def started(self) -> bool:
        """Whether the sandbox itself worked (its init ran)."""
        return self.control.startswith(b"S\n")

    def report(self) -> tuple[int, float] | None:
        """The program's exit code (minus the signal number for a signal death) and CPU seconds."""
        for line in reversed(self.control.decode("ascii", errors="replace").splitlines()):
            fields = line.split()
            if len(fields) == 3 and fields[0] == "E":
                try:
                    return int(fields[1]), float(fields[2])
                except ValueError:
                    return None
        return None


def _pump(proc: subprocess.Popen[bytes], control_r: int, stdin: bytes, deadline: float, cap: int) -> _Pumped:
    """Feed stdin and collect stdout/stderr and the control pipe concurrently until the launcher exits and
    its pipes close, the wall clock runs out or the output passes `cap` bytes; the host kills the
    sandbox in the last two cases (the caller does)."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    out = _Pumped(bytearray(), bytearray(), bytearray(), None)
    buffers = {proc.stdout.fileno(): out.stdout, proc.stderr.fileno(): out.stderr}
    stdin_fd = proc.stdin.fileno()
    pidfd = os.pidfd_open(proc.pid)  # readable once the launcher exits, without reaping it
    sel = selectors.DefaultSelector()
    try:
        for fd in (*buffers, control_r, stdin_fd):
            os.set_blocking(fd, False)
        for fd in (*buffers, control_r, pidfd):
            sel.register(fd, selectors.EVENT_READ)
        if stdin:
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        open_outputs, written, total, exited_at = len(buffers), 0, 0, None
        while open_outputs or exited_at is None:
            now = time.monotonic()
            until = deadline if exited_at is None else min(deadline, exited_at + _DRAIN_GRACE_S)
            if now >= until:
                if exited_at is None:
                    out.stopped = "timeout"
                break
            for key, _ in sel.select(until - now):
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(pidfd)
                    exited_at = time.monotonic()
                    _kill_group(proc)  # stragglers that outlived the launcher (none with a pid namespace)
                elif fd == control_r:
                    if not _read_control(control_r, out.control):
                        sel.unregister(control_r)
                elif fd == stdin_fd:
                    try:
                        written += os.write(stdin_fd, stdin[written:written + 65536])
                    except BlockingIOError:  # the pipe filled up between select and write
                        continue
                    except BrokenPipeError:  # the program stopped reading: fine
                        written = len(stdin)
                    if written == len(stdin):
                        sel.unregister(stdin_fd)
                        proc.stdin.close()
                else:
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        sel.unregister(fd)
                        open_outputs -= 1
                        continue
                    buffers[fd] += chunk[: cap - total]
                    total += len(chunk)
                    if total > cap:
                        out.stopped = "output"
                        return out
        _read_control(control_r, out.control)  # what arrived in the same instant the launcher exited
        return out
    finally:
        sel.close()
        os.close(pidfd)


def _read_control(fd: int, buffer: bytearray) -> bool:
    """Read what the control pipe holds into `buffer` (at most 4 KiB in all: the program can write to
    it); whether it may hold more later (not at EOF)."""
    try:
        chunk = os.read(fd, 4096)
    except BlockingIOError:
        return True
    buffer += chunk[: 4096 - len(buffer)]
    return bool(chunk) and len(buffer) < 4096


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # the whole group is gone already (only the unreaped launcher is left)
        pass


def _classify(
    code: int,
    pump: _Pumped,
    stderr: str,
    cpu_limit: int,
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
) -> tuple[Status, int | None, str]:
    """Status, return code and reason of a finished run."""
    if not pump.started:
        if pump.stopped == "timeout":
            return "sandbox_error", None, f"the sandbox did not start within {timeout_s:g} s"
        detail = stderr.strip()[-2000:] or f"launcher exited with status {code}"
        return "sandbox_error", None, f"the sandbox did not start: {detail}"
    if pump.stopped == "output":
        return "output_limit", None, f"stdout and stderr exceeded {max_output_bytes} bytes"
    if pump.stopped == "timeout":
        return "timeout", None, f"wall-clock limit of {timeout_s:g} s exceeded"
    report = pump.report()
    if report is not None:
        code, cpu_used = report
    else:  # init did not report: it or the launcher was killed (the program can kill its process group)
        cpu_used = 0.0
        if code > 128:  # bubblewrap passes on init's death by a signal as 128 + signal, as shells do
            code = 128 - code
    if code < 0:
        sig = -code
        try:
            name = signal.Signals(sig).name
        except ValueError:  # a real-time signal
            name = f"signal {sig}"
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_limit - 0.05):
            return "cpu_limit", code, f"CPU limit of {cpu_limit} s exceeded ({name})"
        return "killed", code, f"killed by {name}"
    if code == 0:
        return "ok", 0, ""
    if "MemoryError" in "\n".join(stderr.rstrip().splitlines()[-3:]):
        return "memory_limit", code, f"MemoryError under the {memory_mb} MiB address-space limit"
    return "error", code, f"exited with status {code}"


def _remove_tree(path: str) -> None:
    """Delete a run's folder even where the program left directories without permissions."""
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
        return
    for parent, dirs, _ in os.walk(path):
        for d in dirs:
            p = os.path.join(parent, d)
            if not os.path.islink(p):  # never chmod through a link the program planted
                os.chmod(p, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def run_tests(
    solution_code: str,
    test_code: str,
    entry_point: str | None = None,
    *,
    timeout_s: float = 5.0,
    cpu_s: float = 5.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1_000_000,
    max_procs: int = 32,
) -> TestResult:
    """Check a solution against unit tests in the sandbox (HumanEval or assert style).

    The program is `solution_code`, then `test_code`, run as ``__main__``; with an `entry_point`
    (HumanEval: the tests define ``check(candidate)``), ``check(<entry_point>)`` is called last. It
    passes iff it exits 0 within its limits *and* the harness got past the tests: the harness prints a
    random token, received on stdin before the solution runs, after the last test, so a solution that
    calls ``exit(0)`` (or ``os._exit(0)``) before the tests fails. The token lives in the harness's
    memory, so a solution that digs through stack frames can still forge it; an in-process harness
    cannot rule that out, nor objects that compare equal to everything.
    """
    token = secrets.token_hex(16)
    source = f"{solution_code}\n\n{test_code}\n"
    # The program runs in a fresh __main__ module (not the harness's), its source registered with
    # linecache so that tracebacks, printed by `traceback` rather than the C hook, show its lines.
    harness = (
        "import linecache, os, sys, traceback, types\n"
        "def _afm_harness(source, entry_point):\n"
        "    token = sys.stdin.buffer.readline().strip()\n"
        "    module = types.ModuleType('__main__')\n"
        "    sys.modules['__main__'] = module\n"
        "    linecache.cache['<solution>'] = (len(source), None, source.splitlines(True), '<solution>')\n"
        "    try:\n"
        "        exec(compile(source, '<solution>', 'exec'), module.__dict__)\n"
        "        if entry_point is not None:\n"
        "            module.check(getattr(module, entry_point))\n"
        "    except Exception:\n"
        "        traceback.print_exc()\n"
        "        sys.exit(1)\n"
        "    sys.stdout.flush()\n"
        "    os.write(1, b'\\n' + token + b'\\n')\n"
        f"_afm_harness({source!r}, {entry_point!r})\n"
    )
    result = run_python(harness, stdin=token + "\n", timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                        max_output_bytes=max_output_bytes, max_procs=max_procs)
    marker = f"\n{token}\n"
    if marker in result.stdout:
        before, _, after = result.stdout.rpartition(marker)
        result = dataclasses.replace(result, stdout=before + after)
    elif result.status == "ok":
        result = dataclasses.replace(result, status="error",
                                     reason="exited with status 0 before the tests finished")
    return TestResult(result.status == "ok", result)

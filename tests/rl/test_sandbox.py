"""kimi_jax.rl.sandbox: statuses, the result channel, and hostile programs (each bounded: tiny limits, 1-2 s)."""

import os
import socket

import pytest

from kimi_jax.rl import sandbox
from kimi_jax.rl.sandbox import Limits, SandboxPool, run_python, split_tests

TIGHT = Limits(memory_mb=256, file_mb=4, disk_mb=16, max_processes=8, output_bytes=4096)
DOUBLE = "def f(x):\n    return 2 * x\n"
TESTS = "assert f(2) == 4\nassert f(-3) == -6\n"
namespaced = pytest.mark.skipif(not sandbox.namespaces_available(), reason="unshare is not available here")


def _run(program, tests=TESTS, timeout_s=2.0, limits=TIGHT):
    return run_python(program, tests, timeout_s=timeout_s, limits=limits)


def _sandbox_processes():
    """pids of live processes (not zombies: orphans wait for the host's init to reap them) under a sandbox uid of
    runs started by this process (other processes' runs may be under way)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        uid = int(fields["Uid"].split()[0]) - sandbox.SANDBOX_UID_BASE
        if uid >= 0 and uid >> 10 == os.getpid() & 0xFFFFF and not fields["State"].strip().startswith("Z"):
            found.append(pid)
    return found


def test_split_tests_keeps_literals_out_of_the_sandbox():
    checks, expected = split_tests("x = [3, 1]\nassert f(x) == [1, 3]\nassert (5, 'a') == g()\nassert h(1) < 2\n")
    assert checks == [("setup", "x = [3, 1]"), ("value", "f(x)"), ("value", "g()"), ("value", "h(1) < 2")]
    assert expected == {1: [1, 3], 2: (5, "a"), 3: sandbox.TRUTHY}
    with pytest.raises(ValueError, match="not valid Python"):
        split_tests("assert f(1 ==")
    with pytest.raises(ValueError, match="no assert"):
        split_tests("x = 1")


def test_passed_failed_and_errors():
    result = _run(DOUBLE + "print('hello')")
    assert (result.status, result.tests_passed, result.tests_total, result.stdout) == ("passed", 2, 2, "hello\n")
    assert result.reward == 1.0
    result = _run("def f(x):\n    return x + 2\n")      # right on f(2), wrong on f(-3)
    assert (result.status, result.tests_passed, result.reward) == ("failed", 1, 0.0)
    assert _run("def f(x):\n    return 2 * x\nraise KeyError('k')").status == "runtime_error"
    assert _run("def f(x) return x").status == "runtime_error"                  # SyntaxError
    result = _run("def f(x):\n    return 1 // (x - 2)\n")                       # a test raises
    assert result.status == "runtime_error" and "ZeroDivisionError" in result.reason
    assert _run("import collections\ndef f(x):\n    return collections.Counter([x])[x] * x * 2 // 1 // 1").status \
        == "passed"
    assert _run("def f(x):\n    return float(2 * x)\n").status == "passed"     # 4.0 == 4, as Python's assert


def test_returned_objects_must_be_plain_data():
    """An object whose __eq__ is always True (the classic always-equal hack) is not plain data: it fails."""
    program = "class Any:\n    def __eq__(self, other):\n        return True\ndef f(x):\n    return Any()\n"
    result = _run(program)
    assert result.status == "runtime_error" and "not plain data" in result.reason
    result = _run("class I(int):\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return I(0)\n")
    assert result.status == "runtime_error" and "not plain data" in result.reason


def test_infinite_loop_times_out():
    result = _run("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and 1.0 <= result.wall_s < 1.5 and result.reward == 0.0


FORK_BOMB = ("import os, time\nmade = 0\nfor _ in range(200):\n    try:\n        pid = os.fork()\n"
             "    except OSError:\n        break\n    if pid == 0:\n        os.setsid()\n        time.sleep(60)\n"
             "    made += 1\nprint('forked', made, flush=True)\nwhile True:\n    pass\n")


def test_fork_bomb_is_bounded_and_killed():
    """Children leave the process group (setsid) and sleep; the parent spins. RLIMIT_NPROC of the run's own uid
    stops the forks, and after the timeout no process of any sandbox uid is left."""
    result = _run(FORK_BOMB, timeout_s=1.0)
    assert result.status == "timeout"
    assert 0 < int(result.stdout.split()[1]) < TIGHT.max_processes
    assert _sandbox_processes() == []


def test_without_namespaces_the_uid_and_rlimits_still_hold(monkeypatch, tmp_path):
    """The fallback where unshare is unavailable: no network isolation (and the result says so), but the same
    statuses, the fork bomb bounded and cleaned up by uid, host files protected by permissions."""
    monkeypatch.setattr(sandbox, "namespaces_available", lambda: False)
    result = _run(DOUBLE)
    assert (result.status, result.namespaces) == ("passed", False)
    result = _run(FORK_BOMB, timeout_s=1.0)
    assert result.status == "timeout" and 0 < int(result.stdout.split()[1]) < TIGHT.max_processes
    assert _sandbox_processes() == []
    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("keep")
    result = _run(f"import os\nos.remove({str(sentinel)!r})\n" + DOUBLE)
    assert result.status == "runtime_error" and "PermissionError" in result.reason and sentinel.exists()
    assert _run("x = bytearray(8 << 30)\n" + DOUBLE).status == "memory"


def test_huge_allocation_is_memory():
    assert _run("x = bytearray(8 << 30)\n" + DOUBLE).status == "memory"
    assert _run("def f(x):\n    return len([0] * (1 << 33))\n").status == "memory"


def test_one_gigabyte_write_is_capped():
    program = ("chunk = b'0' * (1 << 20)\nwith open('big.bin', 'wb') as f:\n    for _ in range(1024):\n"
               "        f.write(chunk)\n" + DOUBLE)
    result = _run(program)
    assert result.status == "runtime_error" and "File too large" in result.reason


@namespaced
def test_many_files_fill_only_the_scratch_tmpfs():
    program = ("chunk = b'0' * (1 << 20)\nfor i in range(256):\n    with open(f'/tmp/part{i}', 'wb') as f:\n"
               "        for _ in range(3):\n            f.write(chunk)\n" + DOUBLE)
    result = _run(program)
    assert result.status == "runtime_error" and "No space left" in result.reason


@namespaced
def test_socket_connect_fails():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n" + DOUBLE
        result = _run(program)
        with pytest.raises(BlockingIOError):
            server.accept()
    assert result.status == "runtime_error" and "OSError" in result.reason and result.namespaces
    result = _run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n" + DOUBLE)
    assert result.status == "runtime_error" and "unreachable" in result.reason


def test_files_outside_its_directory_survive(tmp_path):
    """Deleting a host file fails (hidden by the namespace's tmpfs, or not the program's uid), and so does creating
    one in a root-owned directory."""
    sentinel = tmp_path / "keep.txt"
    sentinel.write_text("keep")
    probe = "/etc/kimi_jax_sandbox_probe"
    program = (f"import os, shutil\nerrors = []\nfor act in (lambda: os.remove({str(sentinel)!r}),\n"
               f"            lambda: shutil.rmtree({str(tmp_path)!r}),\n"
               f"            lambda: open({probe!r}, 'w')):\n"
               "    try:\n        act()\n    except OSError as e:\n        errors.append(type(e).__name__)\n"
               "print(errors)\n" + DOUBLE)
    try:
        result = _run(program)
        assert sentinel.read_text() == "keep" and not os.path.exists(probe)
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    assert result.status == "passed" and result.stdout.count("Error") == 3


def test_exit_before_the_tests_does_not_pass():
    assert _run("import sys\ndef f(x):\n    return 0\nsys.exit(0)\n").status == "failed"
    assert _run("import os\ndef f(x):\n    return 0\nos._exit(0)\n").status == "failed"


def test_fake_pass_lines_and_forged_records_do_not_pass():
    """The program prints pass lines and writes records in the result channel's format, claiming its own pid, to
    every fd it has open: f(2) = 4 is guessed right (a forger that knows the answer is a correct program), the other
    value is not, so the run fails."""
    program = ("import os\ndef f(x):\n    return 0\nprint('PASSED\\n2 tests passed\\nOK')\n"
               "for fd in map(int, os.listdir('/proc/self/fd')):\n    for i in range(2):\n        try:\n"
               "            os.write(fd, (repr({'check': i, 'value': repr(2 * i + 4), 'pid': os.getpid()}) + '\\n')"
               ".encode())\n        except OSError:\n            pass\n")
    result = _run(program)
    assert result.status == "failed" and result.tests_passed == 1 and "PASSED" in result.stdout


def test_expected_outputs_cannot_be_read():
    """The program searches its files, fds, /proc and every string and int its heap's containers hold for the
    expected value 987654321 (built at run time, so that its own source does not contain it)."""
    program = r'''
import gc, os
target = int("".join(["98765432", "1"]))
needle = str(target)
found = []
def look(text, where):
    if needle in text:
        found.append(where)
for root, dirs, files in os.walk("/tmp"):
    for name in files:
        try:
            look(open(os.path.join(root, name), errors="replace").read(), name)
        except OSError:
            pass
for pid in filter(str.isdigit, os.listdir("/proc")):
    for part in ("cmdline", "environ"):
        try:
            look(open(f"/proc/{pid}/{part}", errors="replace").read(), f"{pid}/{part}")
        except OSError:
            pass
for fd in os.listdir("/proc/self/fd"):
    try:
        look(os.read(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK), 1 << 20).decode(errors="replace"), fd)
    except OSError:
        pass
for obj in gc.get_objects():
    items = list(obj.keys()) + list(obj.values()) if isinstance(obj, dict) else obj
    if not isinstance(items, (list, tuple)):
        continue
    for item in items:
        if isinstance(item, str) and item is not needle:
            look(item, "heap str")
        elif type(item) is int and item == target and item is not target:
            found.append("heap int")
look(repr(os.environ), "environ")
print("found", found)
def f(x):
    return target if found else 0
'''
    result = _run(program, tests="assert f(1) == 987654321\n")
    assert result.status == "failed" and "found []" in result.stdout


def test_sandbox_error_is_not_scored(monkeypatch):
    monkeypatch.setattr(sandbox, "SUPERVISOR", "/nonexistent/sandbox_supervisor.py")
    result = _run(DOUBLE)
    assert result.status == "sandbox_error" and result.reward is None


def test_output_is_capped():
    result = _run("for _ in range(100000):\n    print('x' * 99)\n" + DOUBLE)
    assert result.status == "passed" and len(result.stdout) == TIGHT.output_bytes


def test_pool_runs_apart_from_the_caller():
    with SandboxPool(workers=2) as pool:
        results = pool.map([DOUBLE, "def f(x):\n    return x\n", "while True:\n    pass\n"], [TESTS] * 3,
                           timeout_s=1.0, limits=TIGHT)
        with pytest.raises(ValueError, match="2 programs but 1 tests"):
            pool.map(["", ""], [TESTS])
    assert [r.status for r in results] == ["passed", "failed", "timeout"]

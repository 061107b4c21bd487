"""Run model-written Python against unit tests, for code rewards (POSTTRAINING.md section 3).

`run_python(program, tests, timeout_s=...)` runs `program`, then the statements of `tests` (trusted Python source
from a task generator: assert statements, optionally set-up statements), and returns a SandboxResult whose
`status` is one of STATUSES. `SandboxPool` runs many through worker processes apart from the caller (the JAX
process). Standard library only: this file also runs as the pool's worker script.

How one run is contained:
- a fresh process per program: `python -I -S sandbox_supervisor.py` (no site-packages, no environment), started
  by subprocess without a preexec_fn (fork and exec happen in C with no Python code between them: safe from a
  threaded JAX process) in its own session, wrapped in `unshare --mount --net --pid --fork --mount-proc` where the kernel allows it
  (SandboxResult.namespaces says whether it did): no network but a down loopback, no view of host processes,
  the world-writable directories replaced by one tmpfs of Limits.disk_mb MiB;
- the program's process runs under its own unprivileged uid (distinct per run, so RLIMIT_NPROC really bounds a
  fork bomb: it is not enforced for root) with no_new_privs and rlimits: CPU seconds, address space, file size,
  open files, processes, no core files; files outside the scratch space are protected by ordinary permissions;
- on timeout the supervisor kills the program, then every process of its uid (also those that left the process
  group); the PID namespace's end kills anything left; a watchdog here kills the whole process group if even the
  supervisor overstays; stdout and stderr are capped (read to the end, kept up to Limits.output_bytes).

Why a result cannot be forged: for `assert <expr> == <literal>` only <expr> is sent into the sandbox; it is
evaluated there and its value (plain data, exact builtin types) comes back and is compared here with the literal,
which never enters the sandbox (no test file to read, nothing in memory to copy). Any other assert sends its whole
expression and requires a truthy plain value: such tests are only as strong as the program's inability to write
"True" records to the result pipe itself, so task generators write `==` tests. Exit status, timeout and wall time
come from the root supervisor through a pipe the program's process closes before any of its code runs; printed
lines and exit codes of the program carry no meaning. A run that fails before the program starts is a
"sandbox_error": not the program's fault, kept out of rewards (SandboxResult.reward is None).
"""

from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import marshal
import os
import queue
import selectors
import signal
import subprocess
import sys
import time
from typing import Sequence

STATUSES = ("passed", "failed", "timeout", "memory", "runtime_error", "sandbox_error")
SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_supervisor.py")
NAMESPACE_COMMAND = ("unshare", "--mount", "--net", "--pid", "--fork", "--mount-proc", "--kill-child")
SANDBOX_UID_BASE = 100_000         # uids SANDBOX_UID_BASE + (pid mod 2^20) * 2^10 + (run mod 2^10): below 2^31
RESULT_BYTES = 16 << 20           # kept of the result pipe (each test value's repr is capped at 1 MiB there)
WATCHDOG_GRACE_S = 10.0            # the supervisor's own start-up and clean-up, beyond timeout_s
DEFAULT_TIMEOUT_S = 5.0
TRUTHY = object()                  # the expected "value" of an assert that is not `<expr> == <literal>`
_run_counter = itertools.count()


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one program (config-like; our choices, not published)."""
    memory_mb: int = 512           # RLIMIT_AS of the program's process
    file_mb: int = 16              # RLIMIT_FSIZE: largest file it may write
    disk_mb: int = 64              # the scratch tmpfs (namespaced runs only)
    open_files: int = 64           # RLIMIT_NOFILE
    max_processes: int = 16        # RLIMIT_NPROC of its uid (threads count)
    output_bytes: int = 64 << 10   # kept of stdout and of stderr each


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    status: str                    # one of STATUSES
    stdout: str
    stderr: str
    wall_s: float                  # the program's wall time, fork to exit, measured by the supervisor (0 if none)
    tests_passed: int
    tests_total: int
    reason: str                    # why this status, for logs
    namespaces: bool               # ran in fresh network/PID/mount namespaces (False: network was not off)

    @property
    def reward(self) -> float | None:
        """1.0 passed, 0.0 any failure of the program, None for a sandbox error (excluded from the reward)."""
        return None if self.status == "sandbox_error" else float(self.status == "passed")


def run_python(program: str, tests: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
               limits: Limits = Limits()) -> SandboxResult:
    """Run `program` then `tests` in a fresh sandboxed process; see the module docstring. timeout_s bounds the
    program and its tests together (wall clock; CPU time is also capped at ceil(timeout_s) + 1 s).
    Raises ValueError for tests that are not valid Python (the caller's bug, not the program's)."""
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    checks, expected = split_tests(tests)
    namespaces = namespaces_available()
    result_r, result_w = os.pipe()
    report_r, report_w = os.pipe()
    uid = SANDBOX_UID_BASE + ((os.getpid() & 0xFFFFF) << 10 | (next(_run_counter) & 0x3FF))
    job = dict(program=program, checks=checks, uid=uid, timeout_s=timeout_s, result_fd=result_w,
               report_fd=report_w, namespaces=namespaces, **dataclasses.asdict(limits))
    command = (NAMESPACE_COMMAND if namespaces else ()) + (sys.executable, "-I", "-S", "-B", SUPERVISOR)
    start = time.monotonic()
    try:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   pass_fds=(result_w, report_w), start_new_session=True,
                                   env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except OSError as e:
        os.close(result_r)
        os.close(report_r)
        return _sandbox_error(f"could not start the supervisor: {e}", "", namespaces, len(expected))
    finally:
        os.close(result_w)
        os.close(report_w)
    try:
        process.stdin.write(marshal.dumps(job))
        process.stdin.close()
    except OSError:
        pass
    streams = _drain({process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr", result_r: "results",
                      report_r: "report"}, start + timeout_s + WATCHDOG_GRACE_S, limits.output_bytes)
    if streams is None:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for fd in (result_r, report_r):
        os.close(fd)
    process.stdout.close()
    process.stderr.close()
    if streams is None:
        return _sandbox_error("watchdog: the supervisor did not finish in time", "", namespaces, len(expected))
    return _verdict(streams, expected, namespaces)


def split_tests(tests: str) -> tuple[list[tuple[str, str]], dict[int, object]]:
    """tests source -> (checks, expected): checks[i] = ("setup", statement) or ("value", expression) in order;
    expected[i] = the literal an `assert <expr> == <literal>` (either side) compares with, or TRUTHY for any other
    assert (its whole test expression is sent)."""
    try:
        tree = ast.parse(tests)
    except SyntaxError as e:
        raise ValueError(f"tests are not valid Python: {e}") from e
    checks, expected = [], {}
    for statement in tree.body:
        if not isinstance(statement, ast.Assert):
            checks.append(("setup", ast.unparse(statement)))
            continue
        expression, value = statement.test, TRUTHY
        if (isinstance(expression, ast.Compare) and len(expression.ops) == 1
                and isinstance(expression.ops[0], ast.Eq)):
            for literal, other in ((expression.comparators[0], expression.left),
                                   (expression.left, expression.comparators[0])):
                try:
                    expression, value = other, ast.literal_eval(literal)
                    break
                except ValueError:
                    continue
        expected[len(checks)] = value
        checks.append(("value", ast.unparse(expression)))
    if not expected:
        raise ValueError("tests contain no assert statement")
    return checks, expected


@functools.cache
def namespaces_available() -> bool:
    """Whether `unshare --mount --net --pid --fork --mount-proc` works here (needs root or user namespaces)."""
    try:
        return subprocess.run(NAMESPACE_COMMAND + ("true",), capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _drain(fds: dict[int, str], deadline: float, cap: int) -> dict[str, str] | None:
    """Read every fd to EOF (keeping the first `cap` bytes of stdout/stderr, RESULT_BYTES of the others); None if
    the deadline passes first."""
    kept = {name: bytearray() for name in fds.values()}
    with selectors.DefaultSelector() as selector:
        for fd in fds:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                name = fds[key.fd]
                limit = cap if name in ("stdout", "stderr") else RESULT_BYTES
                kept[name] += chunk[:max(0, limit - len(kept[name]))]
    return {name: data.decode("utf-8", "replace") for name, data in kept.items()}


def _verdict(streams: dict[str, str], expected: dict[int, object], namespaces: bool) -> SandboxResult:
    total = len(expected)
    report = _plain(streams["report"])
    if not isinstance(report, dict):
        return _sandbox_error("the supervisor did not report", streams["stderr"], namespaces, total)
    records = [record for record in map(_plain, streams["results"].splitlines())
               if isinstance(record, dict) and record.get("pid") == report["child_pid"]]
    if not records or records[0].get("start") is not True:
        return _sandbox_error("the program's process failed before the program started", streams["stderr"],
                              namespaces, total)
    program = next((r for r in records if "program" in r), None)
    outcomes = {}
    for record in records:
        if isinstance(record.get("check"), int) and record["check"] not in outcomes:
            outcomes[record["check"]] = record
    passed = sum(_check_passed(outcomes.get(index), value) for index, value in expected.items())
    result = functools.partial(SandboxResult, stdout=streams["stdout"], stderr=streams["stderr"],
                               wall_s=report["wall_s"], tests_passed=passed, tests_total=total,
                               namespaces=namespaces)
    if report["timed_out"] or report["signal"] == signal.SIGXCPU:
        return result(status="timeout", reason=f"killed after {report['wall_s']:.2f} s", tests_passed=0)
    if (program or {}).get("program") == "memory" or any(r.get("memory") for r in outcomes.values()):
        return result(status="memory", reason="MemoryError", tests_passed=0)
    if program is not None and program["program"] == "runtime_error":
        return result(status="runtime_error", reason=f"the program raised {program.get('error')}")
    if program is not None:
        return result(status="failed", reason=f"the program exited before the tests ran ({program.get('error')})")
    if report["signal"] is not None:
        return result(status="runtime_error", reason=f"killed by signal {report['signal']}", tests_passed=0)
    errors = [r["error"] for r in outcomes.values() if "error" in r]
    if errors:
        return result(status="runtime_error", reason=f"a test raised {errors[0]}")
    if passed < total:
        missing = total - sum(index in outcomes for index in expected)
        reason = f"{total - passed} of {total} tests failed" + (f" ({missing} did not run)" if missing else "")
        return result(status="failed", reason=reason)
    return result(status="passed", reason=f"{total} tests passed")


def _plain(text: str):
    """ast.literal_eval of text the program may have written, or None where it is not a literal."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _check_passed(record: dict | None, expected: object) -> bool:
    if record is None or not isinstance(record.get("value"), str):
        return False
    value = _plain(record["value"])
    return bool(value) if expected is TRUTHY else value == expected     # plain data: == is Python's own


def _sandbox_error(reason: str, stderr: str, namespaces: bool, total: int) -> SandboxResult:
    return SandboxResult(status="sandbox_error", stdout="", stderr=stderr, wall_s=0.0, tests_passed=0,
                         tests_total=total, reason=reason, namespaces=namespaces)


class SandboxPool:
    """run_python on `workers` long-lived worker processes apart from the caller: each is this file run as a
    script (`python -I -S sandbox.py`, standard library only, so it imports neither JAX nor kimi_jax), taking one
    job at a time as a JSON line on stdin; each job still gets a fresh sandboxed process. A worker that dies is
    replaced, and its job is a sandbox error.

        with SandboxPool(workers=4) as pool:
            results = pool.map(programs, tests, timeout_s=5.0)
    """

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._idle = queue.Queue()
        for _ in range(workers):
            self._idle.put(_start_worker())
        self._threads = concurrent.futures.ThreadPoolExecutor(workers)

    def map(self, programs: Sequence[str], tests: Sequence[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
            limits: Limits = Limits()) -> list[SandboxResult]:
        if len(programs) != len(tests):
            raise ValueError(f"{len(programs)} programs but {len(tests)} tests")
        for test in tests:
            split_tests(test)
        job = dict(timeout_s=timeout_s, limits=dataclasses.asdict(limits))
        return list(self._threads.map(lambda p, t: self._run(dict(job, program=p, tests=t)), programs, tests))

    def _run(self, job: dict) -> SandboxResult:
        worker = self._idle.get()
        try:
            worker.stdin.write(json.dumps(job).encode() + b"\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
        except OSError:
            line = b""
        if not line:
            worker.kill()
            worker.wait()
            worker = _start_worker()
        self._idle.put(worker)
        if not line:
            return _sandbox_error("the sandbox worker died", "", namespaces_available(), 0)
        return SandboxResult(**json.loads(line))

    def close(self):
        self._threads.shutdown()
        while not self._idle.empty():
            worker = self._idle.get()
            worker.stdin.close()
            worker.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _start_worker() -> subprocess.Popen:
    return subprocess.Popen((sys.executable, "-I", "-S", "-B", os.path.abspath(__file__)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})


def _serve():
    """The worker loop of SandboxPool: one job per stdin line, one SandboxResult per stdout line."""
    for line in sys.stdin:
        job = json.loads(line)
        result = run_python(job["program"], job["tests"], timeout_s=job["timeout_s"], limits=Limits(**job["limits"]))
        sys.stdout.write(json.dumps(dataclasses.asdict(result)) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()

"""The root side of one sandboxed run; started by kimi_jax.rl.sandbox as `python -I -S -B sandbox_supervisor.py`,
possibly inside fresh mount, network and PID namespaces, with the job as one marshal'ed dict on stdin. Standard
library only, and few modules (start-up time is most of a run's cost): it is run as a script and never imports
kimi_jax. Records and the report are repr'ed dicts of plain values, one per line, for ast.literal_eval.

It prepares the scratch space, forks the program's process (which drops to an unprivileged uid of its own under
rlimits, runs the program, then evaluates each test expression and writes one record per expression to
`result_fd`), waits at most `timeout_s` for it, kills every process of that uid, and writes the trusted report
(the child's pid, exit code or signal, whether it timed out, wall time) to `report_fd`, which the child closes
before any program code runs.
"""

import ctypes
import marshal
import math
import os
import resource
import select
import signal
import sys
import time

# Without a mount namespace, imported before the fork, so that programs find them also where the interpreter's
# files are not readable by the unprivileged uid (in a namespace _expose_interpreter makes the whole standard
# library readable, and programs import what they use, in their own time).
PRELOADED = ("array", "bisect", "collections", "copy", "dataclasses", "decimal", "enum", "fractions", "functools",
             "heapq", "itertools", "math", "operator", "random", "re", "statistics", "string", "threading", "typing")

SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")    # world-writable; one size-capped tmpfs in a namespace
MS_NOSUID, MS_NODEV, MS_BIND, MNT_DETACH = 2, 4, 4096, 2
PR_SET_NO_NEW_PRIVS = 38
MAX_VALUE_CHARS = 1 << 20
PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes)


def main():
    job = marshal.loads(sys.stdin.buffer.read())
    report = os.fdopen(job["report_fd"], "w")
    if not job["namespaces"]:
        for name in PRELOADED:
            __import__(name)
    workdir = _scratch(job)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, workdir)
    os.close(job["result_fd"])
    pidfd = os.pidfd_open(pid)
    exited, _, _ = select.select([pidfd], [], [], job["timeout_s"])
    if not exited:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    wall_s = time.monotonic() - start
    _kill_uid(job["uid"])
    if not job["namespaces"]:
        import shutil       # here only: imports cost most of a run's time
        shutil.rmtree(workdir, ignore_errors=True)
    report.write(repr({"child_pid": pid, "timed_out": not exited, "wall_s": wall_s,
                       "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                       "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}))
    report.close()


def _scratch(job) -> str:
    """A working directory owned by the sandbox uid. In a fresh mount namespace every world-writable directory
    becomes one tmpfs of job["disk_mb"] MiB (the host's stay untouched and invisible); otherwise a temp dir."""
    if job["namespaces"]:
        libc = ctypes.CDLL(None, use_errno=True)
        _mount(libc, b"tmpfs", SCRATCH_DIRS[0], b"tmpfs", MS_NOSUID | MS_NODEV, f"size={job['disk_mb']}m,mode=1777")
        for path in SCRATCH_DIRS[1:]:
            if os.path.isdir(path):
                _mount(libc, SCRATCH_DIRS[0].encode(), path, None, MS_BIND, None)
        _expose_interpreter(libc)
        workdir = os.path.join(SCRATCH_DIRS[0], "work")
        os.mkdir(workdir, 0o700)
    else:
        import tempfile     # here only: imports cost most of a run's time
        workdir = tempfile.mkdtemp(prefix="sandbox-")
    os.chown(workdir, job["uid"], job["uid"])
    return workdir


def _expose_interpreter(libc):
    """In the mount namespace, where a directory above the interpreter's prefix is closed to other users (e.g.
    pyenv under /root, mode 0700): cover that directory with an empty tmpfs and bind the prefix back at its own
    path, so the program can import the standard library and sees nothing else of that directory."""
    prefix = os.path.realpath(sys.base_prefix)
    parts = prefix.split(os.sep)[1:]
    ancestors = [os.sep + os.path.join(*parts[:n]) for n in range(1, len(parts))]
    closed = next((path for path in ancestors if not os.stat(path).st_mode & 0o001), None)
    if closed is None:
        return
    staging = os.path.join(SCRATCH_DIRS[0], "prefix")
    os.mkdir(staging)
    _mount(libc, prefix.encode(), staging, None, MS_BIND, None)
    _mount(libc, b"tmpfs", closed, b"tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    os.makedirs(prefix)
    _mount(libc, staging.encode(), prefix, None, MS_BIND, None)
    if libc.umount2(staging.encode(), MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), f"umount {staging}")
    os.rmdir(staging)


def _mount(libc, source, target, fstype, flags, options):
    options = options.encode() if options else None
    if libc.mount(source, target.encode(), fstype, flags, options) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype or 'bind'} on {target}")


def _child(job, workdir):
    """Never returns. Set-up errors exit before the "start" record, which the harness reads as a sandbox error."""
    try:
        os.close(job["report_fd"])
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        cpu_s = math.ceil(job["timeout_s"]) + 1
        for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, job["memory_mb"] << 20),
                             (resource.RLIMIT_FSIZE, job["file_mb"] << 20), (resource.RLIMIT_NOFILE, job["open_files"]),
                             (resource.RLIMIT_NPROC, job["max_processes"]), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(limit, (value, value + 1 if limit == resource.RLIMIT_CPU else value))
        os.chdir(workdir)
        if ctypes.CDLL(None).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
        os.environ.clear()
        os.environ.update(HOME=workdir, PATH="/usr/bin:/bin", LANG="C.UTF-8")
        results = os.fdopen(job["result_fd"], "w", buffering=1)
    except BaseException as e:
        sys.stderr.write(f"sandbox set-up failed: {_describe(e)}\n")
        sys.stderr.flush()
        os._exit(70)
    _emit(results, start=True)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(job["program"], "<program>", "exec"), namespace)
    except MemoryError:
        _finish(results, program="memory", error="MemoryError")
    except SystemExit as e:
        _finish(results, program="exited", error=f"SystemExit({e.code!r})")
    except BaseException as e:
        _finish(results, program="runtime_error", error=_describe(e))
    for index, (kind, source) in enumerate(job["checks"]):
        try:
            if kind == "setup":
                exec(compile(source, "<tests>", "exec"), namespace)
            else:
                _emit(results, check=index, value=_literal(eval(compile(source, "<tests>", "eval"), namespace)))
        except MemoryError:
            _emit(results, check=index, error="MemoryError", memory=True)
        except BaseException as e:
            _emit(results, check=index, error=_describe(e))
    _finish(results)


def _emit(results, **record):
    try:
        results.write(repr(dict(record, pid=os.getpid())) + "\n")
    except (OSError, ValueError, MemoryError):
        pass


def _finish(results, **record):
    if record:
        _emit(results, **record)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def _literal(value) -> str:
    """repr of plain data (exact builtin types only: a subclass could fake its repr), for ast.literal_eval."""
    _check_plain(value)
    text = repr(value)
    if len(text) > MAX_VALUE_CHARS:
        raise ValueError(f"the value's repr has {len(text)} characters (at most {MAX_VALUE_CHARS})")
    return text


def _check_plain(value):
    if type(value) in PLAIN_TYPES:
        return
    if type(value) in (list, tuple, set):
        for item in value:
            _check_plain(item)
        return
    if type(value) is dict:
        for key, item in value.items():
            _check_plain(key)
            _check_plain(item)
        return
    raise TypeError(f"a test expression returned a {type(value).__name__}, not plain data")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _kill_uid(uid: int):
    """SIGKILL every process of the sandbox uid (descendants that left the process group included)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()

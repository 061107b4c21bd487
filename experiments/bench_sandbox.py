"""Throughput of the code sandbox (kimi_jax.rl.sandbox): programs per second per core.

    python experiments/bench_sandbox.py [--seconds 10] [--workers <cpu count>]

Each program is a correct reference solution of a python_functions task (difficulty 3) with its 5 unit tests,
so every run goes the whole way: spawn, namespaces, fork, rlimits, uid drop, program, tests, verdict.
  - sequential: run_python one after another in this process for --seconds; programs/s and the CPU seconds the
    sandbox processes used per program (RUSAGE_CHILDREN), whose inverse is programs per CPU-second;
  - pool: SandboxPool(--workers) on batches for --seconds; programs/s and programs/s per core (/ os.cpu_count()).
Anchor (POSTTRAINING.md section 3): k1.5's crun sandbox starts 120 containers/s on 16 cores = 7.5 per core (Docker:
27, 1.7 per core). The last printed line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kimi_jax.rl import sandbox  # noqa: E402
from kimi_jax.rl.tasks import generate, python_functions  # noqa: E402

K15_CONTAINERS_PER_S, K15_CORES = 120, 16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    problems = generate(python_functions, 0, 64, difficulty=3)
    jobs = [(p.answer, p.spec["tests"]) for p in problems]
    cores = os.cpu_count()

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, done = time.monotonic(), 0
    while time.monotonic() - start < args.seconds:
        program, tests = jobs[done % len(jobs)]
        result = sandbox.run_python(program, tests)
        if result.status != "passed":
            raise RuntimeError(f"a reference solution did not pass: {result}")
        done += 1
    sequential_s = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_per_program = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / done
    print(f"sequential: {done} programs in {sequential_s:.1f} s = {done / sequential_s:.1f} programs/s; "
          f"{cpu_per_program * 1e3:.1f} CPU ms per program = {1 / cpu_per_program:.1f} programs per CPU-second")

    with sandbox.SandboxPool(args.workers) as pool:
        pool.map(*zip(*jobs[:args.workers]))                  # workers started
        start, pooled = time.monotonic(), 0
        while time.monotonic() - start < args.seconds:
            results = pool.map(*zip(*jobs))
            if any(r.status != "passed" for r in results):
                raise RuntimeError(f"a reference solution did not pass: {results}")
            pooled += len(results)
        pool_s = time.monotonic() - start
    pool_rate = pooled / pool_s
    print(f"pool of {args.workers} workers on {cores} cores: {pooled} programs in {pool_s:.1f} s = "
          f"{pool_rate:.1f} programs/s = {pool_rate / cores:.1f} per core "
          f"(k1.5 crun: {K15_CONTAINERS_PER_S / K15_CORES:.1f} containers/s per core)")
    print(json.dumps({"cores": cores, "workers": args.workers, "namespaces": sandbox.namespaces_available(),
                      "sequential_programs_per_s": round(done / sequential_s, 2),
                      "cpu_ms_per_program": round(cpu_per_program * 1e3, 2),
                      "programs_per_cpu_s": round(1 / cpu_per_program, 2),
                      "pool_programs_per_s": round(pool_rate, 2),
                      "pool_programs_per_s_per_core": round(pool_rate / cores, 2),
                      "k15_containers_per_s_per_core": K15_CONTAINERS_PER_S / K15_CORES}))


if __name__ == "__main__":
    main()

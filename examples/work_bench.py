#!/usr/bin/env python3
"""The command-line figures of docs/BENCHMARKS.md: `agentq task bulk` of a file of JSON lines,
and `agentq work` running `true` per task.

    cargo build --release && python3 examples/work_bench.py [--bulk 100000] [--tasks 20000]
        [--workers 4] [--concurrency 16]

Starts target/release/agentq (AGENTQ_BIN=path for another build) on a temporary database
with the rate limit off, then:
  1. writes --bulk tasks as JSON lines and times `agentq task bulk` of the file, end to end
     (reading, chunking into 1,000-task requests, the server's commits, the merged answer);
  2. queues --tasks tasks and starts --workers `agentq work P --concurrency C -- true`, and
     times them until every task is completed; it reports tasks/s, the workers' own CPU per
     task (user + system of the worker processes, children excluded: the fork and exec
     calls the worker makes count, the child's run does not), and for comparison the CPU of
     a plain spawn-and-wait of `true` from Python's subprocess in a loop.
Standard library only.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.environ.get("AGENTQ_BIN", "target/release/agentq")
KEY = "bench-admin-key-for-work"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU of `pid` itself (children excluded), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def call(base, method, path, body=None):
    req = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-API-Key": KEY, "content-type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bulk", type=int, default=100_000)
    ap.add_argument("--tasks", type=int, default=20_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="agentq-work-bench-")
    port = 3000 + os.getpid() % 20000
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [BIN, "serve", "--db", f"{tmp}/q.redb", "--bind", f"127.0.0.1:{port}",
         "--admin-key", KEY, "--rate-limit-per-minute", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    env = dict(os.environ, AGENTQ_URL=base, AGENTQ_KEY=KEY)
    try:
        for _ in range(200):
            try:
                call(base, "GET", "/health")
                break
            except OSError:
                time.sleep(0.05)
        call(base, "POST", "/api/projects", {"name": "bulk", "description": ""})
        call(base, "POST", "/api/projects", {"name": "work", "description": ""})

        lines = f"{tmp}/tasks.jsonl"
        with open(lines, "w") as f:
            for i in range(args.bulk):
                f.write(json.dumps({"instructions": f"task {i}", "variables": {"n": str(i)}}))
                f.write("\n")
        start = time.perf_counter()
        out = subprocess.run([BIN, "task", "bulk", "bulk", lines, "--json"], env=env,
                             capture_output=True, check=True)
        took = time.perf_counter() - start
        created = json.loads(out.stdout)["tasksCreated"]
        assert created == args.bulk, created
        print(f"task bulk: {created} tasks in {took:.2f} s = {created / took:,.0f} tasks/s")

        for start_at in range(0, args.tasks, 1000):
            n = min(1000, args.tasks - start_at)
            call(base, "POST", "/api/projects/work/tasks/bulk",
                 {"tasks": [{"instructions": "t"} for _ in range(n)]})
        workers = [
            subprocess.Popen(
                [BIN, "work", "work", "--agent", f"w{i}", "--concurrency",
                 str(args.concurrency), "--", "true"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for i in range(args.workers)
        ]
        start = time.perf_counter()
        while True:
            stats = call(base, "GET", "/api/projects/work")["data"]["stats"]
            if stats["completedTasks"] + stats["failedTasks"] >= args.tasks:
                break
            time.sleep(0.05)
        took = time.perf_counter() - start
        cpu = sum(cpu_seconds(w.pid) for w in workers)
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
        print(f"work: {args.workers} workers x {args.concurrency}: {args.tasks} tasks of `true` "
              f"in {took:.2f} s = {args.tasks / took:,.0f} tasks/s "
              f"({stats['failedTasks']} failed)")
        print(f"work: worker CPU {cpu * 1000 / args.tasks:.3f} ms per task "
              "(its own, fork and exec calls included)")

        n = 2000
        me = cpu_seconds(os.getpid())
        start = time.perf_counter()
        for _ in range(n):
            subprocess.run(["true"])
        spawn_wall = (time.perf_counter() - start) / n
        spawn_cpu = (cpu_seconds(os.getpid()) - me) / n
        print(f"baseline: Python subprocess.run(['true']): {spawn_wall * 1000:.3f} ms wall, "
              f"{spawn_cpu * 1000:.3f} ms parent CPU per spawn")
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

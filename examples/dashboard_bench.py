#!/usr/bin/env python3
"""The dashboard's figures of docs/BENCHMARKS.md: what each page's requests cost the server on
a project of a million tasks, and what ten open dashboards cost it in CPU.

    cargo build --release && python3 examples/dashboard_bench.py [--tasks 1000000]
        [--samples 200] [--watch 60]

Starts target/release/agentq (AGENTQ_BIN=path for another build) on a temporary database
with the rate limit off, then:
  1. queues --tasks tasks in one project (bulk, 1,000 a request), and has agents complete
     5,000 and fail 1,000 of them, so every status has tasks;
  2. times each request a page makes in its default view, --samples times over one kept-alive
     connection, and prints p50 / p99 / max in ms (loopback: the client's own share is a few
     hundredths of a ms), and the same for the views no index serves (a priority filter, a sort
     by update time), which the page labels "Counting…";
  3. opens --watch seconds of ten dashboards on the project page, each as the page polls:
     the stats every 2 s, and the task page again when they moved (here: always, as agents
     complete a task a second, the worst case for the page), then reports the server's CPU
     (user + system from /proc) as a share of one core, with and without the dashboards
     (the agents' own calls cost the same in both).
Standard library only.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.environ.get("AGENTQ_BIN", "target/release/agentq")
KEY = "bench-admin-key-for-dashboard"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Conn:
    """One kept-alive connection, as a browser holds one."""

    def __init__(self, port, token=None):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers = {"Content-Type": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        else:
            self.headers["X-API-Key"] = KEY

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body)
        self.c.request(method, "/" + path, body=data, headers=self.headers)
        r = self.c.getresponse()
        out = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {out[:300]}")
        return json.loads(out)


def timed(conn, path, samples):
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        conn.call("GET", path)
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))], times[-1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--watch", type=int, default=60)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    server = subprocess.Popen(
        [BIN, "serve", "--db", os.path.join(tmp, "d.redb"), "--bind", f"127.0.0.1:{port}",
         "--admin-key", KEY, "--rate-limit-per-minute", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                Conn(port).call("GET", "health")
                break
            except Exception:
                time.sleep(0.1)
        run(a, port, server.pid)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def run(a, port, pid):
    c = Conn(port)
    p = c.call("POST", "api/projects", {"name": "big", "description": "dashboard bench"})["data"]["id"]
    c.call("POST", f"api/projects/{p}/task-types", {"name": "t", "template": "do {{n}}", "variables": ["n"]})
    started = time.time()
    for chunk in range(0, a.tasks, 1000):
        tasks = [{"typeId": "t", "variables": {"n": str(chunk + i)}, "priority": (chunk + i) % 5}
                 for i in range(min(1000, a.tasks - chunk))]
        c.call("POST", f"api/projects/{p}/tasks/bulk", {"tasks": tasks})
    print(f"queued {a.tasks:,} tasks in {time.time() - started:.0f} s", flush=True)
    for i in range(6000):
        t = c.call("POST", "api/agents/bench-agent/next-task", {"projectId": p})["data"]["task"]
        body = {"agentName": "bench-agent", "leaseToken": t["leaseToken"]}
        if i < 5000:
            c.call("POST", f"api/tasks/{t['id']}/complete", {**body, "result": "ok"})
        else:
            c.call("POST", f"api/tasks/{t['id']}/fail", {**body, "error": "no", "canRetry": False})
    held = c.call("POST", "api/agents/holder/next-task", {"projectId": p})["data"]["task"]
    token = c.call("POST", "api/auth/login", {})["data"]["token"]
    page = Conn(port, token)
    first = page.call("GET", f"api/projects/{p}/tasks?limit=50")
    cursor = first["pagination"]["nextCursor"]
    done = page.call("GET", f"api/projects/{p}/tasks?status=completed&limit=1")["data"][0]["id"]
    views = [
        ("overview", "api/stats?status=active&limit=100"),
        ("project: project", f"api/projects/{p}"),
        ("project: task types", f"api/projects/{p}/task-types?limit=100"),
        ("project: stats (the live poll)", f"api/projects/{p}/stats"),
        ("project: tasks, first page", f"api/projects/{p}/tasks?limit=50"),
        ("project: tasks, next page", f"api/projects/{p}/tasks?limit=50&cursor={cursor}"),
        ("project: tasks, status=failed", f"api/projects/{p}/tasks?status=failed&limit=50"),
        ("task: task", f"api/tasks/{done}"),
        ("task: attempts", f"api/tasks/{done}/attempts?limit=100"),
        ("task: search by id", f"api/tasks/{held['id']}"),
        ("agents", f"api/projects/{p}/agents?limit=100"),
        ("session", "api/auth/session"),
    ]
    print(f"\n{'request (default views, ' + format(a.tasks, ',') + ' tasks)':<52} {'p50':>8} {'p99':>8} {'max':>8}")
    for name, path in views:
        p50, p99, mx = timed(page, path, a.samples)
        print(f"{name:<52} {p50:8.2f} {p99:8.2f} {mx:8.2f}", flush=True)
    slow = [
        ("tasks, priority=3 (no index: reads every row)", f"api/projects/{p}/tasks?priority=3&limit=50"),
        ("tasks, sort=updatedAt (no index)", f"api/projects/{p}/tasks?sort=updatedAt&limit=50"),
    ]
    print("\nviews no index serves (the page shows 'Counting…'), 5 samples")
    for name, path in slow:
        p50, p99, mx = timed(page, path, 5)
        print(f"{name:<52} {p50:8.1f} {p99:8.1f} {mx:8.1f}", flush=True)

    # Ten dashboards on the project page for --watch seconds, while an agent completes about
    # one task a second (so the counters move at every poll and each poll reloads the page).
    stop = threading.Event()

    def agent():
        ac = Conn(port)
        while not stop.is_set():
            t = ac.call("POST", "api/agents/slow-agent/next-task", {"projectId": p})["data"]["task"]
            ac.call("POST", f"api/tasks/{t['id']}/complete",
                    {"agentName": "slow-agent", "leaseToken": t["leaseToken"], "result": "ok"})
            stop.wait(1.0)

    def dashboard(i):
        d = Conn(port, token)
        last = None
        while not stop.is_set():
            s = d.call("GET", f"api/projects/{p}/stats")["data"]
            fp = json.dumps([s["project"]["stats"], s["recentActivity"]["tasksCompletedLastHour"]])
            if fp != last:
                d.call("GET", f"api/projects/{p}/tasks?limit=50")
                last = fp
            stop.wait(2.0)

    def measure(with_dashboards):
        stop.clear()
        threads = [threading.Thread(target=agent)]
        if with_dashboards:
            threads += [threading.Thread(target=dashboard, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        time.sleep(2)
        c0, w0 = cpu_seconds(pid), time.time()
        time.sleep(a.watch)
        used = (cpu_seconds(pid) - c0) / (time.time() - w0)
        stop.set()
        for t in threads:
            t.join()
        return used

    base = measure(False)
    loaded = measure(True)
    print(f"\nserver CPU over {a.watch} s, one agent completing ~1 task/s: "
          f"{base * 100:.2f}% of a core alone, {loaded * 100:.2f}% with 10 dashboards "
          f"(the dashboards' share: {(loaded - base) * 100:.2f}%)")


if __name__ == "__main__":
    sys.exit(main())

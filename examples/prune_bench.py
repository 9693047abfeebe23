#!/usr/bin/env python3
"""Retention's figures of docs/BENCHMARKS.md: how fast a million finished tasks are deleted, and
what that does to the claims of agents working meanwhile.

    cargo build --release && python3 examples/prune_bench.py [--tasks 1000000] [--agents 8]

Starts target/release/agentq (AGENTQ_BIN=path for another build) on a temporary database,
queues --tasks tasks in one project and cancels them all (the bulk cancel, 10,000 a call), so
that they are finished, then:
  1. has --agents agents loop next-task -> complete on another project for 15 s and records
     next-task's latency (the baseline);
  2. takes an online backup (GET /api/admin/backup) while they work, timing it;
  3. deletes the million finished tasks with `DELETE /api/projects/{id}/tasks` (the same
     chunked path as retention: 1,000 tasks a write), timing it, while the agents keep going,
     and records next-task's latency during it;
  4. prints the delete rate, both p50 / p99, and the file size before and after; then stops
     the server and runs `agentq compact` on the file.
Standard library only.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.environ.get("AGENTQ_BIN", "target/release/agentq")
KEY = "bench-admin-key-for-pruning"


class Conn:
    def __init__(self, port):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body)
        self.c.request(method, "/" + path, body=data,
                       headers={"X-API-Key": KEY, "Content-Type": "application/json"})
        r = self.c.getresponse()
        out = r.read()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {out[:300]}")
        return json.loads(out)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=1_000_000)
    ap.add_argument("--agents", type=int, default=8)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    db = os.path.join(tmp, "p.redb")
    server = subprocess.Popen(
        [BIN, "serve", "--db", db, "--bind", f"127.0.0.1:{port}", "--admin-key", KEY,
         "--rate-limit-per-minute", "0", "--retain-cancelled", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                Conn(port).call("GET", "health")
                break
            except Exception:
                time.sleep(0.1)
        run(a, port, db)
        server.terminate()
        server.wait(30)
        t0 = time.time()
        out = subprocess.run([BIN, "compact", "--db", db], capture_output=True, text=True)
        print(f"agentq compact ({time.time() - t0:.1f} s): {out.stdout.strip()}")
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def run(a, port, db):
    c = Conn(port)
    big = c.call("POST", "api/projects", {"name": "big", "description": "to prune"})["data"]["id"]
    work = c.call("POST", "api/projects", {"name": "work", "description": "agents"})["data"]["id"]
    t0 = time.time()
    for chunk in range(0, a.tasks, 1000):
        n = min(1000, a.tasks - chunk)
        c.call("POST", f"api/projects/{big}/tasks/bulk",
               {"tasks": [{"instructions": f"t{chunk + i}"} for i in range(n)]})
    while True:
        d = c.call("POST", f"api/projects/{big}/tasks/cancel", {"filter": {"status": "queued"}})["data"]
        if not d["more"] and d["changed"] == 0:
            break
    print(f"{a.tasks:,} tasks queued and cancelled in {time.time() - t0:.0f} s; "
          f"file {os.path.getsize(db) / 2**20:.0f} MiB", flush=True)
    c.call("POST", f"api/projects/{work}/tasks/bulk",
           {"tasks": [{"instructions": "w"} for _ in range(1000)]})

    lat, stop, phase = {"base": [], "prune": []}, threading.Event(), ["base"]

    def agent(i):
        ac = Conn(port)
        name = f"agent-{i}"
        while not stop.is_set():
            t = time.perf_counter()
            task = ac.call("POST", f"api/agents/{name}/next-task", {"projectId": work})["data"]["task"]
            lat[phase[0]].append((time.perf_counter() - t) * 1000)
            if task is None:
                ac.call("POST", f"api/projects/{work}/tasks/bulk",
                        {"tasks": [{"instructions": "w"} for _ in range(200)]})
                continue
            ac.call("POST", f"api/tasks/{task['id']}/complete",
                    {"agentName": name, "leaseToken": task["leaseToken"], "result": "ok"})

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(a.agents)]
    for t in threads:
        t.start()
    time.sleep(15)
    # An online backup of the whole file while the agents work.
    phase[0] = "backup"
    lat["backup"] = []
    t0 = time.time()
    bc = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    bc.request("GET", "/api/admin/backup", headers={"X-API-Key": KEY})
    resp = bc.getresponse()
    size = 0
    while True:
        chunk = resp.read(1 << 20)
        if not chunk:
            break
        size += len(chunk)
    backup_s = time.time() - t0
    phase[0] = "prune"
    t0 = time.time()
    deleted = c.call("DELETE", f"api/projects/{big}/tasks?status=cancelled")["data"]["deletedTasks"]
    took = time.time() - t0
    phase[0] = "after"
    lat["after"] = []
    stop.set()
    for t in threads:
        t.join()
    base, during, backing = lat["base"], lat["prune"], lat["backup"]
    print(f"online backup: {size / 2**20:.0f} MiB in {backup_s:.1f} s "
          f"({size / 2**20 / backup_s:.0f} MiB/s), status {resp.status}; next-task meanwhile "
          f"p50 {pct(backing, .5):.2f} ms, p99 {pct(backing, .99):.2f} ms ({len(backing):,} calls)")
    print(f"deleted {deleted:,} tasks in {took:.1f} s: {deleted / took:,.0f} tasks/s")
    print(f"next-task without a prune: p50 {pct(base, .5):.2f} ms, p99 {pct(base, .99):.2f} ms "
          f"({len(base):,} calls)")
    print(f"next-task during the prune: p50 {pct(during, .5):.2f} ms, p99 {pct(during, .99):.2f} ms "
          f"({len(during):,} calls); p99 ratio {pct(during, .99) / pct(base, .99):.2f}")
    print(f"file after: {os.path.getsize(db) / 2**20:.0f} MiB (freed pages are reused, the file "
          f"does not shrink)")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A drill: the release binary's wall clock steps forward an hour while leases run.

    cargo build --release
    apt-get install faketime; pip install requests
    python3 examples/clock_step.py

It starts `target/release/agentq serve` (or $AGENTQ_BIN) under libfaketime, whose wall clock
(CLOCK_REALTIME) follows a file this drill writes, while the monotonic clock stays real
(FAKETIME_DONT_FAKE_MONOTONIC). Two tasks are leased, for 1 and for 10 minutes; then the wall
clock steps forward an hour, as an NTP step or a VM restored from a snapshot does, and the
drill waits 65 real seconds. It checks that the 1-minute lease was reclaimed (its minute has
really passed), that the 10-minute lease still runs (9 real minutes are left, though its
`leaseExpiresAt` is an hour in the server's past), and that `agentq_clock_steps_total` counts
the step. A build before the steady deadlines reclaimed both at the first reaper pass after
the step. Exits 1 on a failed check. It takes about 70 s.
"""
import json, os, subprocess, sys, tempfile, time
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("AGENTQ_BIN", os.path.join(HERE, "..", "target", "release", "agentq"))
LIB = os.environ.get("FAKETIME_LIB", "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
PORT = int(os.environ.get("PORT", "38112"))
KEY = "clockstepadminkey0123456789"
BASE = f"http://127.0.0.1:{PORT}"
H = {"X-API-Key": KEY, "content-type": "application/json"}

if not os.path.exists(LIB):
    sys.exit(f"libfaketime not found at {LIB} (apt-get install faketime, or set FAKETIME_LIB)")
work = tempfile.mkdtemp(prefix="agentq-clock-")
offset_file = os.path.join(work, "offset")
with open(offset_file, "w") as f:
    f.write("+0\n")
env = dict(os.environ, LD_PRELOAD=LIB, FAKETIME_TIMESTAMP_FILE=offset_file,
           FAKETIME_NO_CACHE="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
log = open(os.path.join(work, "server.log"), "w")
server = subprocess.Popen([BIN, "serve", "--db", os.path.join(work, "db.redb"),
                           "--bind", f"127.0.0.1:{PORT}", "--admin-key", KEY],
                          env=env, stdout=subprocess.DEVNULL, stderr=log)


def call(method, path, body=None):
    r = requests.request(method, BASE + path, headers=H,
                         data=None if body is None else json.dumps(body), timeout=10)
    r.raise_for_status()
    return r.json().get("data") if "json" in r.headers.get("content-type", "") else r.text


try:
    for _ in range(100):
        try:
            requests.get(BASE + "/health", timeout=1)
            break
        except requests.RequestException:
            time.sleep(0.1)
    call("POST", "/api/projects", {"name": "p", "description": "clock step drill"})
    tasks = {}
    for minutes in (1, 10):
        ty = call("POST", "/api/projects/p/task-types",
                  {"name": f"t{minutes}", "leaseDurationMinutes": minutes})["id"]
        tasks[minutes] = call("POST", "/api/projects/p/tasks",
                              {"typeId": ty, "instructions": f"{minutes} min"})["id"]
        held = call("POST", f"/api/agents/a{minutes}/next-task", {"projectId": "p"})["task"]
        assert held["id"] == tasks[minutes], held
    with open(offset_file, "w") as f:
        f.write("+1h\n")
    print("wall clock stepped forward an hour; waiting 65 s")
    time.sleep(65)
    status = {m: call("GET", f"/api/tasks/{t}")["status"] for m, t in tasks.items()}
    steps = [line for line in call("GET", "/metrics").splitlines()
             if line.startswith("agentq_clock_steps_total ")]
    problems = []
    if status[1] != "queued":
        problems.append(f"the 1-minute lease was not reclaimed: {status[1]}")
    if status[10] != "running":
        problems.append(f"the 10-minute lease was reclaimed 9 minutes early: {status[10]}")
    if steps != ["agentq_clock_steps_total 1"]:
        problems.append(f"the step was not counted once: {steps}")
    print(f"1-minute lease: {status[1]}; 10-minute lease: {status[10]}; {steps}")
    for p in problems:
        print("PROBLEM:", p)
    print(f"problems: {len(problems)} server log: {log.name}")
    sys.exit(1 if problems else 0)
finally:
    server.terminate()
    server.wait()

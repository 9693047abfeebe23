#!/usr/bin/env python3
"""A soak of the lease protocol under SIGKILL: mixed concurrent operations, kills, checks.

    cargo build --release
    pip install requests
    DURATION=60 KILLS=4 python3 examples/chaos.py

It starts `target/release/agentq serve` (or $AGENTQ_BIN) on a fresh database ($DB, default in
a temporary directory) and runs, for $DURATION seconds, per project (two projects): a producer
creating tasks one at a time and in bulk (typed and untyped, random priorities, some with
`notBefore`), six agents (half of them under sessions of a key limited to the project;
next-task, sometimes long-polling or by `typeIds`; then progress, extend-lease, and complete,
fail or abandon the lease, which expires after 6 s), a revoker (makes a key, takes a task
with it and with a session of it, revokes the key, and expects 401 for the late completes),
and a meddler
that cancels, retries, deletes and re-prioritises tasks, cleans up leases, closes and reopens
the project, edits task types, and makes, half works and deletes whole projects. $KILLS times
it SIGKILLs the server and starts it again. Then, after a clean restart, it checks:

- each project's counters equal its listing by status, read between two equal reads of the
  counters; no task is listed twice; a task is running exactly when it has an agent; the
  agents listed equal the running tasks;
- in a sample of tasks, the attempts follow one another (none starts before the previous one
  ended), and only a running task has an open one;
- every complete that was answered 200 is still `completed` (unless the task was deleted);
- every task handed out shows that hand-out (agent, start) in its attempts;
- only the two projects are left, and no deleted project is in `/metrics`;
- no answer was a 5xx other than 503, and every answer was JSON; no complete under a revoked
  key or its session was taken.

With STEPS=N (and libfaketime: `apt-get install faketime`) the server runs under libfaketime,
and N times, between the kills, its wall clock steps forward (61 s to 30 min; its monotonic
clock stays real, as under an NTP step). A keeper, in a third project nobody else touches,
meanwhile takes tasks with 6 s leases, holds each for 2 s and completes it: a step must never
cost it its lease (a LEASE_LOST is a problem unless the server was restarted meanwhile: a
restart measures leases again from the wall clock). The attempt checks above hold because the
steps only go forward.

It prints each problem and their count, and exits 1 when there is one.
"""
import json, os, random, signal, subprocess, sys, tempfile, threading, time
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("AGENTQ_BIN", os.path.join(HERE, "..", "target", "release", "agentq"))
WORK = tempfile.mkdtemp(prefix="agentq-chaos-")
DB = os.environ.get("DB", os.path.join(WORK, "chaos.redb"))
LOG = os.path.join(WORK, "server.log")
PORT = int(os.environ.get("PORT", "38111"))
KEY = "chaosadminkey0123456789abcdef"
BASE = f"http://127.0.0.1:{PORT}"
H = {"X-API-Key": KEY, "content-type": "application/json"}
DURATION = float(os.environ.get("DURATION", "40"))
KILLS = int(os.environ.get("KILLS", "2"))
STEPS = int(os.environ.get("STEPS", "0"))
FAKETIME_LIB = os.environ.get("FAKETIME_LIB",
                              "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
OFFSET_FILE = os.path.join(WORK, "clock-offset")

server = None
log_lock = threading.Lock()
acked_complete = {}  # task id -> token
deleted = set()
handouts = []  # (task, agent, token, assignedAt)
errors = []
refused_late = [0]  # completes under a revoked key or session, refused with 401
stop = False
up = threading.Event()
starts = [0]  # server starts so far
keeper_stats = {"held": 0, "lost_over_restart": 0}


def start():
    global server
    env = None
    if STEPS:
        # The wall clock (CLOCK_REALTIME) follows OFFSET_FILE, read again at most every second;
        # the monotonic clock stays real.
        env = dict(os.environ, LD_PRELOAD=FAKETIME_LIB, FAKETIME_TIMESTAMP_FILE=OFFSET_FILE,
                   FAKETIME_CACHE_DURATION="1", FAKETIME_DONT_FAKE_MONOTONIC="1")
    starts[0] += 1
    server = subprocess.Popen([BIN, "serve", "--db", DB, "--bind", f"127.0.0.1:{PORT}",
                               "--admin-key", KEY, "--rate-limit-per-minute", "0"],
                              stdout=subprocess.DEVNULL, stderr=open(LOG, "a"), env=env)
    for _ in range(200):
        try:
            if requests.get(BASE + "/health", timeout=1).status_code == 200:
                up.set()
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise SystemExit("server did not start")


def call(s, method, path, body=None, timeout=70, headers=H):
    if not up.wait(30):
        return None
    try:
        r = s.request(method, BASE + path, data=None if body is None else json.dumps(body),
                      headers=headers, timeout=timeout)
    except requests.RequestException:
        return None
    if r.status_code >= 500 and r.status_code != 503:
        errors.append(f"{method} {path} -> {r.status_code} {r.text[:300]}")
    try:
        return r.status_code, r.json()
    except Exception:
        errors.append(f"{method} {path} -> non-JSON {r.status_code} {r.text[:200]}")
        return None


def producer(pid, types):
    s = requests.Session()
    while not stop:
        k = random.random()
        if k < 0.5:
            t = {"instructions": "x", "priority": random.randint(0, 10)}
            if random.random() < 0.5:
                t = {"typeId": random.choice(types), "variables": {"v": "a"},
                     "priority": random.randint(0, 10)}
            if random.random() < 0.1:
                t["notBefore"] = time.strftime("%Y-%m-%dT%H:%M:%S.000Z",
                                               time.gmtime(time.time() + 2))
            call(s, "POST", f"/api/projects/{pid}/tasks", t)
        else:
            ts = [{"instructions": "b", "priority": random.randint(0, 10)}
                  for _ in range(random.randint(1, 20))]
            call(s, "POST", f"/api/projects/{pid}/tasks/bulk", {"tasks": ts})
        time.sleep(random.random() * 0.01)


def bearer(token):
    return {"Authorization": f"Bearer {token}", "content-type": "application/json"}


def login(s, key, name, pid):
    """A session for `name` in `pid` under `key`: its headers, or None."""
    r = call(s, "POST", "/api/auth/login", {"agentName": name, "projectId": pid},
             headers={"X-API-Key": key, "content-type": "application/json"})
    return bearer(r[1]["data"]["token"]) if r and r[0] == 200 else None


def agent(pid, types, n, key):
    s = requests.Session()
    gen, h, h_gen = 0, H, None
    while not stop:
        name = f"a{n}-{gen}"
        if h_gen != gen:
            # Half the agents work under a session of a key limited to their project.
            h, h_gen = (login(s, key, name, pid) or H) if random.random() < 0.5 else H, gen
        body = {"projectId": pid}
        if random.random() < 0.3:
            body["typeIds"] = [random.choice(types)]
        if random.random() < 0.3:
            body["waitSeconds"] = 1
        r = call(s, "POST", f"/api/agents/{name}/next-task", body, headers=h)
        if not r or r[0] != 200 or not r[1]["data"]["task"]:
            time.sleep(0.01)
            continue
        t = r[1]["data"]["task"]
        tid, tok = t["id"], t["leaseToken"]
        with log_lock:
            handouts.append((tid, name, tok, t["assignedAt"]))
        k = random.random()
        if random.random() < 0.2:
            call(s, "POST", f"/api/tasks/{tid}/progress",
                 {"agentName": name, "current": 1, "total": 2, "leaseToken": tok}, headers=h)
        if random.random() < 0.1:
            call(s, "POST", f"/api/tasks/{tid}/extend-lease",
                 {"agentName": name, "extensionMinutes": 0.1, "leaseToken": tok}, headers=h)
        if k < 0.6:
            r = call(s, "POST", f"/api/tasks/{tid}/complete",
                     {"agentName": name, "result": "ok", "leaseToken": tok}, headers=h)
            if r and r[0] == 200:
                with log_lock:
                    if tid in acked_complete:
                        errors.append(f"complete acked twice for {tid}")
                    acked_complete[tid] = tok
        elif k < 0.9:
            call(s, "POST", f"/api/tasks/{tid}/fail",
                 {"agentName": name, "error": "boom", "leaseToken": tok}, headers=h)
        else:
            gen += 1  # abandon: the lease expires (0.1 min)
        if random.random() < 0.05:
            gen += 1


def revoker(pid):
    """Keys made, used and revoked while their agents hold leases: after the revocation the
    key and its sessions get 401, and the lease they held runs out (the reaper's business)."""
    s = requests.Session()
    n = 0
    while not stop:
        n += 1
        r = call(s, "POST", "/api/keys", {"name": f"k{n}", "role": "agent", "projects": [pid]})
        if not r or r[0] != 201:
            time.sleep(0.1)
            continue
        kid, key = r[1]["data"]["id"], r[1]["data"]["key"]
        kh = {"X-API-Key": key, "content-type": "application/json"}
        sh = login(s, key, f"r{n}", pid)
        held = []
        for name, h in [(f"k{n}", kh), (f"r{n}", sh)]:
            if h is None:
                continue
            r = call(s, "POST", f"/api/agents/{name}/next-task", {"projectId": pid}, headers=h)
            if r and r[0] == 200 and r[1]["data"]["task"]:
                t = r[1]["data"]["task"]
                with log_lock:
                    handouts.append((t["id"], name, t["leaseToken"], t["assignedAt"]))
                held.append((name, h, t))
        time.sleep(random.random() * 0.2)
        r = call(s, "DELETE", f"/api/keys/{kid}")
        if not r or r[0] != 200:
            continue
        for name, h, t in held:
            r = call(s, "POST", f"/api/tasks/{t['id']}/complete",
                     {"agentName": name, "result": "late", "leaseToken": t["leaseToken"]}, headers=h)
            if r and r[0] != 401:
                errors.append(f"complete under a revoked key or its session answered {r[0]}")
            elif r:
                refused_late[0] += 1
        time.sleep(random.random() * 0.5)


def meddler(pid):
    s = requests.Session()
    while not stop:
        r = call(s, "GET", f"/api/projects/{pid}/tasks?limit=50&status="
                 + random.choice(["queued", "running", "failed", "cancelled", "completed"]))
        if not r or r[0] != 200 or not r[1]["data"]:
            time.sleep(0.05)
            continue
        t = random.choice(r[1]["data"])
        k = random.random()
        if k < 0.3:
            call(s, "POST", f"/api/tasks/{t['id']}/cancel", {"reason": "meddler"})
        elif k < 0.6:
            call(s, "POST", f"/api/tasks/{t['id']}/retry")
        elif k < 0.7:
            r = call(s, "DELETE", f"/api/tasks/{t['id']}")
            if r and r[0] == 200:
                with log_lock:
                    deleted.add(t["id"])
        elif k < 0.85:
            call(s, "PUT", f"/api/tasks/{t['id']}", {"priority": random.randint(0, 10)})
        elif k < 0.9:
            call(s, "POST", f"/api/projects/{pid}/cleanup-leases")
        elif k < 0.93:
            call(s, "PUT", f"/api/projects/{pid}", {"status": "closed"})
            time.sleep(0.05)
            call(s, "PUT", f"/api/projects/{pid}", {"status": "active"})
        elif k < 0.96:
            tys = call(s, "GET", f"/api/projects/{pid}/task-types")
            if tys and tys[0] == 200 and tys[1]["data"]:
                ty = random.choice(tys[1]["data"])
                call(s, "PUT", f"/api/task-types/{ty['id']}",
                     {"leaseDurationMinutes": random.choice([0.1, 0.2]), "maxRetries": random.randint(0, 4)})
        else:
            # a doomed project: filled, worked a little, deleted
            r = call(s, "POST", "/api/projects", {"name": f"doomed{random.randint(0, 10**9)}", "description": "d"})
            if r and r[0] == 201:
                d = r[1]["data"]["id"]
                call(s, "POST", f"/api/projects/{d}/tasks/bulk", {"tasks": [{"instructions": "z"}] * 200})
                call(s, "POST", "/api/agents/dz/next-task", {"projectId": d})
                call(s, "DELETE", f"/api/projects/{d}")
        time.sleep(random.random() * 0.02)


def keeper(pid, ty):
    """Takes tasks with 6 s leases, holds each for 2 s, completes it: steps of the wall clock
    in between must not cost it the lease."""
    s = requests.Session()
    n = 0
    while not stop:
        n += 1
        r = call(s, "POST", f"/api/projects/{pid}/tasks", {"typeId": ty, "instructions": f"k{n}"})
        if not r or r[0] != 201:
            time.sleep(0.1)
            continue
        before = starts[0]
        r = call(s, "POST", "/api/agents/keeper/next-task", {"projectId": pid})
        if not r or r[0] != 200 or not r[1]["data"]["task"]:
            time.sleep(0.1)
            continue
        t = r[1]["data"]["task"]
        time.sleep(2)
        r = call(s, "POST", f"/api/tasks/{t['id']}/complete",
                 {"agentName": "keeper", "result": "ok", "leaseToken": t["leaseToken"]})
        if r and r[0] == 200:
            keeper_stats["held"] += 1
        elif r and r[1].get("code") == "LEASE_LOST":
            if starts[0] != before:
                keeper_stats["lost_over_restart"] += 1
            else:
                errors.append(f"keeper lost the lease of {t['id']} after 2 s of its 6 "
                              f"without a restart: {r[1].get('error')}")


def walk(s, pid, status):
    out, cursor = [], None
    while True:
        q = f"/api/projects/{pid}/tasks?limit=1000&status={status}"
        if cursor:
            q += f"&cursor={cursor}"
        r = call(s, "GET", q)
        assert r and r[0] == 200, r
        out += r[1]["data"]
        cursor = r[1]["pagination"]["nextCursor"]
        if not cursor:
            return out


def check(pids):
    s = requests.Session()
    problems = []
    for pid in pids:
        for _ in range(20):
            stats = call(s, "GET", f"/api/projects/{pid}/stats")[1]["data"]["project"]["stats"]
            counts, by_id, listed = {}, {}, []
            for status in ["queued", "running", "completed", "failed", "cancelled"]:
                ts = walk(s, pid, status)
                counts[status] = len(ts)
                listed.append(ts)
            ag = []
            while True:
                r = call(s, "GET", f"/api/projects/{pid}/agents?limit=1000&offset={len(ag)}")[1]
                ag += r["data"]
                if not r["data"]:
                    break
            after = call(s, "GET", f"/api/projects/{pid}/stats")[1]["data"]["project"]["stats"]
            if after == stats:
                break
            time.sleep(0.5)
        else:
            problems.append(f"{pid}: never stable")
        for ts in listed:
            for t in ts:
                if t["id"] in by_id:
                    problems.append(f"task {t['id']} listed twice")
                by_id[t["id"]] = t
                if (t["status"] == "running") != (t["assignedTo"] is not None):
                    problems.append(f"task {t['id']} {t['status']} assignedTo {t['assignedTo']}")
        for status, n in counts.items():
            if stats[f"{status}Tasks"] != n:
                problems.append(f"{pid}: stats {status}Tasks={stats[status + 'Tasks']} listing={n}")
        if stats["totalTasks"] != sum(counts.values()):
            problems.append(f"{pid}: totalTasks {stats['totalTasks']} != {sum(counts.values())}")
        if len(ag) != counts["running"]:
            problems.append(f"{pid}: agents {len(ag)} running {counts['running']}")
        # attempts: in order, no overlap, one open only when running
        sample = random.sample(list(by_id), min(400, len(by_id)))
        for tid in sample:
            t = call(s, "GET", f"/api/tasks/{tid}")[1]["data"]
            at = t["attempts"]
            open_ = [a for a in at if a["endedAt"] is None]
            if len(open_) > 1 or (open_ and t["status"] != "running") or (t["status"] == "running" and not open_):
                problems.append(f"task {tid} {t['status']} attempts {at}")
            for a, b in zip(at, at[1:]):
                if a["endedAt"] is None or b["startedAt"] < a["endedAt"]:
                    problems.append(f"task {tid} overlapping attempts {a} {b}")
    for _ in range(50):
        r = call(s, "GET", "/api/projects?status=all")
        if r[1]["pagination"]["total"] == len(pids):
            break
        time.sleep(0.2)
    else:
        problems.append(f"projects left: {[p['name'] for p in r[1]['data']]}")
    m = requests.get(BASE + "/metrics").text
    if "doomed" in m:
        problems.append("doomed project in /metrics")
    # acknowledged completes survive (unless deleted)
    for tid in list(acked_complete):
        if tid in deleted:
            continue
        r = call(s, "GET", f"/api/tasks/{tid}")
        if not r or r[0] != 200 or r[1]["data"]["status"] != "completed":
            problems.append(f"acked complete {tid} now {r and (r[0], r[1].get('data', {}).get('status'))}")
    # every handout is an attempt
    per_task = {}
    for tid, name, tok, at in handouts:
        per_task.setdefault(tid, set()).add((name, at))
    for tid in random.sample(list(per_task), min(500, len(per_task))):
        if tid in deleted:
            continue
        r = call(s, "GET", f"/api/tasks/{tid}/attempts")
        if not r or r[0] != 200:
            continue
        seen = {(a["agentName"], a["startedAt"]) for a in r[1]["data"]}
        missing = per_task[tid] - seen
        if missing:
            problems.append(f"task {tid}: handouts without an attempt {missing} (attempts {seen})")
    return problems


def main():
    global stop
    if os.path.exists(DB):
        os.remove(DB)
    if STEPS and not os.path.exists(FAKETIME_LIB):
        raise SystemExit(f"STEPS needs libfaketime at {FAKETIME_LIB} (apt-get install faketime)")
    offset = 0
    with open(OFFSET_FILE, "w") as f:
        f.write("+0\n")
    start()
    s = requests.Session()
    pids, types = [], {}
    for i in range(2):
        p = call(s, "POST", "/api/projects", {"name": f"chaos{i}", "description": "c",
                                                "config": {"defaultMaxRetries": 2,
                                                           "defaultLeaseDurationMinutes": 1}})[1]["data"]
        pids.append(p["id"])
        ty = []
        for j in range(2):
            r = call(s, "POST", f"/api/projects/{p['id']}/task-types",
                     {"name": f"t{j}", "template": "do {{v}}", "variables": ["v"],
                      "leaseDurationMinutes": 0.1, "maxRetries": 3,
                      "retryDelaySeconds": 1, "backoffMultiplier": 1.5})
            ty.append(r[1]["data"]["id"])
        types[p["id"]] = ty
    threads = []
    for pid in pids:
        threads.append(threading.Thread(target=producer, args=(pid, types[pid])))
        threads.append(threading.Thread(target=meddler, args=(pid,)))
        threads.append(threading.Thread(target=revoker, args=(pid,)))
        key = call(s, "POST", "/api/keys", {"name": f"fleet-{pid}", "role": "agent",
                                             "projects": [pid]})[1]["data"]["key"]
        for n in range(6):
            threads.append(threading.Thread(target=agent,
                                            args=(pid, types[pid], len(threads), key)))
    if STEPS:
        kp = call(s, "POST", "/api/projects", {"name": "keeper", "description": "k"})[1]["data"]
        kty = call(s, "POST", f"/api/projects/{kp['id']}/task-types",
                   {"name": "k", "leaseDurationMinutes": 0.1})[1]["data"]["id"]
        threads.append(threading.Thread(target=keeper, args=(kp["id"], kty)))
        pids.append(kp["id"])
    for t in threads:
        t.start()
    t0 = time.time()
    kills = steps = 0
    events = KILLS + STEPS
    while time.time() - t0 < DURATION:
        time.sleep(DURATION / (events + 1))
        if steps < STEPS and (steps <= kills or kills >= KILLS):
            steps += 1
            offset += random.choice([61, 300, 1800])
            with open(OFFSET_FILE, "w") as f:
                f.write(f"+{offset}\n")
            print("stepped", steps, "wall clock now", offset, "s ahead", flush=True)
            continue
        if kills < KILLS and time.time() - t0 < DURATION:
            up.clear()
            server.send_signal(signal.SIGKILL)
            server.wait()
            kills += 1
            print("killed", kills, "acked", len(acked_complete), flush=True)
            start()
    stop = True
    for t in threads:
        t.join()
    print("handouts", len(handouts), "acked completes", len(acked_complete), "deleted",
          len(deleted), "refused after revocation", refused_late[0])
    if STEPS:
        print("keeper: leases held to their complete", keeper_stats["held"],
              "lost over a restart", keeper_stats["lost_over_restart"])
    # restart once more cleanly, then check
    server.send_signal(signal.SIGTERM)
    server.wait()
    up.clear()
    start()
    problems = check(pids) + errors
    for p in problems[:40]:
        print("PROBLEM", p)
    print("problems:", len(problems), "server log:", LOG)
    server.send_signal(signal.SIGTERM)
    server.wait()
    sys.exit(1 if problems else 0)


main()

"""A minimal agentq agent in Python, using only `requests`.

    pip install requests
    AGENTQ_KEY=<an agent or admin key> python examples/agent.py [BASE_URL] [PROJECT] [AGENT]
"""
import os
import sys
import time

import requests

base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:3000"
project = sys.argv[2] if len(sys.argv) > 2 else "demo"
agent = sys.argv[3] if len(sys.argv) > 3 else "python-agent"

session = requests.Session()  # keep-alive
session.headers["X-API-Key"] = os.environ["AGENTQ_KEY"]


def post(path, body):
    """POST, waiting and sending again while the server is unreachable, over the rate limit
    (429) or in storage trouble (503). Safe for the calls below: a repeated next-task resumes
    the agent's task, and a repeated complete with the same lease token is answered 200."""
    for attempt in range(10):
        try:
            r = session.post(f"{base}{path}", json=body, timeout=30)
        except requests.ConnectionError:
            time.sleep(min(2**attempt, 30))
            continue
        if r.status_code not in (429, 503):
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))
    sys.exit(f"error: {path} kept failing")


while True:
    # Long-poll: answered as soon as a task appears, or after 20 s with none.
    reply = post(f"/api/agents/{agent}/next-task", {"projectId": project, "waitSeconds": 20}).json()
    task = (reply.get("data") or {}).get("task")
    if task is None:
        if "code" in reply:  # a real error (unknown project, bad agent name, ...)
            sys.exit(f"error: {reply['error']}")
        print("no task yet; asking again")
        continue
    print(f"working on {task['id']}: {task['instructions']}")
    lease = {"agentName": agent, "leaseToken": task["leaseToken"]}
    try:
        words = len(task["instructions"].split())  # the work itself
    except Exception as e:  # the work failed: report it; the server retries with back-off
        r = post(f"/api/tasks/{task['id']}/fail", {**lease, "error": str(e)})
    else:
        r = post(
            f"/api/tasks/{task['id']}/complete",
            {**lease, "result": f"{words} words", "outputs": {"words": words}},
        )
    # 409 LEASE_LOST: the lease ran out (or the task was cancelled) before the report; the
    # task is someone else's now, and this result is not kept.
    print(f"reported {task['id']}: HTTP {r.status_code}")

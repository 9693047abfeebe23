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
while True:
    # Long-poll: answered as soon as a task appears, or after 20 s with none.
    r = session.post(
        f"{base}/api/agents/{agent}/next-task",
        json={"projectId": project, "waitSeconds": 20},
        timeout=30,
    )
    if r.status_code in (429, 503):  # over the rate limit, or storage trouble: wait, ask again
        time.sleep(float(r.headers.get("Retry-After", "1")))
        continue
    reply = r.json()
    task = (reply.get("data") or {}).get("task")
    if task is None:
        if "code" in reply:  # a real error (unknown project, bad agent name, ...)
            sys.exit(f"error: {reply['error']}")
        print("no task yet; asking again")
        continue
    print(f"working on {task['id']}: {task['instructions']}")
    try:
        words = len(task["instructions"].split())  # the work itself
        r = session.post(
            f"{base}/api/tasks/{task['id']}/complete",
            json={
                "agentName": agent,
                "leaseToken": task["leaseToken"],
                "result": f"{words} words",
                "outputs": {"words": words},
            },
            timeout=30,
        )
    except Exception as e:  # report the failure; the server retries with back-off
        r = session.post(
            f"{base}/api/tasks/{task['id']}/fail",
            json={"agentName": agent, "leaseToken": task["leaseToken"], "error": str(e)},
            timeout=30,
        )
    print(f"reported {task['id']}: HTTP {r.status_code}")

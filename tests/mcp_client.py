#!/usr/bin/env python3
"""agentq's MCP tools driven by a real MCP client that nobody here wrote: the official Python
SDK (PyPI `mcp`). Run by .ci/run after it installs the SDK:

    python3 tests/mcp_client.py target/debug/agentq

Starts `agentq serve` on a temporary database, then drives `agentq mcp` over stdio as an LLM
host would: initialize, the tool list (every tool named, each with an input schema), the
prompts, a whole loop (create_project -> create_task_type -> create_tasks_bulk ->
get_next_task -> report_progress -> complete_task -> get_project_stats), a fail that is
retried, a stale lease token (a tool error with LEASE_LOST), a viewer refused on
complete_task, a key scoped to one project blind to another, and a malformed argument (a
tool error naming the field). Exits non-zero on the first failed check.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/debug/agentq")
ADMIN = "mcp-test-admin-key-0123456789"

TOOLS = """create_project list_projects get_project update_project get_project_stats
create_task_type list_task_types get_task_type update_task_type create_task create_tasks_bulk
list_tasks get_task get_next_task peek_next_task complete_task fail_task extend_lease
list_active_agents health_check get_lease_stats cleanup_expired_leases cancel_task retry_task
report_progress list_attempts""".split()


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}")


def rest(base, method, path, body=None, key=ADMIN):
    req = urllib.request.Request(
        base + path, method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"X-API-Key": key, "content-type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def data(result):
    """A tool result's structured content (checked against its text)."""
    check(result.structured_content is not None, "a structured result")
    return result.structured_content


async def session_for(base, key, body, transport):
    """Runs `body` in an MCP session: `agentq mcp` over stdio, or `/mcp` over HTTP."""
    if transport == "stdio":
        params = StdioServerParameters(
            command=BIN, args=["mcp"],
            env={"AGENTQ_URL": base, "AGENTQ_KEY": key, "PATH": os.environ.get("PATH", "")},
        )
        async with stdio_client(params) as (read, write):
            async with ClientSession(read, write) as session:
                await session.initialize()
                await body(session)
        return
    http = create_mcp_http_client(headers={"Authorization": f"Bearer {key}"})
    async with http:
        async with streamable_http_client(f"{base}/mcp", http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                await body(session)


async def admin_checks(session, base, project):
    info = session.server_info if not callable(session.server_info) else session.server_info()
    tools = (await session.list_tools()).tools
    names = {t.name for t in tools}
    missing = [t for t in TOOLS if t not in names]
    check(not missing, f"every TaskDriver tool is listed (missing: {missing})")
    for t in tools:
        check(t.input_schema.get("type") == "object" and t.description,
              f"{t.name} has an input schema and a description")
    nt = next(t for t in tools if t.name == "get_next_task")
    check("waitSeconds" in nt.input_schema["properties"], "get_next_task takes waitSeconds")
    ct = next(t for t in tools if t.name == "create_task").input_schema["properties"]
    check(ct["priority"].get("maximum") == 10 and
          ct["script"]["properties"]["type"].get("enum") == ["bash", "python"],
          "arguments carry the REST API's field rules")
    prompts = {p.name for p in (await session.list_prompts()).prompts}
    check({"work_queue", "plan_tasks", "project_report"} <= prompts, "the prompts are listed")
    p = await session.get_prompt("work_queue", {"projectId": project})
    check("get_next_task" in p.messages[0].content.text, "a prompt names the tools to call")

    r = await session.call_tool("create_project", {"name": project, "description": "d",
                                                    "instructions": "Be brief."})
    check(not r.is_error and data(r)["name"] == project, f"create_project {r.content[0].text[:300]}")
    r = await session.call_tool("create_task_type", {
        "projectId": project, "name": "summarize", "template": "Summarize {{url}}",
        "variables": ["url"], "maxRetries": 1})
    check(not r.is_error, f"create_task_type {r.content[0].text[:200]}")
    r = await session.call_tool("create_tasks_bulk", {"projectId": project, "tasks": [
        {"typeId": "summarize", "variables": {"url": f"u{i}"}, "priority": 9 - i}
        for i in range(3)]})
    check(not r.is_error and data(r)["tasksCreated"] == 3, "create_tasks_bulk")

    r = await session.call_tool("get_next_task", {"projectId": project, "waitSeconds": 1})
    task = data(r)["task"]
    check(task["variables"]["url"] == "u0", "get_next_task hands out the highest priority")
    check(task["leaseToken"] in r.content[0].text and "complete_task" in r.content[0].text,
          "the text tells the model to pass the lease token back")
    agent = data(r)["agentName"]
    check(agent.startswith("mcp-"), "without agentName, the session's own name")
    r = await session.call_tool("report_progress", {
        "taskId": task["id"], "leaseToken": task["leaseToken"], "current": 1, "total": 2,
        "message": "half"})
    check(not r.is_error and data(r)["progress"]["current"] == 1, "report_progress")
    r = await session.call_tool("complete_task", {
        "taskId": task["id"], "leaseToken": task["leaseToken"], "result": "short",
        "outputs": {"words": 1}})
    check(not r.is_error and data(r)["status"] == "completed", "complete_task")
    r = await session.call_tool("get_project_stats", {"projectId": project})
    stats = data(r)
    check(stats["project"]["stats"]["completedTasks"] == 1, "get_project_stats shows it")

    # A fail with a retry, then a stale token.
    r = await session.call_tool("get_next_task", {"projectId": project})
    task = data(r)["task"]
    r = await session.call_tool("fail_task", {
        "taskId": task["id"], "leaseToken": task["leaseToken"], "error": "site down"})
    check(not r.is_error and data(r)["willRetry"] is True, "fail_task is retried")
    r = await session.call_tool("complete_task", {
        "taskId": task["id"], "leaseToken": task["leaseToken"]})
    check(r.is_error and data(r)["code"] == "LEASE_LOST", "a stale lease token: LEASE_LOST")
    r = await session.call_tool("list_attempts", {"taskId": task["id"]})
    check(data(r)["items"][0]["error"] == "site down", "list_attempts")

    # A malformed argument names its field.
    r = await session.call_tool("create_task", {"projectId": project, "priority": "high",
                                                "instructions": "x"})
    check(r.is_error and "priority" in r.content[0].text, "a malformed argument names the field")
    r = await session.call_tool("get_task", {})
    check(r.is_error and "taskId" in r.content[0].text, "a missing argument names the field")
    r = await session.call_tool("get_next_task", {"projectId": "nope"})
    check(r.is_error and data(r)["code"] == "NOT_FOUND", "an unknown project is a tool error")
    r = await session.call_tool("health_check", {})
    check(not r.is_error and data(r)["status"] == "healthy", "health_check")
    r = await session.call_tool("get_task_type", {"projectId": project, "typeId": "summarize"})
    check(not r.is_error and data(r)["name"] == "summarize", "get_task_type by name")


async def main():
    tmp = tempfile.mkdtemp(prefix="agentq-mcp-")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [BIN, "serve", "--db", f"{tmp}/q.redb", "--bind", f"127.0.0.1:{port}",
         "--admin-key", ADMIN, "--rate-limit-per-minute", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                rest(base, "GET", "/health")
                break
            except OSError:
                time.sleep(0.1)
        for transport in ("stdio", "http"):
            print(f"== {transport}")
            project = f"docs-{transport}"
            await session_for(base, ADMIN, lambda s: admin_checks(s, base, project), transport)

            # A viewer may read but not complete; a key scoped to one project sees no other.
            other = f"other-{transport}"
            rest(base, "POST", "/api/projects", {"name": other, "description": ""})
            viewer = rest(base, "POST", "/api/keys", {"name": "v", "role": "viewer"})["data"]["key"]
            scoped = rest(base, "POST", "/api/keys",
                          {"name": "s", "role": "agent", "projects": [project]})["data"]["key"]
            queued = rest(base, "GET", f"/api/projects/{project}/tasks?status=queued")["data"][0]

            async def as_viewer(session):
                r = await session.call_tool("get_project", {"projectId": project})
                check(not r.is_error, "a viewer reads")
                r = await session.call_tool("complete_task", {"taskId": queued["id"]})
                check(r.is_error and data(r)["code"] == "FORBIDDEN", "a viewer may not complete")

            async def as_scoped(session):
                r = await session.call_tool("list_projects", {})
                names = [p["name"] for p in data(r)["items"]]
                check(names == [project], f"a scoped key lists its project only ({names})")
                r = await session.call_tool("get_project", {"projectId": other})
                check(r.is_error and data(r)["code"] == "NOT_FOUND", "and is blind to another")

            await session_for(base, viewer, as_viewer, transport)
            await session_for(base, scoped, as_scoped, transport)

        # /mcp without a key, with a wrong one, from a foreign origin.
        init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"}}}
        headers = {"content-type": "application/json",
                   "accept": "application/json, text/event-stream"}

        def post_mcp(extra):
            req = urllib.request.Request(base + "/mcp", method="POST",
                                         data=json.dumps(init).encode(),
                                         headers={**headers, **extra})
            try:
                with urllib.request.urlopen(req) as r:
                    return r.status
            except urllib.error.HTTPError as e:
                return e.code

        check(post_mcp({}) == 401, "/mcp without a key: 401")
        check(post_mcp({"X-API-Key": "aq_wrong"}) == 401, "/mcp with a wrong key: 401")
        check(post_mcp({"X-API-Key": ADMIN, "Origin": "https://evil.example"}) == 403,
              "/mcp from a foreign origin: 403")
        check(post_mcp({"X-API-Key": ADMIN, "Origin": "http://localhost:8080"}) == 200,
              "/mcp from a loopback origin")
        metrics = urllib.request.urlopen(base + "/metrics").read().decode()
        check('route="/mcp"' in metrics, "/mcp requests are counted in /metrics")
        print("mcp_client: all checks passed")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    asyncio.run(main())

#!/usr/bin/env python3
"""The dashboard in a real browser: Debian's Chromium driven by Playwright.

Usage: python3 tests/dashboard.py target/debug/agentq [--screenshots DIR]

Starts agentq on a free port with a fresh database, fills a project through the API, then
signs in as a new user would and checks every page against the API. Fails on any console
error or Content-Security-Policy violation the pages cause (the few requests a case makes to
fail on purpose, a bad key or a refused action, are named and allowed).
With --screenshots, saves each page in light and dark under DIR.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from playwright.sync_api import sync_playwright, expect

ADMIN = "dashboard-test-admin-key-0001"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Api:
    def __init__(self, base, key):
        self.base, self.key = base, key

    def call(self, method, path, body=None, key=None, token=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        else:
            req.add_header("X-API-Key", key or self.key)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def ok(self, method, path, body=None, **kw):
        status, j = self.call(method, path, body, **kw)
        assert status < 300, f"{method} {path}: {status} {j}"
        return j["data"]


def main():
    binary = os.path.abspath(sys.argv[1])
    shots = sys.argv[sys.argv.index("--screenshots") + 1] if "--screenshots" in sys.argv else None
    tmp = tempfile.mkdtemp()
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen(
        [binary, "serve", "--db", os.path.join(tmp, "ui.redb"), "--bind", f"127.0.0.1:{port}",
         "--admin-key", ADMIN, "--rate-limit-per-minute", "0"],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "server.log"), "w"))
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "health", timeout=1)
                break
            except Exception:
                time.sleep(0.1)
        run(Api(base, ADMIN), base, shots)
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    print("dashboard: all cases passed")


def seed(api):
    p = api.ok("POST", "api/projects", {"name": "docs-rewrite", "description": "Rewrite the docs, one page per task"})
    api.ok("POST", f"api/projects/{p['id']}/task-types", {
        "name": "summarise", "template": "Summarise {{page}} in {{words}} words.",
        "variables": ["page", "words"], "maxRetries": 2})
    for chunk in range(5):
        tasks = [{"typeId": "summarise", "variables": {"page": f"page-{chunk * 1000 + i}", "words": "200"},
                  "priority": i % 4} for i in range(1000)]
        out = api.ok("POST", f"api/projects/{p['id']}/tasks/bulk", {"tasks": tasks, "batchId": f"b{chunk}"})
        assert out["tasksCreated"] == 1000, out
    api.ok("POST", "api/projects", {"name": "triage", "description": "Incoming bug reports"})
    return p


def work(api, project, n, agent="agent-1", fail=False, execution=None):
    """Lease and finish `n` tasks through the API, as an agent would."""
    done = []
    for _ in range(n):
        out = api.call("POST", f"api/agents/{agent}/next-task", {"projectId": project})[1]
        t = out["data"]["task"]
        body = {"agentName": agent, "leaseToken": t["leaseToken"]}
        if execution:
            body["execution"] = execution
        if fail:
            body.update({"error": "the page does not exist", "canRetry": False})
            api.ok("POST", f"api/tasks/{t['id']}/fail", body)
        else:
            body.update({"result": f"summary of {t['variables']['page']}", "outputs": {"words": 200, "ok": True}})
            api.ok("POST", f"api/tasks/{t['id']}/complete", body)
        done.append(t["id"])
    return done


def run(api, base, shots):
    p = seed(api)
    pid = p["id"]
    viewer = api.ok("POST", "api/keys", {"name": "watcher", "role": "viewer"})["key"]

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        ctx = browser.new_context(viewport={"width": 1280, "height": 860})
        page = ctx.new_page()
        problems, allowed = [], []

        def on_console(msg):
            if msg.type != "error":
                return
            text = msg.text
            if any(a in text for a in allowed):
                return
            problems.append(text)

        page.on("console", on_console)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: d.accept())

        # --- a bad key: a clear message, nothing stored.
        page.goto(base)
        expect(page).to_have_url(base + "ui/")
        allowed.append("401")
        page.fill("#key", "not-a-key-at-all")
        page.click("button[type=submit]")
        expect(page.locator("#signin-error")).to_contain_text("not accepted")
        assert page.evaluate("sessionStorage.length") == 0
        allowed.remove("401")
        if shots:
            for scheme in ("light", "dark"):
                page.emulate_media(color_scheme=scheme)
                page.screenshot(path=f"{shots}/signin-{scheme}.png")
            page.emulate_media(color_scheme="light")

        # --- a good key: a session token, and the key itself nowhere.
        page.fill("#key", ADMIN)
        page.click("button[type=submit]")
        card = page.locator(f"article[data-project='{pid}']")
        expect(card).to_be_visible()
        stored = page.evaluate("JSON.stringify(Object.assign({}, sessionStorage))")
        assert ADMIN not in stored and "aqs_" in stored, stored
        assert ADMIN not in page.url
        expect(page.locator("#role")).to_contain_text("admin")
        expect(card.locator("[data-status=queued] b")).to_have_text("5,000")

        # --- the overview's counts move as agents work through the API.
        work(api, pid, 30, execution={"exitCode": 0, "stdoutTail": "wrote 200 words\n", "stderrTail": "", "durationMs": 812})
        failed_ids = work(api, pid, 4, agent="agent-2", fail=True)
        expect(card.locator("[data-status=completed] b")).to_have_text("30", timeout=10000)
        expect(card.locator("[data-status=failed] b")).to_have_text("4")
        expect(card.locator("[data-status=queued] b")).to_have_text("4,966")
        expect(card.locator(".legend")).to_contain_text("30 completed")
        # A running task for the agents page.
        held = api.call("POST", "api/agents/agent-7/next-task", {"projectId": pid})[1]["data"]["task"]
        expect(card.locator("[data-fact=activeAgents]")).to_have_text("1", timeout=10000)
        if shots:
            snap(page, shots, "overview")

        # --- a project of 5,000 tasks: filter and page.
        card.locator("h2 a").click()
        expect(page.locator("#range")).to_have_text("1–50 of 5,000")
        page.select_option("#f-status", "queued")
        page.select_option("#f-priority", "3")
        page.click("form.filters button[type=submit]")
        expect(page.locator("#range")).to_contain_text("of 1,2")
        statuses = page.locator("#tasks tbody td:nth-child(3)").all_inner_texts()
        assert statuses and set(statuses) == {"queued"}, statuses
        priorities = page.locator("#tasks tbody td:nth-child(5)").all_inner_texts()
        assert set(priorities) == {"3"}, priorities
        matching = count(api, pid, "status=queued&priority=3")
        first_page = page.locator("#tasks tbody tr").first.get_attribute("data-task")
        page.click("#next")
        expect(page.locator("#range")).to_have_text(f"51–100 of {matching:,}")
        assert page.locator("#tasks tbody tr").first.get_attribute("data-task") != first_page
        page.click("#prev")
        expect(page.locator("#tasks tbody tr").first).to_have_attribute("data-task", first_page)
        if shots:
            go(page, base, f"/projects/{pid}")
            expect(page.locator("#range")).to_contain_text("of 5,000")
            snap(page, shots, "project")

        # --- search a task by id, and see its attempts (a script's execution included).
        done_id = api.ok("GET", f"api/projects/{pid}/tasks?status=completed&limit=1")[0]["id"]
        go(page, base, f"/projects/{pid}")
        page.fill("#find-id", done_id)
        page.click("form[role=search] button")
        expect(page).to_have_url(f"{base}ui/#/tasks/{done_id}")
        expect(page.locator("h1")).to_contain_text(done_id)
        expect(page.locator("#attempts li")).to_have_count(1)
        expect(page.locator("#attempts")).to_contain_text("agent-1")
        expect(page.locator("#attempts")).to_contain_text("exit code 0")
        expect(page.locator("#outputs")).to_contain_text('"words": 200')
        if shots:
            snap(page, shots, "task")
        allowed.append("404")
        go(page, base, f"/projects/{pid}")
        page.fill("#find-id", "no-such-task")
        page.click("form[role=search] button")
        expect(page.locator("#notice")).to_contain_text("No task has the id no-such-task")
        allowed.remove("404")

        # --- cancel and retry from the task page; the API agrees.
        queued_id = api.ok("GET", f"api/projects/{pid}/tasks?status=queued&limit=1")[0]["id"]
        go(page, base, f"/tasks/{queued_id}")
        page.click("#task-cancel")
        expect(page.locator("h1 .badge")).to_have_text("cancelled")
        assert api.ok("GET", f"api/tasks/{queued_id}")["status"] == "cancelled"
        page.click("#task-retry")
        expect(page.locator("h1 .badge")).to_have_text("queued")
        assert api.ok("GET", f"api/tasks/{queued_id}")["status"] == "queued"

        # --- bulk: select two queued tasks and cancel them; retry every failed task.
        go(page, base, f"/projects/{pid}?status=queued")
        rows = page.locator("#tasks tbody tr")
        expect(rows).to_have_count(50)
        picked = [rows.nth(i).get_attribute("data-task") for i in (0, 1)]
        for i in (0, 1):
            rows.nth(i).locator("input[type=checkbox]").check()
        expect(page.locator("#selection")).to_have_text("2 selected")
        page.click("#bulk-cancel")
        expect(page.locator("#notice")).to_contain_text("Cancelled 2 of 2")
        for tid in picked:
            assert api.ok("GET", f"api/tasks/{tid}")["status"] == "cancelled"
        go(page, base, f"/projects/{pid}?status=failed")
        expect(page.locator("#range")).to_have_text("1–4 of 4")
        page.click("#retry-matching")
        expect(page.locator("#notice")).to_contain_text("Retried 4 of 4")
        for tid in failed_ids:
            assert api.ok("GET", f"api/tasks/{tid}")["status"] == "queued"
        assert api.ok("GET", f"api/projects/{pid}/stats")["project"]["stats"]["failedTasks"] == 0
        # Delete in bulk: the two cancelled ones.
        go(page, base, f"/projects/{pid}?status=cancelled")
        expect(page.locator("#range")).to_have_text("1–2 of 2")
        page.check("#select-all")
        page.click("#bulk-delete")
        expect(page.locator("#notice")).to_contain_text("Deleted 2 of 2")
        assert count(api, pid, "status=cancelled") == 0

        # --- create a task from the page, with the type's variables as a form.
        go(page, base, f"/projects/{pid}")
        page.click("#new-task")
        page.select_option("#new-type", label="summarise")
        page.fill("#var-page", "the-new-page")
        page.fill("#var-words", "50")
        page.fill("#new-priority", "9")
        page.click("dialog button[type=submit]")
        expect(page.locator("#notice")).to_contain_text("created")
        made = api.ok("GET", f"api/projects/{pid}/tasks?priority=9&limit=5")
        assert [t["instructions"] for t in made] == ["Summarise the-new-page in 50 words."], made

        # --- agents and task types.
        go(page, base, f"/projects/{pid}/agents")
        expect(page.locator("#agents tbody")).to_contain_text("agent-7")
        expect(page.locator("#agents tbody")).to_contain_text(held["id"])
        if shots:
            snap(page, shots, "agents")
        go(page, base, f"/projects/{pid}/types")
        expect(page.locator("#types")).to_contain_text("Summarise {{page}} in {{words}} words.")
        if shots:
            snap(page, shots, "types")

        # --- phone width: every page fits without sideways scrolling (the task table scrolls
        # inside its own box).
        page.set_viewport_size({"width": 390, "height": 800})
        for where in ("", f"projects/{pid}", f"tasks/{done_id}", f"projects/{pid}/agents", f"projects/{pid}/types"):
            go(page, base, f"/{where}")
            expect(page.locator("h1")).to_be_visible()
            page.wait_for_timeout(300)
            wide = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert wide <= 0, f"#/{where} is {wide}px wider than a phone"
        if shots:
            go(page, base, f"/projects/{pid}")
            expect(page.locator("#range")).to_contain_text("of ")
            snap(page, shots, "phone-project")
        page.set_viewport_size({"width": 1280, "height": 860})

        # --- close and reopen the project.
        go(page, base, f"/projects/{pid}")
        page.click("#toggle-project")
        expect(page.locator("#toggle-project")).to_have_text("Reopen project")
        assert api.ok("GET", f"api/projects/{pid}")["status"] == "closed"
        page.click("#toggle-project")
        expect(page.locator("#toggle-project")).to_have_text("Close project")
        assert api.ok("GET", f"api/projects/{pid}")["status"] == "active"

        # --- sign out ends the session on the server.
        token = page.evaluate("sessionStorage.getItem('agentq.session')")
        assert api.call("GET", "api/auth/session", token=token)[0] == 200
        page.click("#signout")
        expect(page.locator("#key")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0
        assert api.call("GET", "api/auth/session", token=token)[0] == 401

        # --- a viewer: no action anywhere, and a crafted action from its session is refused.
        page.fill("#key", viewer)
        page.click("button[type=submit]")
        expect(card).to_be_visible()
        expect(page.locator("#role")).to_contain_text("viewer")
        go(page, base, f"/projects/{pid}")
        expect(page.locator("#range")).to_contain_text("of ")
        for sel in ("#new-task", "#toggle-project", "#bulk-bar", "#select-all", "#tasks input"):
            assert page.locator(sel).count() == 0, sel
        queued_id = api.ok("GET", f"api/projects/{pid}/tasks?status=queued&limit=1")[0]["id"]
        go(page, base, f"/tasks/{queued_id}")
        expect(page.locator("h1")).to_contain_text(queued_id)
        assert page.locator("button#task-cancel, button#task-retry, button#task-delete").count() == 0
        allowed.append("403")
        status = page.evaluate("""async (id) => {
            const r = await fetch(`../api/tasks/${id}/cancel`, {method: 'POST',
              headers: {'Authorization': 'Bearer ' + sessionStorage.getItem('agentq.session'),
                        'Content-Type': 'application/json'}, body: '{}'});
            return r.status;
        }""", queued_id)
        allowed.remove("403")
        assert status == 403, status
        assert api.ok("GET", f"api/tasks/{queued_id}")["status"] == "queued"

        # --- the pages carry a strict CSP, and nothing broke on any page.
        resp = page.request.get(base + "ui/")
        csp = resp.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp, csp
        assert not problems, problems
        browser.close()

    # Behind a reverse proxy that adds a path prefix, with no rebuild.
    prefix_case(api, base)


def go(page, base, route):
    """Opens the dashboard at `#<route>` and waits until that page has rendered (a hash
    change renders asynchronously: acting at once would act on the page before)."""
    page.goto(f"{base}ui/#{route}")
    page.wait_for_selector(f'main[data-route="#{route}"]')


def count(api, pid, query):
    status, j = api.call("GET", f"api/projects/{pid}/tasks?{query}&limit=1")
    assert status == 200, j
    return j["pagination"]["total"]


def snap(page, shots, name):
    page.evaluate("document.querySelector('#notice').hidden = true")
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        page.wait_for_timeout(150)
        page.screenshot(path=f"{shots}/{name}-{scheme}.png")
    page.emulate_media(color_scheme="light")


def prefix_case(api, base):
    """A tiny proxy serving agentq under /queue/: the page signs in and lists projects."""
    import http.server
    import threading

    upstream = base.rstrip("/")

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do(self):
            if not self.path.startswith("/queue/"):
                self.send_error(404)
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            req = urllib.request.Request(upstream + self.path[len("/queue"):], data=body, method=self.command)
            for k, v in self.headers.items():
                if k.lower() not in ("host", "content-length", "connection"):
                    req.add_header(k, v)

            class NoRedirect(urllib.request.HTTPRedirectHandler):
                def redirect_request(self, *a, **kw):
                    return None
            opener = urllib.request.build_opener(NoRedirect)
            try:
                r = opener.open(req, timeout=30)
            except urllib.error.HTTPError as e:
                r = e
            data = r.read()
            self.send_response(r.status if hasattr(r, "status") else r.code)
            for k, v in r.headers.items():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    proxied = f"http://127.0.0.1:{srv.server_address[1]}/queue/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(proxied)
        expect(page).to_have_url(proxied + "ui/")
        page.fill("#key", ADMIN)
        page.click("button[type=submit]")
        expect(page.locator("article.card").first).to_be_visible()
        assert not errors, errors
        browser.close()
    srv.shutdown()


if __name__ == "__main__":
    main()

// agentq dashboard: one page, no build step, no dependencies.
//
// It talks to the REST API like any client. Signing in exchanges an API key for a key-scoped
// session (POST api/auth/login); only the session token is kept, in sessionStorage, and the
// key is dropped. Every address is relative to this page, so a reverse proxy may serve agentq
// under any path prefix. The DOM is built with textContent only (never innerHTML): task
// content is untrusted. Pages refresh by polling one cheap counter endpoint every 2 s while
// the tab is visible, and reload a list only when the counters moved.
"use strict";

const BASE = new URL("../", location.href.split("#")[0]);
const TOKEN_KEY = "agentq.session";
const POLL_MS = 2000;
const STATUSES = ["queued", "running", "completed", "failed", "cancelled"];

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  session: null, // {role, projects, allowScripts}
  timers: [],
  projects: new Map(), // id -> project (names for breadcrumbs)
  types: new Map(), // project id -> [task types]
  generation: 0, // bumped on every navigation; stale answers are dropped
};

// ---------------------------------------------------------------- DOM helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(c));
  return el;
}

const $ = (sel, root = document) => root.querySelector(sel);
const fmt = (n) => Number(n).toLocaleString("en-US");

function setMain(...children) {
  const main = $("#main");
  main.replaceChildren(...children.flat());
  return main;
}

function notify(message, kind = "ok") {
  const n = $("#notice");
  n.textContent = message;
  n.className = kind;
  n.hidden = false;
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => { n.hidden = true; }, kind === "error" ? 8000 : 4000);
}

// ---------------------------------------------------------------- time

function exact(iso) {
  const d = new Date(iso);
  return `${d.toLocaleString()} (${iso})`;
}

function rel(iso) {
  const s = (Date.parse(iso) - Date.now()) / 1000;
  const a = Math.abs(s);
  let text;
  if (a < 5) return "just now";
  if (a < 60) text = `${Math.round(a)} s`;
  else if (a < 3600) text = `${Math.round(a / 60)} min`;
  else if (a < 86400) text = `${Math.round(a / 3600)} h`;
  else text = `${Math.round(a / 86400)} d`;
  return s < 0 ? `${text} ago` : `in ${text}`;
}

function timeEl(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: iso, title: exact(iso) }, rel(iso));
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

setInterval(() => {
  for (const t of document.querySelectorAll("time[datetime]")) t.textContent = rel(t.dateTime);
}, 15000);

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

async function api(method, path, body, extraHeaders = {}) {
  const headers = { ...extraHeaders };
  if (state.token && !headers["X-API-Key"]) headers.Authorization = `Bearer ${state.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(new URL(path, BASE), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
  } catch (e) {
    throw new ApiError(0, "The server cannot be reached.", null);
  }
  let j = null;
  try { j = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    let message = (j && (typeof j.error === "string" ? j.error : j.error?.message)) || r.statusText;
    const details = j && j.validationDetails;
    if (Array.isArray(details) && details.length) {
      message += ": " + details.map((d) => `${d.field} ${d.message}`).join("; ");
    }
    if (r.status === 401 && state.token && !headers["X-API-Key"]) {
      forget();
      signIn("Your session has ended. Sign in again.");
    }
    throw new ApiError(r.status, message, j);
  }
  return j;
}

const get = (path) => api("GET", path);
const enc = encodeURIComponent;

// ---------------------------------------------------------------- rights

function can(right, projectId) {
  const s = state.session;
  if (!s) return false;
  if (projectId && s.projects && !s.projects.includes(projectId)) return false;
  const role = s.role;
  switch (right) {
    case "read": return true;
    case "tasks": case "projects": return role === "admin" || role === "producer";
    default: return false;
  }
}

// ---------------------------------------------------------------- sign in and out

function forget() {
  state.token = null;
  state.session = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("#who").hidden = true;
}

function signIn(message) {
  stopTimers();
  crumbs([]);
  const key = h("input", {
    id: "key", name: "key", type: "password", autocomplete: "off", required: true,
    spellcheck: "false", "aria-describedby": "key-help",
  });
  const error = h("div", { class: "alert", role: "alert", id: "signin-error", hidden: !message }, message || "");
  const submit = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h("form", {
    onsubmit: async (ev) => {
      ev.preventDefault();
      submit.disabled = true;
      error.hidden = true;
      const text = key.value.trim();
      try {
        const j = await api("POST", "api/auth/login", {}, { "X-API-Key": text });
        state.token = j.data.token;
        sessionStorage.setItem(TOKEN_KEY, state.token);
        key.value = "";
        await loadSession();
        if (!location.hash || location.hash === "#/signin") location.hash = "#/";
        else route();
      } catch (e) {
        error.textContent = e.status === 401
          ? "That key was not accepted. Check it and try again."
          : e.status === 429 ? "Too many attempts: wait a minute and try again."
          : `Sign-in failed: ${e.message}`;
        error.hidden = false;
        key.focus();
        key.select();
      } finally {
        submit.disabled = false;
      }
    },
  },
    h("label", { for: "key" }, "API key"),
    key,
    h("p", { id: "key-help", class: "muted" },
      "The key is exchanged for a session and is not kept: only the session token is stored, in this tab."),
    error,
    submit,
  );
  setMain(h("section", { class: "signin panel" }, h("h1", {}, "Sign in to agentq"), form));
  key.focus();
}

async function loadSession() {
  const j = await get("api/auth/session");
  state.session = j.data;
  const role = $("#role");
  const scope = j.data.projects ? `${j.data.projects.length} project${j.data.projects.length === 1 ? "" : "s"}` : "all projects";
  role.textContent = `${j.data.role} · ${scope}`;
  role.title = `Signed in with a ${j.data.role} key; the session expires ${exact(j.data.expiresAt)}`;
  $("#who").hidden = false;
}

async function signOut() {
  try { await api("POST", "api/auth/logout", {}); } catch (_) { /* ended already */ }
  forget();
  location.hash = "#/signin";
  signIn();
  notify("Signed out.");
}

// ---------------------------------------------------------------- navigation

function stopTimers() {
  for (const t of state.timers) clearInterval(t);
  state.timers = [];
  state.generation++;
}

// Runs `fn` now and every POLL_MS while the tab is visible; stops on navigation.
function live(fn, every = POLL_MS) {
  const gen = state.generation;
  let busy = false;
  const tick = async () => {
    if (busy || gen !== state.generation || document.visibilityState !== "visible") return;
    busy = true;
    try { await fn(); } catch (e) { if (e.status !== 401) showLoadError(e); } finally { busy = false; }
  };
  state.timers.push(setInterval(tick, every));
  return tick();
}

function showLoadError(e) {
  notify(`Could not refresh: ${e.message}`, "error");
}

function crumbs(parts) {
  const nav = $("#crumbs");
  const items = [];
  parts.forEach((p, i) => {
    items.push(h("span", { class: "sep", "aria-hidden": "true" }, "/"));
    items.push(p.href ? h("a", { href: p.href }, p.text) : h("span", { "aria-current": "page" }, p.text));
    if (i === parts.length - 1) document.title = `${p.text} · agentq`;
  });
  if (!parts.length) document.title = "agentq";
  nav.replaceChildren(...items);
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
}

async function route() {
  stopTimers();
  if (!state.token) return signIn();
  if (!state.session) {
    try { await loadSession(); } catch (e) {
      if (e.status !== 401) { forget(); signIn(`Could not read the session: ${e.message}`); }
      return;
    }
  }
  const { parts, params } = parseHash();
  const gen = state.generation;
  const main = $("#main");
  // Which address the page shows, once it has rendered (tests and scripts wait for it).
  delete main.dataset.route;
  try {
    if (parts[0] === "signin" || parts.length === 0) await overview();
    else if (parts[0] === "projects" && parts[1] && parts[2] === "agents") await agentsPage(parts[1]);
    else if (parts[0] === "projects" && parts[1] && parts[2] === "types") await typesPage(parts[1]);
    else if (parts[0] === "projects" && parts[1]) await projectPage(parts[1], params);
    else if (parts[0] === "tasks" && parts[1]) await taskPage(parts[1]);
    else setMain(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
  } catch (e) {
    if (gen !== state.generation || e.status === 401) return;
    setMain(h("h1", {}, e.status === 404 ? "Not found" : "Something went wrong"),
      h("p", { class: "alert", role: "alert" }, e.message),
      h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
  }
  if (gen === state.generation) main.dataset.route = location.hash || "#/";
  main.focus({ preventScroll: true });
}

async function project(id) {
  const j = await get(`api/projects/${enc(id)}`);
  state.projects.set(j.data.id, j.data);
  return j.data;
}

async function typesOf(projectId, fresh = false) {
  if (!fresh && state.types.has(projectId)) return state.types.get(projectId);
  const j = await get(`api/projects/${enc(projectId)}/task-types?limit=100`);
  state.types.set(projectId, j.data);
  return j.data;
}

function badge(status) {
  return h("span", { class: `badge s-${status}` }, status);
}

// ---------------------------------------------------------------- overview

async function overview() {
  crumbs([{ text: "Projects" }]);
  const grid = h("div", { class: "grid", id: "projects" });
  const showClosed = h("input", { type: "checkbox", id: "show-closed" });
  const summary = h("p", { class: "muted", id: "overview-summary" }, "Loading…");
  setMain(
    h("h1", {}, "Projects"),
    h("div", { class: "toolbar" }, summary, h("span", { class: "spacer" }),
      h("label", { class: "check", for: "show-closed" }, showClosed, "Show closed projects")),
    grid,
  );
  const cards = new Map();
  let last = "";
  const refresh = async () => {
    const status = showClosed.checked ? "all" : "active";
    const j = await get(`api/stats?status=${status}&limit=100`);
    const text = JSON.stringify(j.data.map((p) => [p.project, p.status, p.recentActivity, p.oldestQueuedAt]));
    if (text === last) return;
    last = text;
    const seen = new Set();
    for (const p of j.data) {
      seen.add(p.project.id);
      const card = projectCard(p);
      const old = cards.get(p.project.id);
      if (old) old.replaceWith(card); else grid.append(card);
      cards.set(p.project.id, card);
    }
    for (const [id, card] of cards) if (!seen.has(id)) { card.remove(); cards.delete(id); }
    // Keep the server's order.
    for (const p of j.data) grid.append(cards.get(p.project.id));
    const total = j.pagination.total;
    summary.textContent = total === 0
      ? "No projects yet."
      : `${fmt(total)} project${total === 1 ? "" : "s"}${total > j.data.length ? `, the first ${j.data.length} shown` : ""}; refreshed every 2 s.`;
    if (total === 0) grid.replaceChildren(h("div", { class: "panel empty" },
      "No projects are visible to this key. Create one with ", h("code", {}, "agentq project create NAME"), "."));
  };
  showClosed.addEventListener("change", () => { last = ""; refresh().catch(showLoadError); });
  await live(refresh);
}

function counts(stats) {
  const n = {
    queued: stats.queuedTasks, running: stats.runningTasks, completed: stats.completedTasks,
    failed: stats.failedTasks, cancelled: stats.cancelledTasks,
  };
  return h("div", { class: "counts" }, STATUSES.map((s) =>
    h("div", { class: `count ${s}`, "data-status": s }, h("b", {}, fmt(n[s])), h("span", {}, s))));
}

function projectCard(p) {
  const a = p.recentActivity;
  const link = `#/projects/${enc(p.project.id)}`;
  return h("article", { class: "panel card", "data-project": p.project.id, "aria-label": `Project ${p.project.name}` },
    h("h2", {}, h("a", { href: link }, p.project.name), badge(p.status)),
    counts(p.project.stats),
    h("div", { class: "facts" },
      h("span", {}, "Queue depth ", h("b", { "data-fact": "queueDepth" }, fmt(p.queueDepth))),
      h("span", {}, "Active agents ", h("b", { "data-fact": "activeAgents" }, fmt(p.activeAgents))),
      h("span", {}, "Oldest queued ", p.oldestQueuedAt
        ? h("b", { title: exact(p.oldestQueuedAt) }, `waiting ${duration(p.oldestQueuedAgeSeconds)}`)
        : h("b", {}, "none"))),
    activityChart(a),
    h("div", { class: "legend" },
      h("span", {}, h("i", { class: "c" }), `${fmt(a.tasksCompletedLastHour)} completed`),
      h("span", {}, h("i", { class: "f" }), `${fmt(a.tasksFailedLastHour)} failed`),
      h("span", {}, "in the last hour")));
}

// 60 stacked bars, one a minute, oldest first.
function activityChart(a) {
  const W = 600, H = 48, bw = W / 60;
  const max = Math.max(1, ...a.perMinute.map((m) => m.completed + m.failed));
  const chart = svg("svg", {
    class: "chart", viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img",
    "aria-label": `Completions and failures per minute over the last hour: ${a.tasksCompletedLastHour} completed, ${a.tasksFailedLastHour} failed`,
  });
  chart.append(svg("line", { class: "base", x1: 0, x2: W, y1: H - 0.5, y2: H - 0.5 }));
  a.perMinute.forEach((m, i) => {
    const hc = (m.completed / max) * (H - 2);
    const hf = (m.failed / max) * (H - 2);
    const g = svg("g", {}, svg("title", {}, `${new Date(m.minute).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}: ${m.completed} completed, ${m.failed} failed`));
    // An invisible full-height bar so that every minute shows its title on hover.
    g.append(svg("rect", { x: i * bw, y: 0, width: bw, height: H, fill: "transparent" }));
    if (hc > 0) g.append(svg("rect", { class: "c", x: i * bw + 1, y: H - 1 - hc, width: bw - 2, height: hc }));
    if (hf > 0) g.append(svg("rect", { class: "f", x: i * bw + 1, y: H - 1 - hc - hf, width: bw - 2, height: hf }));
    chart.append(g);
  });
  return chart;
}

// ---------------------------------------------------------------- project

function projectTabs(p, current) {
  const base = `#/projects/${enc(p.id)}`;
  const tab = (href, name, text) => h("a", { href, "aria-current": current === name ? "page" : null }, text);
  return h("nav", { class: "tabs", "aria-label": "Project sections" },
    tab(base, "tasks", "Tasks"), tab(`${base}/agents`, "agents", "Agents"), tab(`${base}/types`, "types", "Task types"));
}

function projectHeader(p, current) {
  const actions = [];
  if (can("projects", p.id)) {
    const closed = p.status === "closed";
    actions.push(h("button", {
      type: "button", id: "toggle-project",
      onclick: async () => {
        try {
          await api("PUT", `api/projects/${enc(p.id)}`, { status: closed ? "active" : "closed" });
          notify(closed ? "Project reopened." : "Project closed: next-task hands out none of its tasks.");
          route();
        } catch (e) { notify(e.message, "error"); }
      },
    }, closed ? "Reopen project" : "Close project"));
  }
  if (current === "tasks" && can("tasks", p.id)) {
    actions.push(h("button", { type: "button", class: "primary", id: "new-task", onclick: () => createTaskDialog(p) }, "New task"));
  }
  return [
    h("h1", {}, p.name, badge(p.status), h("span", { class: "spacer" })),
    p.description ? h("p", { class: "muted" }, p.description) : null,
    actions.length ? h("div", { class: "toolbar" }, actions) : null,
    projectTabs(p, current),
  ];
}

const FILTERS = ["status", "typeId", "assignedTo", "batchId", "priority", "createdAfter", "createdBefore", "updatedAfter", "updatedBefore", "sort", "order", "limit"];
const ROW_FILTERS = ["typeId", "assignedTo", "batchId", "priority", "createdAfter", "createdBefore", "updatedAfter", "updatedBefore"];

async function projectPage(id, params) {
  const p = await project(id);
  const types = await typesOf(p.id, true);
  crumbs([{ text: "Projects", href: "#/" }, { text: p.name }]);
  const typeName = new Map(types.map((t) => [t.id, t.name]));
  const manage = can("tasks", p.id);

  // Filters: the form mirrors the address, so a view can be bookmarked and shared.
  const field = (name, label, input) => h("label", { for: `f-${name}` }, label, input);
  const sel = (name, options, value) => h("select", { id: `f-${name}`, name },
    options.map(([v, t]) => h("option", { value: v, selected: v === (value || "") }, t)));
  const txt = (name, value, attrs = {}) => h("input", { id: `f-${name}`, name, value: value || "", ...attrs });
  const dt = (name) => h("input", { id: `f-${name}`, name, type: "datetime-local", step: 1, value: toLocalInput(params.get(name)) });
  const form = h("form", { class: "panel filters", "aria-label": "Filters", onsubmit: (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const el of form.elements) {
      if (!el.name || !el.value) continue;
      q.set(el.name, el.type === "datetime-local" ? new Date(el.value).toISOString() : el.value);
    }
    location.hash = `#/projects/${enc(p.id)}${q.toString() ? "?" + q : ""}`;
  } },
  h("div", { class: "row" },
    field("status", "Status", sel("status", [["", "Any"], ...STATUSES.map((s) => [s, s])], params.get("status"))),
    field("typeId", "Type", sel("typeId", [["", "Any"], ...types.map((t) => [t.id, t.name])], params.get("typeId"))),
    field("assignedTo", "Agent", txt("assignedTo", params.get("assignedTo"), { placeholder: "agent name" })),
    field("batchId", "Batch", txt("batchId", params.get("batchId"), { placeholder: "batch id" })),
    field("priority", "Priority", sel("priority", [["", "Any"], ...[...Array(11).keys()].reverse().map((n) => [String(n), String(n)])], params.get("priority"))),
  ),
  h("div", { class: "row" },
    field("sort", "Sort by", sel("sort", [["", "Created"], ["updatedAt", "Updated"], ["priority", "Priority"]], params.get("sort"))),
    field("order", "Order", sel("order", [["", "Newest first"], ["asc", "Oldest first"]], params.get("order"))),
    field("limit", "Per page", sel("limit", [["", "50"], ["25", "25"], ["100", "100"]], params.get("limit"))),
    field("createdAfter", "Created after", dt("createdAfter")),
    field("createdBefore", "Created before", dt("createdBefore")),
    field("updatedAfter", "Updated after", dt("updatedAfter")),
    field("updatedBefore", "Updated before", dt("updatedBefore")),
    h("button", { type: "submit", class: "primary" }, "Apply"),
    h("button", { type: "button", onclick: () => { location.hash = `#/projects/${enc(p.id)}`; } }, "Reset"),
  ));

  const findInput = h("input", { id: "find-id", name: "id", placeholder: "task id", required: true, autocomplete: "off" });
  const find = h("form", { class: "row", role: "search", "aria-label": "Find a task by id", onsubmit: async (ev) => {
    ev.preventDefault();
    const tid = findInput.value.trim();
    if (!tid) return;
    try {
      await get(`api/tasks/${enc(tid)}`);
      location.hash = `#/tasks/${enc(tid)}`;
    } catch (e) {
      notify(e.status === 404 ? `No task has the id ${tid}.` : e.message, "error");
    }
  } }, h("label", { for: "find-id" }, "Find a task by id", findInput), h("button", { type: "submit" }, "Open"));

  const countsBox = h("div", { id: "project-counts" });
  const status = h("span", { class: "muted", id: "list-status", "aria-live": "polite" }, "Loading…");
  const selected = new Set();
  const selInfo = h("span", { id: "selection" });
  const bulk = [];
  if (manage) {
    const byIds = (action) => async () => {
      const ids = [...selected];
      if (!ids.length) return;
      try {
        if (action === "delete") {
          if (!confirm(`Delete ${ids.length} task${ids.length === 1 ? "" : "s"}? This cannot be undone.`)) return;
          let done = 0; const failed = [];
          for (const tid of ids) {
            try { await api("DELETE", `api/tasks/${enc(tid)}`); done++; } catch (e) { failed.push(`${tid}: ${e.message}`); }
          }
          notify(`Deleted ${done} of ${ids.length}.${failed.length ? " " + failed.slice(0, 3).join("; ") : ""}`, failed.length ? "error" : "ok");
        } else {
          const j = await api("POST", `api/projects/${enc(p.id)}/tasks/${action}`, { ids });
          const d = j.data;
          notify(`${action === "cancel" ? "Cancelled" : "Retried"} ${d.changed} of ${d.matched}.${d.errors.length ? ` ${d.errors.length} left as they were (${d.errors[0].error}).` : ""}`, d.errors.length ? "error" : "ok");
        }
      } catch (e) { notify(e.message, "error"); }
      selected.clear();
      await loadList(true);
    };
    bulk.push(
      h("button", { type: "button", id: "bulk-cancel", onclick: byIds("cancel") }, "Cancel selected"),
      h("button", { type: "button", id: "bulk-retry", onclick: byIds("retry") }, "Retry selected"),
      h("button", { type: "button", class: "danger", id: "bulk-delete", onclick: byIds("delete") }, "Delete selected"),
    );
    // Every task the filter matches (the bulk API's filter: status, type, agent, batch).
    const byFilter = (action) => async () => {
      const filter = {};
      for (const k of ["status", "typeId", "assignedTo", "batchId"]) if (params.get(k)) filter[k] = params.get(k);
      if (!confirm(`${action === "cancel" ? "Cancel" : "Retry"} every task this filter matches?`)) return;
      try {
        const j = await api("POST", `api/projects/${enc(p.id)}/tasks/${action}`, { filter });
        const d = j.data;
        notify(`${action === "cancel" ? "Cancelled" : "Retried"} ${fmt(d.changed)} of ${fmt(d.matched)} matching${d.more ? " (more match: run it again)" : ""}.`);
      } catch (e) { notify(e.message, "error"); }
      await loadList(true);
    };
    const exactFilter = !["priority", "createdAfter", "createdBefore", "updatedAfter", "updatedBefore"].some((k) => params.get(k));
    const st = params.get("status");
    if (exactFilter && (st === "failed" || st === "cancelled")) {
      bulk.push(h("button", { type: "button", id: "retry-matching", onclick: byFilter("retry") }, `Retry all ${st}`));
    }
    if (exactFilter && (st === "queued" || st === "running")) {
      bulk.push(h("button", { type: "button", id: "cancel-matching", onclick: byFilter("cancel") }, `Cancel all ${st}`));
    }
  }

  const tbody = h("tbody", {});
  const allBox = manage ? h("input", { type: "checkbox", id: "select-all", "aria-label": "Select every task on this page", onchange: () => {
    for (const box of tbody.querySelectorAll("input[type=checkbox]")) {
      box.checked = allBox.checked;
      if (box.checked) selected.add(box.value); else selected.delete(box.value);
    }
    updateSelection();
  } }) : null;
  const table = h("div", { class: "table-wrap" }, h("table", { id: "tasks" },
    h("caption", { class: "skip" }, `Tasks of ${p.name}`),
    h("thead", {}, h("tr", {},
      manage ? h("th", { scope: "col" }, allBox) : null,
      h("th", { scope: "col" }, "Task"), h("th", { scope: "col" }, "Status"),
      h("th", { scope: "col", class: "hide-narrow" }, "Type"), h("th", { scope: "col" }, "Priority"),
      h("th", { scope: "col", class: "hide-narrow" }, "Agent"), h("th", { scope: "col", class: "hide-narrow" }, "Progress"),
      h("th", { scope: "col" }, "Created"), h("th", { scope: "col", class: "hide-narrow" }, "Updated"))),
    tbody));
  const prev = h("button", { type: "button", id: "prev", onclick: () => { cursors.pop(); loadList(true); } }, "← Previous");
  const next = h("button", { type: "button", id: "next", onclick: () => { cursors.push(nextCursor); loadList(true); } }, "Next →");
  const range = h("span", { class: "muted", id: "range" });

  // Folded on a phone unless a filter is set: the list comes first there.
  const filtered = FILTERS.some((k) => params.get(k));
  const filterBox = h("details", { class: "filter-box", open: filtered || window.innerWidth > 760 },
    h("summary", {}, filtered ? "Filters (set)" : "Filters"), form);
  setMain(
    ...projectHeader(p, "tasks"),
    countsBox,
    filterBox,
    h("div", { class: "toolbar" }, find, h("span", { class: "spacer" }), status),
    manage ? h("div", { class: "toolbar", id: "bulk-bar" }, selInfo, bulk) : null,
    table,
    h("div", { class: "pager" }, range, prev, next),
  );

  function updateSelection() {
    selInfo.textContent = selected.size ? `${selected.size} selected` : "Select tasks to act on them";
    for (const b of bulk.slice(0, 3)) b.disabled = selected.size === 0;
  }
  updateSelection();

  const query = new URLSearchParams();
  for (const k of FILTERS) if (params.get(k)) query.set(k, params.get(k));
  const cursors = [null];
  let nextCursor = null;
  let pageText = "";
  const limit = Number(params.get("limit") || 50);
  // A filter no index serves walks the project's tasks: refreshed less often.
  const slow = ROW_FILTERS.some((k) => params.get(k)) || (params.get("sort") && params.get("sort") !== "createdAt");

  async function loadList(force) {
    const gen = state.generation;
    const q = new URLSearchParams(query);
    q.set("limit", String(limit));
    const cur = cursors[cursors.length - 1];
    if (cur) q.set("cursor", cur);
    if (force) status.textContent = slow ? "Counting… (this filter reads every task of the project)" : "Loading…";
    const started = performance.now();
    const j = await get(`api/projects/${enc(p.id)}/tasks?${q}`);
    if (gen !== state.generation) return;
    const text = JSON.stringify([j.data, j.pagination]);
    nextCursor = j.pagination.nextCursor;
    prev.disabled = cursors.length <= 1;
    next.disabled = !nextCursor;
    const first = (cursors.length - 1) * limit;
    range.textContent = j.data.length
      ? `${fmt(first + 1)}–${fmt(first + j.data.length)} of ${fmt(j.pagination.total)}`
      : `0 of ${fmt(j.pagination.total)}`;
    status.textContent = `${fmt(j.pagination.total)} matching · refreshed ${new Date().toLocaleTimeString()} (${Math.round(performance.now() - started)} ms)`;
    if (!force && text === pageText) return;
    pageText = text;
    renderRows(j.data);
  }

  function renderRows(tasks) {
    if (!tasks.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: 9, class: "empty" }, "No task matches.")));
      return;
    }
    const visible = new Set(tasks.map((t) => t.id));
    for (const tid of [...selected]) if (!visible.has(tid)) selected.delete(tid);
    tbody.replaceChildren(...tasks.map((t) => h("tr", { "data-task": t.id },
      manage ? h("td", {}, h("input", {
        type: "checkbox", value: t.id, checked: selected.has(t.id), "aria-label": `Select task ${t.id}`,
        onchange: (ev) => { if (ev.target.checked) selected.add(t.id); else selected.delete(t.id); updateSelection(); },
      })) : null,
      h("td", { class: "id" }, h("a", { href: `#/tasks/${enc(t.id)}`, title: t.id }, t.id)),
      h("td", {}, badge(t.status)),
      h("td", { class: "hide-narrow" }, t.typeId ? typeName.get(t.typeId) || t.typeId : h("span", { class: "muted" }, "—")),
      h("td", { class: "num" }, t.priority),
      h("td", { class: "hide-narrow" }, t.assignedTo || h("span", { class: "muted" }, "—")),
      h("td", { class: "hide-narrow" }, t.progress ? progressBar(t.progress, true) : h("span", { class: "muted" }, "—")),
      h("td", {}, timeEl(t.createdAt)),
      h("td", { class: "hide-narrow" }, timeEl(t.updatedAt)),
    )));
    if (allBox) allBox.checked = tasks.every((t) => selected.has(t.id));
    updateSelection();
  }

  // Live: the counters are one cheap read; the page is read again only when they moved.
  let lastCounts = "";
  let lastSlow = 0;
  await live(async () => {
    const s = await get(`api/projects/${enc(p.id)}/stats`);
    const fp = JSON.stringify([s.data.project.stats, s.data.recentActivity.tasksCompletedLastHour, s.data.recentActivity.tasksFailedLastHour, s.data.status]);
    if (fp !== lastCounts) {
      countsBox.replaceChildren(counts(s.data.project.stats));
      const due = !slow || Date.now() - lastSlow > 10 * POLL_MS;
      if (lastCounts === "" || due) {
        lastSlow = Date.now();
        await loadList(lastCounts === "");
      }
      lastCounts = fp;
    }
  });
}

function toLocalInput(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return "";
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function progressBar(pr, compact) {
  const label = `${fmt(pr.current)} / ${fmt(pr.total)}${pr.message && !compact ? ` — ${pr.message}` : ""}`;
  return h("div", { class: "progress" },
    h("progress", { max: Math.max(pr.total, 1), value: Math.min(pr.current, Math.max(pr.total, 1)), "aria-label": `Progress ${label}` }),
    h("span", { class: "muted" }, label));
}

async function createTaskDialog(p) {
  const types = await typesOf(p.id, true);
  const varsBox = h("div", { class: "row", id: "new-vars" });
  const typeSel = h("select", { id: "new-type", name: "typeId" }, h("option", { value: "" }, "No type"),
    types.map((t) => h("option", { value: t.id }, t.name)));
  const instructions = h("textarea", { id: "new-instructions", name: "instructions" });
  const instrHelp = h("p", { class: "muted", id: "new-instructions-help" });
  const priority = h("input", { id: "new-priority", name: "priority", type: "number", min: 0, max: 10, value: 0 });
  const batch = h("input", { id: "new-batch", name: "batchId", placeholder: "optional" });
  const error = h("div", { class: "alert", role: "alert", hidden: true });
  const showVars = () => {
    const t = types.find((x) => x.id === typeSel.value);
    varsBox.replaceChildren(...(t ? t.variables : []).map((v) =>
      h("label", { for: `var-${v}` }, v, h("input", { id: `var-${v}`, "data-var": v, required: true }))));
    instrHelp.textContent = t && t.template
      ? "Leave empty: the instructions are the type's template with these variables."
      : "What the agent should do.";
  };
  typeSel.addEventListener("change", showVars);
  showVars();
  const dlg = h("dialog", { "aria-labelledby": "new-title" });
  const form = h("form", { onsubmit: async (ev) => {
    ev.preventDefault();
    const body = { priority: Number(priority.value || 0) };
    if (typeSel.value) body.typeId = typeSel.value;
    if (instructions.value.trim()) body.instructions = instructions.value;
    if (batch.value.trim()) body.batchId = batch.value.trim();
    const vars = {};
    for (const el of varsBox.querySelectorAll("input[data-var]")) vars[el.dataset.var] = el.value;
    if (Object.keys(vars).length) body.variables = vars;
    try {
      const j = await api("POST", `api/projects/${enc(p.id)}/tasks`, body);
      dlg.close();
      dlg.remove();
      notify(`Task ${j.data.id} created.`);
      route();
    } catch (e) {
      error.textContent = e.message;
      error.hidden = false;
    }
  } },
  h("h2", { id: "new-title" }, `New task in ${p.name}`),
  h("label", { for: "new-type" }, "Task type", typeSel),
  varsBox,
  h("label", { for: "new-instructions" }, "Instructions", instructions), instrHelp,
  h("div", { class: "row" }, h("label", { for: "new-priority" }, "Priority (0-10)", priority), h("label", { for: "new-batch" }, "Batch", batch)),
  error,
  h("div", { class: "row" },
    h("button", { type: "submit", class: "primary" }, "Create task"),
    h("button", { type: "button", onclick: () => { dlg.close(); dlg.remove(); } }, "Cancel")));
  dlg.append(form);
  document.body.append(dlg);
  dlg.addEventListener("close", () => dlg.remove());
  dlg.showModal();
  typeSel.focus();
}

// ---------------------------------------------------------------- task

async function taskPage(id) {
  let t = (await get(`api/tasks/${enc(id)}`)).data;
  const p = state.projects.get(t.projectId) || await project(t.projectId);
  const types = await typesOf(p.id).catch(() => []);
  crumbs([{ text: "Projects", href: "#/" }, { text: p.name, href: `#/projects/${enc(p.id)}` }, { text: `Task ${t.id}` }]);
  const body = h("div", {});
  setMain(body);
  let attempts = [];
  const loadAttempts = async () => {
    attempts = (await get(`api/tasks/${enc(id)}/attempts?limit=100`)).data;
  };
  await loadAttempts();
  const render = () => body.replaceChildren(...taskView(t, p, types, attempts));
  render();
  let seen = t.updatedAt;
  await live(async () => {
    const fresh = (await get(`api/tasks/${enc(id)}`)).data;
    if (fresh.updatedAt !== seen || fresh.progress?.current !== t.progress?.current) {
      t = fresh;
      seen = fresh.updatedAt;
      await loadAttempts();
      render();
    }
  });
}

function taskView(t, p, types, attempts) {
  const type = types.find((x) => x.id === t.typeId);
  const actions = [];
  if (can("tasks", p.id)) {
    const act = (label, what, enabled, cls) => h("button", {
      type: "button", id: `task-${what}`, class: cls, disabled: !enabled,
      title: enabled ? null : `A ${t.status} task cannot be ${what === "cancel" ? "cancelled" : what === "retry" ? "retried" : "deleted"}`,
      onclick: async () => {
        try {
          if (what === "delete") {
            if (!confirm(`Delete task ${t.id}? This cannot be undone.`)) return;
            await api("DELETE", `api/tasks/${enc(t.id)}`);
            notify(`Task ${t.id} deleted.`);
            location.hash = `#/projects/${enc(p.id)}`;
            return;
          }
          await api("POST", `api/tasks/${enc(t.id)}/${what}`, {});
          notify(what === "cancel" ? "Task cancelled." : "Task queued again.");
          route();
        } catch (e) { notify(e.message, "error"); }
      },
    }, label);
    actions.push(
      act("Cancel", "cancel", ["queued", "running"].includes(t.status)),
      act("Retry", "retry", ["failed", "cancelled"].includes(t.status)),
      act("Delete", "delete", true, "danger"),
    );
  }
  const dd = (label, value) => [h("dt", {}, label), h("dd", {}, value ?? h("span", { class: "muted" }, "—"))];
  const vars = Object.entries(t.variables || {});
  return [
    h("h1", {}, h("span", { class: "id" }, `Task ${t.id}`), badge(t.status)),
    actions.length ? h("div", { class: "toolbar" }, actions) : null,
    h("div", { class: "cols" },
      h("div", {},
        h("h2", {}, "Instructions"), h("pre", { id: "instructions" }, t.instructions || "(none)"),
        vars.length ? [h("h2", {}, "Variables"), h("div", { class: "table-wrap" }, h("table", { class: "vars" },
          h("tbody", {}, vars.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v))))))] : null,
        t.error ? [h("h2", {}, "Error"), h("pre", { class: "alert", id: "error" }, t.error)] : null,
        t.result != null ? [h("h2", {}, "Result"), h("pre", { id: "result" }, t.result)] : null,
        t.outputs != null ? [h("h2", {}, "Outputs"), h("pre", { id: "outputs" }, JSON.stringify(t.outputs, null, 2))] : null,
        t.script ? [h("h2", {}, `Script (${t.script.type}, timeout ${t.script.timeoutSeconds} s)`),
          t.script.content != null ? h("pre", {}, t.script.content) : h("p", { class: "muted" }, `${fmt(t.script.size || 0)} bytes`)] : null,
        h("h2", {}, `Attempts (${attempts.length})`),
        attempts.length ? h("ol", { class: "timeline", id: "attempts" }, attempts.map(attemptItem))
          : h("p", { class: "muted" }, "No agent has taken this task yet."),
      ),
      h("div", {},
        h("h2", {}, "Details"),
        h("div", { class: "panel" }, h("dl", { class: "kv" },
          dd("Project", h("a", { href: `#/projects/${enc(p.id)}` }, p.name)),
          dd("Type", type ? type.name : t.typeId),
          dd("Priority", String(t.priority)),
          dd("Agent", t.assignedTo),
          dd("Lease expires", t.leaseExpiresAt ? timeEl(t.leaseExpiresAt) : null),
          dd("Retries", `${t.retryCount} of ${t.maxRetries}`),
          dd("Batch", t.batchId),
          dd("Not before", t.notBefore ? timeEl(t.notBefore) : null),
          dd("Created", timeEl(t.createdAt)),
          dd("Updated", timeEl(t.updatedAt)),
          dd("Started", t.startedAt ? timeEl(t.startedAt) : null),
          dd("Completed", t.completedAt ? timeEl(t.completedAt) : null),
          dd("Cancelled", t.cancelledAt ? [timeEl(t.cancelledAt), t.cancelReason ? ` — ${t.cancelReason}` : ""] : null),
        )),
        h("h2", {}, "Progress"),
        t.progress ? h("div", { class: "panel", id: "progress" }, progressBar(t.progress, false)) : h("p", { class: "muted" }, "None reported."),
      ),
    ),
  ];
}

function attemptItem(a) {
  const e = a.execution;
  const span = a.endedAt ? duration((Date.parse(a.endedAt) - Date.parse(a.startedAt)) / 1000) : "running";
  return h("li", { class: `o-${a.outcome}` },
    h("div", { class: "head" }, h("b", {}, `#${a.attempt}`), badge(a.outcome), h("span", {}, a.agentName),
      h("span", { class: "muted" }, timeEl(a.startedAt), " → ", a.endedAt ? timeEl(a.endedAt) : "now", ` (${span})`)),
    a.error ? h("div", { class: "muted" }, a.error) : null,
    e ? h("div", {},
      h("div", { class: "muted" }, `exit code ${e.exitCode} · ${fmt(e.durationMs)} ms`),
      e.stdoutTail ? h("details", {}, h("summary", {}, "stdout (tail)"), h("pre", {}, e.stdoutTail)) : null,
      e.stderrTail ? h("details", {}, h("summary", {}, "stderr (tail)"), h("pre", {}, e.stderrTail)) : null) : null);
}

// ---------------------------------------------------------------- agents and types

async function agentsPage(id) {
  const p = await project(id);
  crumbs([{ text: "Projects", href: "#/" }, { text: p.name, href: `#/projects/${enc(p.id)}` }, { text: "Agents" }]);
  const tbody = h("tbody", {});
  const note = h("p", { class: "muted" }, "Agents holding a lease in this project. Last seen is the agent's last call to this server (next-task, heartbeat, progress, complete or fail).");
  setMain(...projectHeader(p, "agents"), note, h("div", { class: "table-wrap" }, h("table", { id: "agents" },
    h("thead", {}, h("tr", {}, ["Agent", "Task", "Since", "Lease left", "Last seen"].map((c) => h("th", { scope: "col" }, c)))),
    tbody)));
  await live(async () => {
    const j = await get(`api/projects/${enc(p.id)}/agents?limit=100`);
    if (!j.data.length) {
      tbody.replaceChildren(h("tr", {}, h("td", { colspan: 5, class: "empty" }, "No agent holds a task of this project now.")));
      return;
    }
    tbody.replaceChildren(...j.data.map((a) => {
      const left = (Date.parse(a.leaseExpiresAt) - Date.now()) / 1000;
      return h("tr", {},
        h("td", {}, a.agentName),
        h("td", { class: "id" }, h("a", { href: `#/tasks/${enc(a.taskId)}` }, a.taskId)),
        h("td", {}, timeEl(a.assignedAt)),
        h("td", { class: left < 60 ? "lease-low" : "", title: exact(a.leaseExpiresAt) }, left > 0 ? duration(left) : "expired"),
        h("td", {}, timeEl(a.lastSeenAt)));
    }));
  });
}

async function typesPage(id) {
  const p = await project(id);
  const types = await typesOf(p.id, true);
  crumbs([{ text: "Projects", href: "#/" }, { text: p.name, href: `#/projects/${enc(p.id)}` }, { text: "Task types" }]);
  const c = p.config;
  setMain(...projectHeader(p, "types"),
    types.length ? h("div", { class: "grid", id: "types" }, types.map((t) => h("article", { class: "panel card", "aria-label": `Task type ${t.name}` },
      h("h2", {}, t.name),
      h("dl", { class: "kv" },
        h("dt", {}, "Variables"), h("dd", {}, t.variables.length ? t.variables.join(", ") : h("span", { class: "muted" }, "none")),
        h("dt", {}, "Max retries"), h("dd", {}, t.maxRetries ?? `${c.defaultMaxRetries} (project default)`),
        h("dt", {}, "Lease"), h("dd", {}, `${t.leaseDurationMinutes ?? c.defaultLeaseDurationMinutes} min${t.leaseDurationMinutes == null ? " (project default)" : ""}`),
        h("dt", {}, "Retry delay"), h("dd", {}, `${t.retryDelaySeconds} s, ×${t.backoffMultiplier} each retry`),
        h("dt", {}, "Duplicates"), h("dd", {}, t.duplicateHandling),
        h("dt", {}, "Script"), h("dd", {}, t.script ? `${t.script.type}, timeout ${t.script.timeoutSeconds} s` : h("span", { class: "muted" }, "none")),
        h("dt", {}, "Updated"), h("dd", {}, timeEl(t.updatedAt))),
      t.template ? [h("h3", {}, "Template"), h("pre", {}, t.template)] : null)))
      : h("div", { class: "panel empty" }, "This project has no task types."));
}

// ---------------------------------------------------------------- start

$("#signout").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
route();

// The dispatcher's dashboard: reads the replica's REST routes (Flink's shapes plus our
// fields) every 2 s with the signed-in token, renders jobs, a job's DAG and tasks,
// TaskManagers and the cluster. No framework, no build step. Builds the DOM with
// createElement (the page's CSP allows no inline scripts or styles).
"use strict";

const POLL_MS = 2000;
const TOKEN_KEY = "dispatcher.token";
const TERMINAL = new Set(["FINISHED", "CANCELED", "FAILED"]);
const JOB_STATES = ["CREATED", "RUNNING", "RESTARTING", "FAILING", "CANCELLING", "FINISHED", "CANCELED", "FAILED"];
const TASK_ORDER = ["FINISHED", "RUNNING", "DEPLOYING", "SCHEDULED", "CREATED", "CANCELING", "CANCELED", "FAILED"];

const state = { filter: { state: "", name: "" }, timer: null, busy: false };

// ---- DOM helpers -------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

function pill(s) {
  return h("span", { class: "pill s-" + String(s).toLowerCase() }, s);
}

function fmtTime(ms) {
  if (!ms || ms < 0) return "—";
  const d = new Date(ms);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
}

function fmtDuration(ms) {
  if (ms === undefined || ms < 0) return "—";
  const s = Math.floor(ms / 1000);
  if (s < 60) return s + "s";
  const m = Math.floor(s / 60);
  if (m < 60) return m + "m " + (s % 60) + "s";
  const hr = Math.floor(m / 60);
  if (hr < 24) return hr + "h " + (m % 60) + "m";
  return Math.floor(hr / 24) + "d " + (hr % 24) + "h";
}

function shortId(id) {
  return id.slice(0, 8);
}

// A stacked bar of task counts by state.
function taskBar(counts, total) {
  const bar = h("div", { class: "taskbar", title: TASK_ORDER.filter((s) => counts[s]).map((s) => counts[s] + " " + s.toLowerCase()).join(", ") });
  if (!total) return bar;
  for (const s of TASK_ORDER) {
    const n = counts[s] || 0;
    if (!n) continue;
    bar.append(h("i", { class: "s-" + s.toLowerCase(), style: { width: (100 * n / total) + "%" } }));
  }
  return bar;
}

// ---- API -----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options) {
  const headers = { Accept: "application/json" };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, Object.assign({ headers, cache: "no-store" }, options || {}));
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    body = null;
  }
  if (!resp.ok) {
    const msg = body && body.errors ? body.errors.join("; ") : resp.status + " " + resp.statusText;
    throw new ApiError(resp.status, msg);
  }
  return body;
}

// ---- Session ---------------------------------------------------------------------------

function showSignin(message) {
  $("signin").hidden = false;
  $("view").hidden = true;
  $("signin-error").textContent = message || "";
  $("token").focus();
}

function hideSignin() {
  $("signin").hidden = true;
  $("view").hidden = false;
}

function updateSession() {
  $("signout").hidden = !sessionStorage.getItem(TOKEN_KEY);
}

// A message above the page. `sticky`: the answer to something the user did, kept until
// they go to another page; otherwise (a failed poll) cleared by the next good one.
function notice(text, kind, sticky) {
  const n = $("notice");
  if (!text) {
    n.hidden = true;
    n.dataset.sticky = "";
    return;
  }
  n.hidden = false;
  n.className = "notice " + (kind || "error");
  n.dataset.sticky = sticky ? "1" : "";
  n.textContent = text;
}

// replaceChildren without the parts left out (null when a condition does not hold).
function fill(el, ...parts) {
  el.replaceChildren(...parts.flat().filter((p) => p !== null && p !== undefined && p !== false));
}

// ---- Views -----------------------------------------------------------------------------

async function renderStats() {
  const o = await api("/overview");
  const stats = $("stats");
  fill(stats, 
    h("span", { class: "stat" }, h("b", {}, o["jobs-running"]), " active"),
    h("span", { class: "stat" }, h("b", {}, o["jobs-finished"]), " finished"),
    h("span", { class: "stat" }, h("b", {}, o["taskmanagers"]), " TaskManagers"),
    h("span", { class: "stat" }, h("b", {}, (o["slots-total"] - o["slots-available"]) + "/" + o["slots-total"]), " slots used"),
  );
}

async function renderJobs(view) {
  const data = await api("/jobs/overview");
  const f = state.filter;
  const jobs = data.jobs.filter((j) => (!f.state || j.state === f.state) && (!f.name || j.name.toLowerCase().includes(f.name.toLowerCase())));
  const stateSelect = h("select", { id: "filter-state", "aria-label": "Filter by state", onchange: (e) => { f.state = e.target.value; refresh(); } },
    h("option", { value: "" }, "All states"),
    JOB_STATES.map((s) => h("option", { value: s, selected: f.state === s }, s.charAt(0) + s.slice(1).toLowerCase())));
  const nameInput = h("input", { id: "filter-name", type: "search", placeholder: "Filter by name", value: f.name, "aria-label": "Filter by name" });
  nameInput.addEventListener("input", (e) => { f.name = e.target.value; state.focusName = true; refresh(); });
  const counts = {};
  for (const j of data.jobs) counts[j.state] = (counts[j.state] || 0) + 1;
  const rows = jobs.map((j) => {
    const tasks = {};
    for (const [k, v] of Object.entries(j.tasks)) if (k !== "total") tasks[k.toUpperCase()] = v;
    return h("tr", { class: "clickable", dataset: { jid: j.jid }, onclick: () => { location.hash = "#/jobs/" + j.jid; } },
      h("td", {}, h("div", { class: "job-name" }, j.name), h("div", { class: "muted mono" }, shortId(j.jid))),
      h("td", {}, pill(j.state), j["pending-reason"] ? h("div", { class: "muted small", title: j["pending-reason"] }, "waiting for slots") : null),
      h("td", { class: "tasks-cell" }, taskBar(tasks, j.tasks.total), h("div", { class: "muted small" }, (tasks.RUNNING || 0) + " running · " + j.tasks.total + " total")),
      h("td", { class: "num" }, j.restarts || 0),
      h("td", {}, fmtTime(j["start-time"])),
      h("td", { class: "num" }, fmtDuration(j.duration)));
  });
  fill(view, 
    h("div", { class: "page-head" },
      h("h1", {}, "Jobs"),
      h("div", { class: "chips" }, Object.entries(counts).map(([s, n]) => h("span", { class: "chip" }, pill(s), " " + n))),
      h("div", { class: "filters" }, nameInput, stateSelect)),
    h("div", { class: "card" },
      jobs.length === 0
        ? h("div", { class: "empty" }, data.jobs.length ? "No job matches the filter." : "No jobs yet. Submit one with dispatchctl job submit FILE.")
        : h("table", { class: "table", id: "jobs-table" },
          h("thead", {}, h("tr", {}, h("th", {}, "Job"), h("th", {}, "State"), h("th", {}, "Tasks"), h("th", { class: "num" }, "Restarts"), h("th", {}, "Started"), h("th", { class: "num" }, "Duration"))),
          h("tbody", {}, rows))));
  // Keep the typing focus across re-renders.
  if (state.focusName) {
    nameInput.focus();
    nameInput.setSelectionRange(nameInput.value.length, nameInput.value.length);
    state.focusName = false;
  }
}

// Lays the job graph out in columns by depth and draws it as SVG.
function dag(job) {
  const nodes = job.plan.nodes;
  const byId = new Map(job.vertices.map((v) => [v.id, v]));
  const depth = new Map();
  const visit = (n, seen) => {
    if (depth.has(n.id)) return depth.get(n.id);
    if (seen.has(n.id)) return 0;
    seen.add(n.id);
    let d = 0;
    for (const i of n.inputs || []) {
      const up = nodes.find((x) => x.id === i.id);
      if (up) d = Math.max(d, visit(up, seen) + 1);
    }
    depth.set(n.id, d);
    return d;
  };
  nodes.forEach((n) => visit(n, new Set()));
  const cols = [];
  for (const n of nodes) (cols[depth.get(n.id)] ||= []).push(n);
  const W = 210, H = 78, GX = 70, GY = 24, PAD = 16;
  const pos = new Map();
  cols.forEach((col, c) => col.forEach((n, r) => pos.set(n.id, { x: PAD + c * (W + GX), y: PAD + r * (H + GY) })));
  const width = PAD * 2 + cols.length * W + (cols.length - 1) * GX;
  const height = PAD * 2 + Math.max(...cols.map((c) => c.length)) * (H + GY) - GY;
  const g = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "dag", role: "img", "aria-label": "Job graph" });
  g.append(svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" }, svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#94a3b8" }))));
  for (const n of nodes) {
    for (const i of n.inputs || []) {
      const a = pos.get(i.id), b = pos.get(n.id);
      if (!a || !b) continue;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x - 2, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      g.append(svg("path", { d: `M ${x1} ${y1} C ${mx} ${y1}, ${mx} ${y2}, ${x2} ${y2}`, class: "edge", "marker-end": "url(#arrow)" }));
    }
  }
  for (const n of nodes) {
    const v = byId.get(n.id);
    const p = pos.get(n.id);
    const st = v ? v.status : "CREATED";
    const grp = svg("g", { transform: `translate(${p.x},${p.y})`, class: "node s-" + st.toLowerCase() });
    grp.append(svg("rect", { width: W, height: H, rx: 10, class: "node-box" }));
    grp.append(svg("rect", { width: 6, height: H, rx: 3, class: "node-stripe" }));
    grp.append(svg("text", { x: 18, y: 24, class: "node-title" }, v ? v.name : n.id));
    grp.append(svg("text", { x: 18, y: 44, class: "node-sub" }, `${st} · parallelism ${n.parallelism}`));
    // Task bar inside the node.
    const total = v ? v.parallelism : 0;
    let x = 18;
    const bw = W - 36;
    if (v && total) {
      for (const s of TASK_ORDER) {
        const k = v.tasks[s] || 0;
        if (!k) continue;
        const w = bw * k / total;
        grp.append(svg("rect", { x, y: 56, width: Math.max(w - 1, 1), height: 8, rx: 2, class: "bar s-" + s.toLowerCase() }));
        x += w;
      }
    }
    g.append(grp);
  }
  return g;
}

async function renderJob(view, jid) {
  const [job, cps] = await Promise.all([api("/jobs/" + jid), api("/jobs/" + jid + "/checkpoints")]);
  const cancellable = !TERMINAL.has(job.state) && job.state !== "CANCELLING";
  const cancel = h("button", {
    type: "button", class: "danger", id: "cancel-job", disabled: !cancellable,
    onclick: async (e) => {
      if (!confirm(`Cancel job "${job.name}"?`)) return;
      e.target.disabled = true;
      try {
        await api("/jobs/" + jid + "?mode=cancel", { method: "PATCH" });
        notice("Cancellation requested for " + job.name + ".", "ok", true);
      } catch (err) {
        notice(err.status === 403 ? "This token may not cancel jobs (needs role submit or admin): " + err.message : "Cancel failed: " + err.message, "error", true);
      }
      refresh();
    },
  }, "Cancel job");
  const tasks = [];
  for (const v of job.vertices) for (const t of v.subtasks) tasks.push([v, t]);
  const taskRows = tasks.map(([v, t]) => h("tr", { dataset: { vertex: v.name, subtask: t.subtask } },
    h("td", {}, v.name), h("td", { class: "num" }, t.subtask), h("td", {}, pill(t.status)),
    h("td", { class: "num" }, t.attempt + 1), h("td", { class: "mono" }, t["taskmanager-id"] || "—"),
    h("td", { class: "num" }, t.slot === null || t.slot === undefined ? "—" : t.slot),
    h("td", {}, fmtTime(t["last-modification"])),
    h("td", { class: "muted small" }, t["failure-cause"] || (t["exit-code"] !== null && t["exit-code"] !== undefined ? "exit " + t["exit-code"] : ""))));
  const history = cps.history || [];
  const facts = [
    ["Job ID", h("span", { class: "mono" }, job.jid), "wide"],
    ["Started", fmtTime(job["start-time"])],
    ["Ended", fmtTime(job["end-time"])],
    ["Duration", fmtDuration(job.duration)],
    ["Restarts", job.restarts],
    ["Priority", job.priority],
    ["Next checkpoint", cps["next-checkpoint-id"]],
  ];
  fill(view, 
    h("div", { class: "page-head" },
      h("div", {}, h("a", { href: "#/jobs", class: "back" }, "← Jobs"), h("h1", {}, job.name, " ", pill(job.state))),
      h("div", { class: "actions" }, cancel)),
    job["failure-cause"] ? h("div", { class: "notice error" }, "Failure: " + job["failure-cause"]) : null,
    job["pending-reason"] ? h("div", { class: "notice warn" }, "Waiting for slots: " + job["pending-reason"]) : null,
    h("div", { class: "card facts" }, facts.map(([k, v, wide]) => h("div", { class: wide || "" }, h("div", { class: "muted small" }, k), h("div", { class: "fact" }, v)))),
    h("div", { class: "card" }, h("h2", {}, "Job graph"), h("div", { class: "dag-wrap" }, dag(job))),
    h("div", { class: "card" }, h("h2", {}, "Tasks"),
      h("table", { class: "table", id: "tasks-table" },
        h("thead", {}, h("tr", {}, ["Vertex", "Subtask", "State", "Attempt", "TaskManager", "Slot", "Last change", "Detail"].map((c) => h("th", {}, c)))),
        h("tbody", {}, taskRows))),
    h("div", { class: "card" }, h("h2", {}, "Checkpoints"),
      history.length === 0 ? h("div", { class: "empty" }, "No completed checkpoint recorded.")
        : h("table", { class: "table" },
          h("thead", {}, h("tr", {}, h("th", {}, "ID"), h("th", {}, "Completed"), h("th", {}, "Location"))),
          h("tbody", {}, history.map((c) => h("tr", {}, h("td", { class: "num" }, c.id), h("td", {}, fmtTime(c.latest_ack_timestamp)), h("td", { class: "mono" }, c.external_path)))))));
}

async function renderTaskManagers(view) {
  const data = await api("/taskmanagers");
  const jobs = await api("/jobs/overview");
  const names = new Map(jobs.jobs.map((j) => [j.jid, j.name]));
  const cards = data.taskmanagers.map((t) => {
    const used = t.slotsNumber - t.freeSlots;
    const bySlot = new Map(t.allocatedSlots.map((s) => [s.slot, s]));
    const slots = [];
    for (let i = 0; i < t.slotsNumber; i++) {
      const s = bySlot.get(i);
      slots.push(s
        ? h("a", { class: "slot used", href: "#/jobs/" + s.jobId, title: `slot ${i}: ${names.get(s.jobId) || s.jobId} / ${s.vertex} #${s.subtask}` }, h("b", {}, i), h("span", {}, s.vertex + " #" + s.subtask))
        : h("div", { class: "slot free", title: `slot ${i}: free` }, h("b", {}, i), h("span", {}, "free")));
    }
    return h("div", { class: "card tm", dataset: { tm: t.id } },
      h("div", { class: "tm-head" }, h("h2", {}, t.id), h("span", { class: "muted" }, used + " / " + t.slotsNumber + " slots used")),
      h("div", { class: "meter" }, h("i", { style: { width: (t.slotsNumber ? 100 * used / t.slotsNumber : 0) + "%" } })),
      h("div", { class: "muted small" }, (t.address || "no address"), " · registered ", fmtTime(t["registered-at"])),
      Object.keys(t.labels || {}).length ? h("div", { class: "labels" }, Object.entries(t.labels).map(([k, v]) => h("span", { class: "label" }, k + "=" + v))) : null,
      h("div", { class: "slots" }, slots));
  });
  fill(view, 
    h("div", { class: "page-head" }, h("h1", {}, "TaskManagers")),
    cards.length ? h("div", { class: "grid" }, cards) : h("div", { class: "card empty" }, "No TaskManager is registered."));
}

async function renderCluster(view) {
  const c = await api("/dispatcher/cluster");
  const leader = c.replicas.find((r) => r.id === c["leader-id"]);
  const rows = c.replicas.map((r) => h("tr", { class: r.id === c["leader-id"] ? "leader" : "" },
    h("td", { class: "num" }, r.id),
    h("td", { class: "mono" }, r.address),
    h("td", {}, h("span", { class: "role r-" + r.role.toLowerCase() }, r.role.toLowerCase())),
    h("td", { class: "num" }, r.reachable ? r.term : "—"),
    h("td", { class: "num" }, r.reachable ? r["last-log-index"] : "—"),
    h("td", { class: "num" }, r.reachable ? r["applied-index"] : "—"),
    h("td", { class: "num" }, r.reachable ? r.lag : "—"),
    h("td", {}, h("span", { class: "health " + (r.healthy ? "ok" : "bad") }, r.healthy ? "healthy" : (r.reachable ? "no leader" : "unreachable")))));
  fill(view, 
    h("div", { class: "page-head" }, h("h1", {}, "Cluster")),
    h("div", { class: "card facts" },
      h("div", {}, h("div", { class: "muted small" }, "Leader"), h("div", { class: "fact" }, leader ? `replica ${leader.id}` : "none known")),
      h("div", {}, h("div", { class: "muted small" }, "Term"), h("div", { class: "fact" }, leader ? leader.term : "—")),
      h("div", {}, h("div", { class: "muted small" }, "Replicas"), h("div", { class: "fact" }, c.replicas.filter((r) => r.healthy).length + " / " + c.replicas.length + " healthy")),
      h("div", {}, h("div", { class: "muted small" }, "Answered by"), h("div", { class: "fact" }, "replica " + c["responder-id"]))),
    h("div", { class: "card" },
      h("table", { class: "table", id: "replicas-table" },
        h("thead", {}, h("tr", {}, ["ID", "Address", "Role", "Term", "Last log", "Applied", "Lag", "Health"].map((t) => h("th", {}, t)))),
        h("tbody", {}, rows))));
}

// ---- Routing and polling ---------------------------------------------------------------

function route() {
  const parts = (location.hash || "#/jobs").slice(2).split("/");
  return { tab: parts[0] || "jobs", id: parts[1] };
}

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  const r = route();
  for (const a of document.querySelectorAll("#tabs a")) a.classList.toggle("active", a.dataset.tab === r.tab);
  const view = $("view");
  view.dataset.page = r.tab + (r.id ? "-detail" : "");
  try {
    await renderStats();
    if (r.tab === "jobs" && r.id) await renderJob(view, r.id);
    else if (r.tab === "taskmanagers") await renderTaskManagers(view);
    else if (r.tab === "cluster") await renderCluster(view);
    else await renderJobs(view);
    hideSignin();
    $("live").classList.remove("stale");
    if ($("notice").dataset.sticky !== "1") notice("");
  } catch (err) {
    if (err.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      updateSession();
      showSignin(sessionStorage.getItem(TOKEN_KEY) ? err.message : "");
    } else if (err.status === 403) {
      notice("This token may not read the cluster: " + err.message);
    } else {
      $("live").classList.add("stale");
      notice("Could not reach the replica: " + err.message);
    }
  } finally {
    state.busy = false;
    updateSession();
  }
}

function start() {
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const token = $("token").value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token").value = "";
    notice("");
    try {
      await api("/overview");
      hideSignin();
      refresh();
    } catch (err) {
      sessionStorage.removeItem(TOKEN_KEY);
      showSignin(err.status === 401 ? "The cluster does not know this token." : err.message);
    }
  });
  $("signout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    notice("");
    updateSession();
    showSignin("");
  });
  window.addEventListener("hashchange", () => { notice(""); refresh(); });
  refresh();
  state.timer = setInterval(() => {
    if (!$("signin").hidden) return;
    // Do not re-render under a user typing in the name filter.
    if (document.activeElement && document.activeElement.id === "filter-name") {
      state.focusName = true;
    }
    refresh();
  }, POLL_MS);
}

document.addEventListener("DOMContentLoaded", start);

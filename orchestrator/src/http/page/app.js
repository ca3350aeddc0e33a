// The jetsaga operator page: a client of the /v1 API, nothing more.
"use strict";

const $ = (id) => document.getElementById(id);
let settings = { jaeger_url: null };
let listCursor = null;
let deadCursor = null;

function token() {
  return localStorage.getItem("jetsaga-token") || "";
}

function say(text, isError) {
  const m = $("message");
  m.textContent = text || "";
  m.className = isError ? "error" : "";
}

async function api(method, path, body) {
  const headers = {};
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const value = text ? JSON.parse(text) : null;
  if (!response.ok) {
    const e = (value && value.error) || { code: "http_" + response.status, message: text };
    const state = e.state ? " (the saga is " + e.state + ")" : "";
    throw new Error(e.message + " [" + e.code + "]" + state);
  }
  return value;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function show(view) {
  for (const id of ["list-view", "saga-view", "dead-view"]) $(id).hidden = id !== view;
}

async function loadTypes() {
  const defs = await api("GET", "/v1/definitions");
  const select = $("type");
  const seen = new Set();
  for (const d of defs.definitions) {
    if (seen.has(d.name)) continue;
    seen.add(d.name);
    const option = document.createElement("option");
    option.textContent = d.name;
    select.appendChild(option);
  }
}

function listQuery() {
  const params = new URLSearchParams();
  if ($("type").value) params.set("type", $("type").value);
  if ($("state").value) params.set("state", $("state").value);
  if ($("stuck").checked) params.set("stuck", "true");
  return params;
}

async function loadList(append) {
  const params = listQuery();
  if (append && listCursor) params.set("cursor", listCursor);
  const page = await api("GET", "/v1/sagas?" + params.toString());
  const body = $("sagas");
  if (!append) body.textContent = "";
  for (const s of page.items) {
    const row = document.createElement("tr");
    row.dataset.id = s.saga_id;
    row.dataset.state = s.state;
    const link = document.createElement("a");
    link.href = "#/saga/" + encodeURIComponent(s.saga_id);
    link.className = "saga-link";
    link.textContent = s.saga_id;
    cell(row, "").appendChild(link);
    cell(row, s.saga_type);
    cell(row, s.key);
    const state = cell(row, s.state, "state-" + s.state);
    if (s.stuck) {
      const flag = document.createElement("span");
      flag.className = "stuck";
      flag.textContent = "stuck";
      state.appendChild(flag);
    }
    cell(row, s.current_step);
    cell(row, s.updated_at);
    body.appendChild(row);
  }
  listCursor = page.next_cursor;
  $("more").hidden = !listCursor;
  say(body.children.length ? "" : "no sagas match");
}

function fact(list, name, value, href) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  if (href) {
    const a = document.createElement("a");
    a.href = href;
    a.textContent = value;
    a.target = "_blank";
    dd.appendChild(a);
  } else {
    dd.textContent = value === null || value === undefined ? "–" : String(value);
  }
  dd.id = "saga-" + name.replace(/ /g, "-");
  list.append(dt, dd);
}

async function loadSaga(id) {
  const saga = await api("GET", "/v1/sagas/" + encodeURIComponent(id));
  const journal = await api("GET", "/v1/sagas/" + encodeURIComponent(id) + "/journal");
  $("saga-id").textContent = saga.saga_id;
  const facts = $("saga-facts");
  facts.textContent = "";
  fact(facts, "state", saga.state);
  fact(facts, "type", saga.saga_type + " v" + saga.version);
  fact(facts, "key", saga.key);
  fact(facts, "step", saga.current_step
    ? saga.current_step + (saga.attempt ? " (attempt " + saga.attempt + ")" : "") : null);
  if (saga.cause) fact(facts, "cause", saga.cause.code + ": " + saga.cause.message);
  if (saga.error) fact(facts, "error", saga.error.code + ": " + saga.error.message);
  fact(facts, "created", saga.created_at);
  fact(facts, "updated", saga.updated_at);
  fact(facts, "deadline", saga.deadline_at);
  const traceHref = saga.trace_id && settings.jaeger_url
    ? settings.jaeger_url.replace(/\/$/, "") + "/trace/" + saga.trace_id : null;
  fact(facts, "trace", saga.trace_id, traceHref);
  const steps = $("steps");
  steps.textContent = "";
  for (const s of saga.steps) {
    const row = document.createElement("tr");
    cell(row, s.name);
    cell(row, s.status);
    cell(row, s.attempts);
    cell(row, s.compensation_attempts);
    cell(row, s.error ? s.error.code + ": " + s.error.message : null);
    cell(row, s.started_at);
    cell(row, s.finished_at);
    steps.appendChild(row);
  }
  const timeline = $("timeline");
  timeline.textContent = "";
  for (const e of journal.entries) {
    const li = document.createElement("li");
    li.dataset.cause = e.cause;
    const when = document.createElement("div");
    when.className = "when";
    const by = e.operator ? "operator " + e.operator : e.actor;
    when.textContent = "#" + e.seq + " " + e.at + " by " + by;
    const what = document.createElement("div");
    what.textContent = e.cause + (e.step ? " · " + e.step : "") + " · "
      + (e.from || "–") + " → " + e.to + (e.error ? " · " + e.error : "");
    li.append(when, what);
    timeline.appendChild(li);
  }
  $("retry").disabled = saga.state !== "failed";
  $("abort").disabled = saga.state !== "running";
  $("retry").dataset.id = saga.saga_id;
  $("abort").dataset.id = saga.saga_id;
}

async function loadDead(append) {
  const params = new URLSearchParams();
  if (append && deadCursor) params.set("cursor", deadCursor);
  const page = await api("GET", "/v1/dead-letters?" + params.toString());
  const body = $("dead-letters");
  if (!append) body.textContent = "";
  for (const d of page.items) {
    const row = document.createElement("tr");
    row.dataset.id = d.id;
    cell(row, d.id);
    cell(row, d.source);
    cell(row, d.subject);
    cell(row, d.reason);
    cell(row, d.at);
    const button = document.createElement("button");
    button.textContent = "Redrive";
    button.className = "redrive";
    button.onclick = () => act(async () => {
      const r = await api("POST", "/v1/dead-letters/" + d.id + "/redrive");
      say("dead letter " + r.id + " redriven to " + r.subject);
    });
    cell(row, "").appendChild(button);
    body.appendChild(row);
  }
  deadCursor = page.next_cursor;
  $("dead-more").hidden = !deadCursor;
  if (!body.children.length) say("no dead letters");
}

async function act(work) {
  try {
    await work();
  } catch (e) {
    say(e.message, true);
  }
}

async function route() {
  const hash = location.hash || "#/";
  say("");
  await act(async () => {
    if (hash.startsWith("#/saga/")) {
      show("saga-view");
      await loadSaga(decodeURIComponent(hash.slice("#/saga/".length)));
    } else if (hash === "#/dead-letters") {
      show("dead-view");
      await loadDead(false);
    } else {
      show("list-view");
      await loadList(false);
    }
  });
}

$("save-token").onclick = () => {
  localStorage.setItem("jetsaga-token", $("token").value.trim());
  $("token").value = "";
  route();
};
$("apply").onclick = () => act(() => loadList(false));
$("more").onclick = () => act(() => loadList(true));
$("dead-more").onclick = () => act(() => loadDead(true));
$("retry").onclick = () => act(async () => {
  const r = await api("POST", "/v1/sagas/" + encodeURIComponent($("retry").dataset.id) + "/retry");
  say("retried: the saga is " + r.state);
  await loadSaga(r.saga_id);
});
$("abort").onclick = () => act(async () => {
  const reason = $("abort-reason").value.trim() || "aborted from the web page";
  const r = await api("POST", "/v1/sagas/" + encodeURIComponent($("abort").dataset.id) + "/abort", { reason });
  say("aborted: the saga is " + r.state);
  await loadSaga(r.saga_id);
});
window.addEventListener("hashchange", route);

(async () => {
  try {
    settings = await api("GET", "/page/settings.json");
  } catch (e) { /* defaults */ }
  await act(loadTypes);
  await route();
})();

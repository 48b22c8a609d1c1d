// kvsleep status page: redraws the table server-rendered by kvsleep/status_page.py from
// /sleep/status every REFRESH_MS, and calls the control routes for Sleep, Wake, adopt and logs.
// No framework, no build step, nothing loaded from elsewhere. Every value goes in through
// textContent, never innerHTML: model names and errors come from config files and engines.
"use strict";

const REFRESH_MS = 2000;
const TOKEN_KEY = "kvsleep.adminToken"; // sessionStorage only: gone when the tab closes
const LOG_LINES = 200;

const $ = (id) => document.getElementById(id);

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  if (seconds > 0 && seconds < 1) return "<1s";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s`;
  if (s < 3600) return s % 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s / 60}m`;
  const m = Math.floor((s % 3600) / 60);
  return m ? `${Math.floor(s / 3600)}h ${m}m` : `${Math.floor(s / 3600)}h`;
}

function idleText(m) {
  const idle = m.idle_seconds === null || m.idle_seconds === undefined ? "-" : duration(m.idle_seconds);
  const text = `${idle} / ${duration(m.idle_threshold_seconds)}`;
  if (m.always_on) return `${text} (always on)`;
  if (m.auto_sleep_enabled === false) return `${text} (auto-sleep off)`;
  return text;
}

function etaText(m) {
  const eta = m.wake_eta_seconds;
  let text;
  if (eta === null || eta === undefined) text = "-";
  else if (m.state === "waking") {
    text = `${duration(Math.max(0, eta - m.seconds_in_state))} left of ${duration(eta)}`;
  } else text = duration(eta);
  if (m.waiting_for_memory) text += ` (waiting for memory: ${m.waiting_for_memory})`;
  return text;
}

function problemText(m) {
  const parts = m.cannot_sleep ? [`cannot sleep: ${m.cannot_sleep}`] : [];
  if (m.last_error) parts.push(m.last_error);
  return parts.join("; ");
}

function cell(text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  return td;
}

// Buttons that would do nothing in these states are disabled (as status_page.py renders them).
// In `unknown` kvsleep calls nothing until an operator says what the engine is: the row offers
// that instead (POST models/{model}/adopt?state=asleep|awake).
const NO_SLEEP = ["asleep", "sleeping", "unknown"];
const NO_WAKE = ["awake", "waking", "unknown"];
const ADOPT_IN = "unknown";
const ADOPT = [["asleep", "Engine is asleep"], ["awake", "Engine is awake"]];

function button(action, label, disabled) {
  const b = document.createElement("button");
  b.type = "button";
  b.dataset.action = action;
  b.textContent = label;
  b.disabled = disabled;
  return b;
}

function row(name, m) {
  const tr = document.createElement("tr");
  tr.dataset.model = name;
  tr.dataset.state = m.state;
  tr.append(cell(name, "model"));
  const state = document.createElement("span");
  state.className = `state state-${m.state}`;
  state.textContent = m.state;
  const stateCell = cell("");
  stateCell.append(state);
  tr.append(stateCell, cell(m.engine), cell(idleText(m), "idle"),
            cell(String(m.in_flight), "num"), cell(String(m.held_requests), "num"),
            cell(etaText(m), "eta"), cell(problemText(m), "error"));
  const actions = cell("", "actions");
  actions.append(button("sleep", "Sleep", NO_SLEEP.includes(m.state)), " ",
                 button("wake", "Wake", NO_WAKE.includes(m.state)));
  if (m.state === ADOPT_IN) {
    const adopt = document.createElement("span");
    adopt.className = "adopt";
    for (const [value, label] of ADOPT) {
      const b = button("adopt", label, false);
      b.className = "adopt";
      b.dataset.adopt = value;
      adopt.append(" ", b);
    }
    actions.append(adopt);
  }
  if (m.launched) {
    const a = document.createElement("a");
    a.className = "logs";
    a.href = `logs/${encodeURIComponent(name)}`;
    a.textContent = "logs";
    actions.append(" ", a);
  }
  tr.append(actions);
  return tr;
}

function gpu(id, g) {
  const div = document.createElement("div");
  div.className = "gpu";
  div.dataset.gpu = id;
  const label = document.createElement("span");
  label.className = "gpu-name";
  label.textContent = `GPU ${id}`;
  const meter = document.createElement("meter");
  meter.min = 0;
  meter.max = g.budget_gb;
  meter.high = 0.9 * g.budget_gb;
  meter.value = g.committed_gb;
  const text = document.createElement("span");
  text.className = "gpu-text";
  text.textContent = `${g.committed_gb} / ${g.budget_gb} GB committed`;
  div.append(label, meter, text);
  return div;
}

function notice(text) {
  const p = $("notice");
  p.textContent = text || "";
  p.hidden = !text;
}

function draw(doc) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren(...Object.entries(doc.models).map(([name, m]) => row(name, m)));
  const gpus = Object.entries(doc.gpus);
  if (gpus.length) $("gpus").replaceChildren(...gpus.map(([id, g]) => gpu(id, g)));
  $("updated").textContent = new Date().toLocaleTimeString();
}

let refreshing = false;

async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const resp = await fetch("sleep/status", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    draw(await resp.json());
    if ($("notice").dataset.kind === "unreachable") {
      notice("");
      delete $("notice").dataset.kind;
    }
  } catch (err) {
    notice(`kvsleep unreachable: ${err.message}`);
    $("notice").dataset.kind = "unreachable";
  } finally {
    refreshing = false;
  }
}

// A control route: with the session's token if any; a 401 asks for one and retries once.
async function control(url, options = {}, asked = false) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  const resp = await fetch(url, { ...options, headers, cache: "no-store" });
  if (resp.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    if (!asked) {
      const given = window.prompt("kvsleep admin token (kept in this tab only):");
      if (given) {
        sessionStorage.setItem(TOKEN_KEY, given.trim());
        return control(url, options, true);
      }
    }
  }
  return resp;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return (body.error && body.error.message) || body.message || `HTTP ${resp.status}`;
  } catch {
    return `HTTP ${resp.status}`;
  }
}

async function act(name, action) {
  const verb = action === "sleep" ? "sleep" : "wake";
  const resp = await control(`models/${encodeURIComponent(name)}/${verb}?wait=false`,
                             { method: "POST" });
  notice(resp.ok ? "" : `${verb} ${name}: ${await errorText(resp)}`);
  await refresh();
}

// The operator's word on an engine kvsleep cannot read. A wrong answer can kill an SGLang
// (a release twice, a resume of memory never released), hence the question first.
async function adopt(name, state) {
  const asked = window.confirm(
    `Tell kvsleep that the engine of ${name} is ${state}?\n\n` +
      (state === "asleep"
        ? "Only if its GPU memory is released: the next request will resume it."
        : "Only if it holds its memory: kvsleep will finish an interrupted wake, then serve.") +
      "\nSee the runbook, KvsleepEngineStateUnknown.");
  if (!asked) {
    await refresh();
    return;
  }
  const resp = await control(
    `models/${encodeURIComponent(name)}/adopt?state=${encodeURIComponent(state)}`,
    { method: "POST" });
  notice(resp.ok ? "" : `adopt ${name} as ${state}: ${await errorText(resp)}`);
  await refresh();
}

let following = null;

async function showLogs(name) {
  closeLogs();
  const follow = $("log-follow").checked;
  $("log-title").textContent = `${name}: last ${LOG_LINES} lines${follow ? ", following" : ""}`;
  $("log-text").textContent = "";
  if (!$("log-dialog").open) $("log-dialog").showModal();
  $("log-dialog").dataset.model = name;
  const controller = new AbortController();
  following = controller;
  const url = `logs/${encodeURIComponent(name)}?lines=${LOG_LINES}${follow ? "&follow=1" : ""}`;
  try {
    const resp = await control(url, { signal: controller.signal });
    if (!resp.ok) {
      $("log-text").textContent = await errorText(resp);
      return;
    }
    if (!follow) {
      $("log-text").textContent = await resp.text();
      return;
    }
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        if (event.startsWith("data: ")) $("log-text").append(`${event.slice(6)}\n`);
      }
      $("log-text").scrollTop = $("log-text").scrollHeight;
    }
  } catch (err) {
    if (err.name !== "AbortError") $("log-text").append(`\n(${err.message})`);
  }
}

function closeLogs() {
  if (following) following.abort();
  following = null;
}

document.addEventListener("click", (event) => {
  const target = event.target;
  const tr = target.closest("tr[data-model]");
  if (target.matches("button[data-action=adopt]") && tr) {
    target.disabled = true;
    adopt(tr.dataset.model, target.dataset.adopt);
  } else if (target.matches("button[data-action]") && tr) {
    target.disabled = true;
    act(tr.dataset.model, target.dataset.action);
  } else if (target.matches("a.logs") && tr) {
    event.preventDefault();
    showLogs(tr.dataset.model);
  }
});
$("log-close").addEventListener("click", () => {
  closeLogs();
  $("log-dialog").close();
});
$("log-dialog").addEventListener("close", closeLogs);
$("log-follow").addEventListener("change", () => {
  const name = $("log-dialog").dataset.model;
  if (name) showLogs(name);
});

setInterval(refresh, REFRESH_MS);
refresh();

// mlxk dashboard and chat: plain DOM, no framework, no build step.
// Every piece of text from the server (model names, job messages, model output) goes through textContent,
// never innerHTML, so nothing a model writes can become markup or script.
"use strict";

const KEY_STORAGE = "mlxk.apiKey";
const ACTIVE_POLL_MS = 1000;   // while a job is queued or running
const IDLE_POLL_MS = 5000;     // otherwise, so jobs started from the CLI show up too
const ACTIVE_STATES = new Set(["queued", "running"]);
const STATUS_POLL_MS = 5000;   // the header (server, inference worker, job workers) and the loaded models
const CONFIRM_MS = 4000;       // how long a "Remove?" button waits for its second click
const WIDE = window.matchMedia("(min-width: 1000px)");   // the chat beside the other panels (style.css)

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ small helpers

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function humanSize(num) {
  if (num === null || num === undefined) return "-";
  let value = Number(num);
  for (const unit of ["B", "KB", "MB", "GB", "TB"]) {
    if (Math.abs(value) < 1000 || unit === "TB") {
      return unit === "B" || unit === "KB" ? `${value.toFixed(0)} ${unit}` : `${value.toFixed(1)} ${unit}`;
    }
    value /= 1000;
  }
  return `${value.toFixed(1)} PB`;
}

function humanDuration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function showError(id, message) {
  const node = $(id);
  node.textContent = message || "";
  node.hidden = !message;
}

// ------------------------------------------------------------------ HTTP with the API key

class AuthNeeded extends Error {}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The server's error as {message, code}: OpenAI's shape {"error": {"message", "type", "code"}}.
async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return { message: body.error.message, code: body.error.code };
  } catch (_) { /* not JSON */ }
  return { message: `HTTP ${response.status} ${response.statusText}`, code: null };
}

async function errorMessage(response) {
  return (await errorOf(response)).message;
}

// Fetch JSON from the server; a 401 opens the API key form and raises AuthNeeded.
async function api(path, { method = "GET", body } = {}) {
  const init = { method, headers: authHeaders(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (response.status === 401) {
    askForKey(await errorMessage(response));
    throw new AuthNeeded("API key needed");
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  return response.json();
}

function askForKey(message) {
  $("auth").hidden = false;
  $("forget-key").hidden = true;
  showError("auth-error", apiKey() ? `The API key was refused: ${message}` : "This server needs its API key.");
  $("api-key").focus();
}

function keyAccepted() {
  $("auth").hidden = true;
  showError("auth-error", "");
  $("forget-key").hidden = !apiKey();
}

// ------------------------------------------------------------------ models

function runtimeCell(model) {
  if (model.health !== "healthy") return ["no", "runtime-no", "", "integrity check failed"];
  if (model.runtime_compatible === true) return ["yes", "runtime-yes", "", ""];
  if (model.runtime_compatible === false) return ["no", "runtime-no", model.reason || "", ""];
  return ["pending", "runtime-pending", "", "the job worker checks it in the background"];
}

// A cell with a word and, under it, the reason in full (an unhealthy model says why, not only "unhealthy").
function verdictCell(className, label, word, reason, title = "") {
  const td = el("td", { className, dataset: { label } }, [el("span", { className: "word", text: word })]);
  if (reason) td.append(el("div", { className: "reason", text: reason }));
  if (title) td.title = title;
  return td;
}

// Two clicks remove: the first turns the button into "Remove?", the second (within CONFIRM_MS) removes.
function removeButton(name) {
  const button = el("button", { type: "button", className: "small danger remove", text: "Remove",
                                title: `mlxk rm ${name}` });
  let timer = null;
  button.addEventListener("click", () => {
    if (!button.classList.contains("confirm")) {
      button.classList.add("confirm");
      button.textContent = "Remove?";
      timer = setTimeout(() => { button.classList.remove("confirm"); button.textContent = "Remove"; }, CONFIRM_MS);
      return;
    }
    clearTimeout(timer);
    removeModel(name, button);
  });
  return button;
}

function modelRow(model) {
  const [runtime, runtimeClass, runtimeReason, runtimeTitle] = runtimeCell(model);
  const unhealthy = model.health !== "healthy";
  const scan = el("button", { type: "button", className: "small scan", text: "Check",
                              title: `mlxk health ${model.name}: check it again now` });
  scan.addEventListener("click", () => scanModels([model.name], scan));
  return el("tr", { dataset: { name: model.name } }, [
    el("td", { className: "name", text: model.name }),
    el("td", { className: "num", text: humanSize(model.size_bytes) }),
    el("td", { className: "kind", text: `${model.model_type || "-"} · ${model.framework || "-"}` }),
    verdictCell(`health health-${model.health}`, "", model.health || "-", unhealthy ? model.reason : ""),
    verdictCell(`runtime ${runtimeClass}`, "runtime", runtime, runtimeReason, runtimeTitle),
    el("td", { className: "actions" }, [scan, removeButton(model.name)]),
  ]);
}

function modelsNote(text) {
  $("models-note").textContent = text || "";
  $("models-note").hidden = !text;
}

async function refreshModels() {
  try {
    const data = await api("/api/models");
    const tbody = $("models").tBodies[0];
    tbody.replaceChildren(...data.models.map(modelRow));
    $("models-empty").hidden = data.models.length > 0;
    const pending = data.pending ? `, ${data.pending} pending a check` : "";
    $("models-summary").textContent = `${data.count} cached, ${humanSize(data.size_bytes)} on disk${pending}`;
    $("tab-models-count").textContent = String(data.count);
    showError("models-error", "");
    keyAccepted();
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError("models-error", `Could not list models: ${error.message}`);
  }
  await refreshChatModels();
}

async function scanModels(repos, button) {
  button.disabled = true;
  try {
    const job = await api("/api/jobs/scan", { method: "POST", body: repos ? { repos, force: true } : { force: true } });
    modelsNote(`Health check queued as job ${job.id.slice(0, 8)}${repos ? ` for ${repos.join(", ")}` : ""}; `
               + "the table updates when it ends.");
    showError("models-error", "");
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError("models-error", `Could not queue a health check: ${error.message}`);
  } finally {
    button.disabled = false;
  }
  refreshJobs();
}

// The same rm job as `mlxk rm NAME`: it runs at once, so the answer is the finished job (or why it was refused).
async function removeModel(name, button) {
  button.disabled = true;
  try {
    const job = await api("/api/jobs/rm", { method: "POST", body: { model: name } });
    modelsNote(`Removed ${name} (rm job ${job.id.slice(0, 8)}).`);
    showError("models-error", "");
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError("models-error", `Could not remove ${name}: ${error.message}`);
    button.disabled = false;
  }
  refreshModels();
  refreshJobs();
}

// ------------------------------------------------------------------ loaded models (`mlxk ps`, `mlxk stop`)

function loadedRow(model) {
  // /api/ps is Ollama's superset: `name` is Ollama's tagged name, `repo_id` mlxk's
  const name = model.repo_id || model.name;
  const unload = el("button", { type: "button", className: "small unload", text: "Unload",
                                title: `mlxk stop ${name}` });
  unload.addEventListener("click", () => unloadModel(name, unload));
  const expires = model.expires_in_s === null || model.expires_in_s === undefined
    ? "-" : humanDuration(model.expires_in_s);
  return el("tr", { dataset: { name } }, [
    el("td", { className: "name", text: name }),
    el("td", { className: "num", dataset: { label: "memory" }, text: humanSize(model.memory_bytes) }),
    el("td", { className: "num", dataset: { label: "unloads in" },
               text: model.running ? `${expires} (${model.running} running)` : expires }),
    el("td", { className: "actions" }, [unload]),
  ]);
}

async function refreshLoaded() {
  try {
    const data = await api("/api/ps");
    $("loaded").tBodies[0].replaceChildren(...data.models.map(loadedRow));
    $("loaded").hidden = data.models.length === 0;
    $("loaded-empty").hidden = data.models.length > 0;
    showError("loaded-error", "");
    showInference(data.worker);
  } catch (error) {
    if (error instanceof AuthNeeded) return false;
    showError("loaded-error", `Could not list loaded models: ${error.message}`);
  }
  return true;
}

async function unloadModel(name, button) {
  button.disabled = true;
  try {
    await api("/api/stop", { method: "POST", body: { model: name } });
    showError("loaded-error", "");
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError("loaded-error", `Could not unload ${name}: ${error.message}`);
    button.disabled = false;
  }
  refreshLoaded();
}

// ------------------------------------------------------------------ jobs

let jobsTimer = null;
let activeJobIds = new Set();

function progressText(job) {
  const p = job.progress || {};
  if (job.state === "queued") return job.message || "queued";
  const parts = [];
  if (p.bytes_total) parts.push(`${(p.percent || 0).toFixed(1)}%  ${humanSize(p.bytes_done)}/${humanSize(p.bytes_total)}`);
  if (p.files_total) parts.push(`${p.files_done}/${p.files_total} files`);
  if (p.rate && job.state === "running") parts.push(`${humanSize(p.rate)}/s`);
  if (p.eta !== null && p.eta !== undefined && p.rate && job.state === "running") parts.push(`ETA ${humanDuration(p.eta)}`);
  return parts.join("  ") || (job.state === "succeeded" ? "done" : "");
}

function progressCell(job) {
  const td = el("td", { className: "progress wide" });
  const percent = job.progress ? job.progress.percent : null;
  if (percent !== null && percent !== undefined) {
    td.append(el("progress", { max: "100", value: String(percent) }));
  }
  td.append(el("span", { className: "progress-text", text: progressText(job) }));
  return td;
}

function actionCell(job) {
  const td = el("td", { className: "actions" });
  if (ACTIVE_STATES.has(job.state)) {
    const button = el("button", { type: "button", className: "small cancel", text: "Cancel" });
    button.addEventListener("click", () => jobAction(job.id, "cancel", button));
    td.append(button);
  } else if (job.state === "failed" || job.state === "cancelled") {
    const button = el("button", { type: "button", className: "small retry", text: "Retry" });
    button.addEventListener("click", () => jobAction(job.id, "retry", button));
    td.append(button);
  }
  return td;
}

function jobMessage(job) {
  if (job.error && job.error.message) return job.error.message;
  return job.message || "";
}

// Rows are kept per job id and updated in place, so a button is not replaced under the pointer every second.
function updateJobRow(tr, job) {
  const cells = [
    el("td", { className: "id", text: job.id.slice(0, 8), title: job.id }),
    el("td", { className: "kind", text: job.kind }),
    el("td", { className: "name", text: job.target }),
    el("td", { className: `state state-${job.state}`, text: job.state }),
    progressCell(job),
    el("td", { className: "message wide", text: jobMessage(job) }),
  ];
  const actions = tr.dataset.state === job.state && tr.cells.length === 7 ? tr.cells[6] : actionCell(job);
  tr.replaceChildren(...cells, actions);
  tr.dataset.state = job.state;
}

function renderJobs(jobs) {
  const tbody = $("jobs").tBodies[0];
  const rows = new Map([...tbody.rows].map((tr) => [tr.dataset.id, tr]));
  const ordered = jobs.map((job) => {
    const tr = rows.get(job.id) || el("tr", { dataset: { id: job.id } });
    updateJobRow(tr, job);
    return tr;
  });
  tbody.replaceChildren(...ordered);
  $("jobs-empty").hidden = jobs.length > 0;
}

async function refreshJobs() {
  clearTimeout(jobsTimer);
  jobsTimer = null;
  let next = IDLE_POLL_MS;
  try {
    const data = await api($("jobs-all").checked ? "/api/jobs?all=1" : "/api/jobs");
    renderJobs(data.jobs);
    showError("jobs-error", "");
    const nowActive = new Set(data.jobs.filter((job) => ACTIVE_STATES.has(job.state)).map((job) => job.id));
    const ended = [...activeJobIds].some((id) => !nowActive.has(id));
    activeJobIds = nowActive;
    const badge = $("tab-jobs-active");
    badge.textContent = nowActive.size ? `${nowActive.size} active` : "";
    badge.classList.toggle("active", nowActive.size > 0);
    if (ended) refreshModels();   // a pull, rm or scan changed what is cached or runnable
    if (nowActive.size) next = ACTIVE_POLL_MS;
  } catch (error) {
    if (error instanceof AuthNeeded) return;   // polling resumes once a key is given
    showError("jobs-error", `Could not list jobs: ${error.message}`);
  }
  jobsTimer = setTimeout(refreshJobs, next);
}

async function jobAction(jobId, action, button) {
  button.disabled = true;
  try {
    await api(`/api/jobs/${encodeURIComponent(jobId)}/${action}`, { method: "POST", body: {} });
    showError("jobs-error", "");
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError("jobs-error", `Could not ${action} job ${jobId}: ${error.message}`);
    button.disabled = false;
  }
  refreshJobs();
}

async function pull(event) {
  event.preventDefault();
  const input = $("pull-model");
  const model = input.value.trim();
  if (!model) return;
  $("pull-submit").disabled = true;
  try {
    await api("/api/jobs/pull", { method: "POST", body: { model } });
    input.value = "";
    showError("pull-error", "");
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError("pull-error", error.message);
  } finally {
    $("pull-submit").disabled = false;
  }
  refreshJobs();
}

// ------------------------------------------------------------------ chat

// The conversation: {role, content, node} (node: its bubble). Messages before `sentFrom` no longer fit the model's
// context: they stay on screen, faded, and are not sent.
const conversation = [];
let sentFrom = 0;
let trimNoticeShown = false;   // the page says once per conversation that old turns are left out
let controller = null;       // AbortController of the reply in flight

async function refreshChatModels() {
  const select = $("chat-model");
  const current = select.value;
  let ids = [];
  try {
    const data = await api("/v1/models");
    ids = data.data.map((model) => model.id);
  } catch (error) {
    if (!(error instanceof AuthNeeded)) showError("chat-error", `Could not list runnable models: ${error.message}`);
    return;
  }
  if (!ids.length) {
    select.replaceChildren(el("option", { value: "", text: "no runnable models" }));
  } else {
    select.replaceChildren(...ids.map((id) => el("option", { value: id, text: id })));
    if (ids.includes(current)) select.value = current;
  }
  updateChatButtons();
}

function updateChatButtons() {
  const busy = controller !== null;
  $("chat-send").disabled = busy || !$("chat-model").value;
  $("chat-stop").disabled = !busy;
}

function addMessage(role, text) {
  const content = el("div", { className: "content", text });
  const node = el("div", { className: `msg ${role}` }, [
    el("div", { className: "who", text: role === "user" ? "You" : role }),
    content,
  ]);
  $("chat-log").append(node);
  scrollChat();
  return { node, content };
}

function sentMessages(from) {
  return conversation.slice(from).map(({ role, content }) => ({ role, content }));
}

// Where the next shorter history starts: the user message after the oldest one sent (a history must start with a
// user message); null when only the newest message is left.
function nextStart(from) {
  for (let i = from + 1; i < conversation.length; i += 1) {
    if (conversation[i].role === "user") return i;
  }
  return null;
}

// The history no longer fits: fade what is left out from now on, and say so once per conversation.
function leaveOut(from, limitMessage) {
  for (const message of conversation.slice(sentFrom, from)) {
    if (message.node) message.node.classList.add("dropped");
  }
  sentFrom = from;
  if (trimNoticeShown) return;
  trimNoticeShown = true;
  const limit = /maximum context length is (\d+) tokens/.exec(limitMessage || "");
  const context = limit ? ` (${limit[1]} tokens)` : "";
  const notice = el("p", { className: "notice", role: "status",
                           text: `The conversation no longer fits the model's context${context}: the oldest turns `
                                 + "are left out from now on (shown faded). New conversation starts afresh." });
  const last = conversation[conversation.length - 1];
  $("chat-log").insertBefore(notice, last && last.node ? last.node : null);
}

// POST the chat; while the server answers 400 context_length_exceeded, leave out the oldest turn and ask again.
async function requestReply(model, signal) {
  let from = sentFrom;
  let limitMessage = "";
  for (;;) {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, messages: sentMessages(from), stream: true,
                             stream_options: { include_usage: true } }),
      signal,
    });
    if (response.ok) {
      if (from !== sentFrom) leaveOut(from, limitMessage);
      return response;
    }
    const error = await errorOf(response);
    if (response.status === 401) askForKey(error.message);
    const shorter = error.code === "context_length_exceeded" ? nextStart(from) : null;
    if (shorter === null) {
      const alone = error.code === "context_length_exceeded" && from > sentFrom;
      throw new Error(alone ? `your message alone is too long for this model: ${error.message}` : error.message);
    }
    limitMessage = error.message;
    from = shorter;
  }
}

function scrollChat() {
  const log = $("chat-log");
  log.scrollTop = log.scrollHeight;
}

// One assistant bubble that grows as deltas arrive; reasoning goes into a collapsed <details> above the answer.
function assistantBubble(model) {
  const { node, content } = addMessage("assistant", "");
  node.querySelector(".who").textContent = model;
  const details = el("details", { className: "thinking" }, [el("summary", { text: "Reasoning" })]);
  const reasoning = el("div", { className: "reasoning" });
  details.append(reasoning);
  details.hidden = true;
  node.insertBefore(details, content);
  const note = el("div", { className: "note" });
  node.append(note);
  return {
    node,
    text: "",
    addContent(piece) { this.text += piece; content.textContent = this.text; scrollChat(); },
    addReasoning(piece) { details.hidden = false; reasoning.textContent += piece; },
    setNote(text) { note.textContent = text; },
    fail(message) { node.classList.add("error"); content.textContent = this.text ? `${this.text}\n\n${message}` : message; },
  };
}

// Server-sent events from a fetch body: `data: ...` lines, events separated by a blank line.
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

async function send(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  const model = $("chat-model").value;
  if (!text || !model || controller) return;
  showError("chat-error", "");
  input.value = "";
  conversation.push({ role: "user", content: text, node: addMessage("user", text).node });
  const bubble = assistantBubble(model);
  controller = new AbortController();
  updateChatButtons();
  const started = performance.now();
  let finish = null;
  let usage = null;
  try {
    const response = await requestReply(model, controller.signal);
    for await (const data of sseEvents(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server ended the reply with an error");
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.reasoning_content) bubble.addReasoning(delta.reasoning_content);
        if (delta.content) bubble.addContent(delta.content);
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
    conversation.push({ role: "assistant", content: bubble.text, node: bubble.node });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = usage ? `${usage.completion_tokens} tokens, ` : "";
    bubble.setNote(`${tokens}${seconds}s${finish === "length" ? " · stopped at the token limit" : ""}`);
  } catch (error) {
    if (error.name === "AbortError") {
      // Keep what arrived: the next turn continues from the partial answer the user saw.
      if (bubble.text) conversation.push({ role: "assistant", content: bubble.text, node: bubble.node });
      else conversation.pop();
      bubble.setNote("stopped");
    } else {
      conversation.pop();   // the turn failed: take it back so the user can resend it
      if (!input.value) input.value = text;
      bubble.fail(`Error: ${error.message}`);
    }
  } finally {
    controller = null;
    updateChatButtons();
    refreshStatus();   // the first request starts the inference worker and loads the model
  }
}

function stop() {
  if (controller) controller.abort();
}

function clearChat() {
  stop();
  conversation.length = 0;
  sentFrom = 0;
  trimNoticeShown = false;
  $("chat-log").replaceChildren();
  showError("chat-error", "");
}

// ------------------------------------------------------------------ wiring

function pill(id, text, tone, state, title = "") {
  const node = $(id);
  node.textContent = text;
  node.className = `pill ${tone}`;
  node.dataset.state = state;
  node.title = title || text;
  node.hidden = false;
}

// /health's `worker`: the supervisor's view of the inference worker (one honcho runs counts as ready).
function showInference(worker) {
  if (!worker || !worker.state) return;
  const pid = worker.pid ? ` (pid ${worker.pid})` : "";
  const texts = {
    ready: [`inference worker ready${pid}`, "good"],
    starting: [`inference worker starting${pid}`, "warn"],
    unresponsive: [`inference worker not answering for ${Math.round(worker.silent_s || 0)}s`, "bad"],
    stopped: worker.managed
      ? ["inference worker not started (the first chat starts it)", ""]
      : ["inference worker not running (start `python -m mlxk.workers.inference`)", "bad"],
  };
  const [text, tone] = texts[worker.state] || [`inference worker ${worker.state}`, ""];
  pill("status-inference", text, tone, worker.state);
}

// /health's `job_workers`: the Huey consumers with a fresh heartbeat (any host).
function showJobWorkers(workers) {
  if (!workers || !workers.state) return;
  const texts = {
    running: [workers.count > 1 ? `${workers.count} job workers running` : "job worker running", "good"],
    stopped: ["no job worker (one starts when a job is queued)", ""],
    unknown: ["job workers unknown (state.db unreadable)", "warn"],
  };
  const [text, tone] = texts[workers.state] || [`job worker ${workers.state}`, ""];
  pill("status-jobs", text, tone, workers.state);
}

async function showServer() {
  try {
    const response = await fetch("/health");
    const body = await response.json();
    pill("status-server", `mlxk v${body.version}`, "good", "ok");
    showInference(body.worker);
    showJobWorkers(body.job_workers);
  } catch (_) {
    pill("status-server", "server unreachable", "bad", "unreachable");
    $("status-inference").hidden = true;
    $("status-jobs").hidden = true;
  }
}

let statusTimer = null;

async function refreshStatus() {
  clearTimeout(statusTimer);
  await showServer();
  if (!(await refreshLoaded())) return;   // the loaded models need the key; polling goes on once it is given
  clearTimeout(statusTimer);
  statusTimer = setTimeout(refreshStatus, STATUS_POLL_MS);
}

// ------------------------------------------------------------------ tabs

function selectTab(name) {
  if (WIDE.matches && name === "chat") name = "models";   // the chat is always shown beside the others
  $("main").dataset.tab = name;
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
    tab.setAttribute("aria-selected", String(tab.dataset.tab === name));
  }
}

function loadAll() {
  refreshModels();
  refreshJobs();
  refreshStatus();
}

function init() {
  $("auth").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    loadAll();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    loadAll();
  });
  $("models-refresh").addEventListener("click", () => { refreshModels(); refreshLoaded(); });
  $("models-scan").addEventListener("click", () => scanModels(null, $("models-scan")));
  for (const tab of document.querySelectorAll("#tabs [role=tab]")) {
    tab.addEventListener("click", () => selectTab(tab.dataset.tab));
  }
  WIDE.addEventListener("change", () => selectTab($("main").dataset.tab));
  selectTab("chat");
  $("jobs-all").addEventListener("change", refreshJobs);
  $("pull-form").addEventListener("submit", pull);
  $("chat-form").addEventListener("submit", send);
  $("chat-stop").addEventListener("click", stop);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-model").addEventListener("change", updateChatButtons);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  loadAll();
}

document.addEventListener("DOMContentLoaded", init);

// The llm-hub gateway dashboard: plain JavaScript, no build step, talking only to this gateway.
"use strict";

const KEY_STORAGE = "llm-hub-key";
const REFRESH_MS = 3000;
// Listing models asks every bridge's list_models tool, so it runs every few refreshes
// (and whenever the tools change) rather than on every one.
const MODELS_EVERY = 3;

const $ = (id) => document.getElementById(id);

let key = sessionStorage.getItem(KEY_STORAGE); // "" when the gateway runs without keys
let timer = null;
let refreshes = 0; // only the latest refresh schedules the next, so loops never pile up
let tick = 0;
let toolNames = "";
const openReasons = new Set(); // model ids whose "why unavailable" the user opened
let catalog = null; // the last /v1/dashboard/models answer; its rows are redrawn on every refresh with fresh load figures
let shownNotices = "";
let call = null; // the AbortController of the playground call in progress

class Unauthorized extends Error {}

// -- talking to the gateway -------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { ...options.headers };
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  if (response.status === 401) throw new Unauthorized();
  if (response.status === 429) {
    throw new Error(`rate limit reached; try again in ${response.headers.get("Retry-After") || "a few"} s`);
  }
  const body = await response.json().catch(() => ({}));
  throw new Error(body.error || `${path} answered ${response.status}`);
}

const getJSON = async (path) => (await api(path)).json();

async function getHealth() {
  try {
    const response = await fetch("/health");
    return await response.json();
  } catch {
    return null;
  }
}

// Server-sent events from a fetch body: yields [event, data] (EventSource cannot POST or send headers).
async function* serverEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    // Lines may end in \r\n, \n or \r; a \r at the very end may be half of a \r\n still to come.
    buffer = (buffer + value).replace(/\r\n|\r(?!$)/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let type = "message";
      const data = [];
      for (const line of block.split("\n")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") type = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield [type, data.join("\n")];
    }
  }
}

// -- small DOM helpers ------------------------------------------------------------------------

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value !== null && value !== undefined) node.setAttribute(name, value);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined).map((c) => (c instanceof Node ? c : String(c))));
  return node;
}

const pill = (text, kind) => h("span", { class: `pill ${kind}` }, text);
// The cell's content sits in one element, so on phones (rows as label/value grids) it stays one value.
const cell = (label, ...children) => h("td", { "data-label": label }, h("div", {}, ...children));
const nowrap = (text) => h("span", { class: "nowrap" }, text);
const emptyRow = (columns, text) => h("tr", { class: "empty" }, h("td", { colspan: columns }, text));
const number = (value) => (value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US"));
const ms = (value) => (value === null || value === undefined ? "–" : `${Number(value).toFixed(1)} ms`);
const bridgeName = (url) => url.replace(/^[a-z]+:\/\//, "");

// -- rendering --------------------------------------------------------------------------------

function showHealth(health) {
  const node = $("health");
  if (!health) {
    node.replaceChildren(pill("gateway unreachable", "bad"));
    return;
  }
  const { healthy, total } = health.bridges;
  const kind = health.status === "ok" ? (healthy < total ? "warn" : "ok") : "bad";
  node.replaceChildren(pill(health.status === "ok" ? "healthy" : "unavailable", kind),
    ` ${healthy}/${total} bridges · ${health.tools} tools`);
  $("version").textContent = `v${health.version}`;
}

function showBridges(bridges) {
  $("bridges").replaceChildren(...(bridges.length ? bridges.map((bridge) => h("tr", {},
    cell("Bridge", h("span", { class: "mono nowrap" }, bridgeName(bridge.url))),
    cell("State", pill(bridge.healthy ? "healthy" : "down", bridge.healthy ? "ok" : "bad")),
    cell("Latency", nowrap(ms(bridge.latency_ms))),
    cell("Calls", number(bridge.calls), h("br"), h("span", { class: "muted small nowrap" }, `${number(bridge.in_flight)} in flight`)),
    cell("Tools", bridge.tools.length),
    cell("Last error", bridge.last_error ? h("span", { class: "error" }, bridge.last_error) : "–"),
  )) : [emptyRow(6, "No bridges are configured.")]));
}

function showStats(stats) {
  const { p50, p95, p99 } = stats.latency_ms;
  const tiles = [
    ["Requests / s", stats.requests_per_second, `${number(stats.requests_last_minute)} in the last minute`],
    ["Latency p50", ms(p50), `p95 ${ms(p95)} · p99 ${ms(p99)}`],
    ["Errors (5xx)", number(stats.errors_5xx), `of ${number(stats.requests_total)} requests`],
    ["Rate-limited", number(stats.rate_limited.tool + stats.rate_limited.other),
      `${number(stats.rate_limited.tool)} tool calls · ${number(stats.rate_limited.other)} other`],
    ["Tool calls", number(Object.values(stats.tool_calls).reduce((sum, n) => sum + n, 0)),
      `${number(stats.tool_calls.ok)} ok · ${number(stats.tool_calls.error)} failed · ${number(stats.tool_calls.cancelled)} cancelled`],
    ["In flight", number(stats.in_flight), "requests now, this one included"],
  ];
  $("stats").replaceChildren(...tiles.map(([label, value, detail]) =>
    h("div", {}, h("dt", {}, label), h("dd", {}, value), h("dd", { class: "muted small" }, detail))));
}

function showUsage(stats) {
  $("usage").replaceChildren(...(stats.usage.length ? stats.usage.map((row) => h("tr", {},
    cell("Key", h("span", { class: "mono" }, row.key)),
    cell("Model", h("span", { class: "mono" }, row.model)),
    cell("Calls", number(row.calls)),
    cell("Prompt tokens", number(row.prompt_tokens)),
    cell("Completion tokens", number(row.completion_tokens)),
  )) : [emptyRow(5, "No call has reached a model through this gateway yet.")]));
  drawTokens(stats.tokens_per_minute);
}

const SVG = "http://www.w3.org/2000/svg";
const CHART = { height: 150, left: 48, top: 8, bottom: 20 };

function svg(tag, props = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(props)) node.setAttribute(name, value);
  if (text !== null) node.textContent = text;
  return node;
}

// One bar per minute, oldest at the left, completion tokens stacked on prompt tokens. Each series is
// one path of rectangles, so 60 minutes cost two elements however busy they were. Drawn at the width
// the page gives it, so its labels keep their size on a phone.
function drawTokens({ prompt, completion }) {
  const { height, left, top, bottom } = CHART;
  const chart = $("usage-chart");
  const width = Math.max(240, Math.round(chart.getBoundingClientRect().width) || 600);
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const totals = prompt.map((value, i) => value + completion[i]);
  const peak = Math.max(0, ...totals);
  const floor = height - bottom;
  const y = (value) => (floor - (peak ? (value / peak) * (floor - top) : 0)).toFixed(1);
  const slot = (width - left) / totals.length;
  const bars = (lows, highs) => highs.map((high, i) => (high > lows[i]
    ? `M${(left + i * slot + 1).toFixed(1)},${y(lows[i])}V${y(high)}h${(slot - 2).toFixed(1)}V${y(lows[i])}Z` : "")).join("");
  const zeros = totals.map(() => 0);
  const series = [["prompt", bars(zeros, prompt)], ["completion", bars(prompt, totals)]]
    .filter(([, d]) => d).map(([kind, d]) => svg("path", { class: kind, d }));
  const label = (x, yAt, anchor, text) => svg("text", { x, y: yAt, "text-anchor": anchor }, text);
  chart.replaceChildren($("usage-chart-title"),
    svg("line", { class: "axis", x1: left, y1: floor, x2: width, y2: floor }),
    label(left - 6, top + 8, "end", number(peak)), label(left - 6, floor, "end", "0"),
    label(left, height - 4, "start", "60 min ago"), label(width, height - 4, "end", "now"),
    ...series);
  $("usage-peak").textContent = peak
    ? `· peak ${number(peak)} tokens in a minute, ${number(totals.reduce((sum, n) => sum + n, 0))} in the hour`
    : "· none in the last hour";
}

// Where a model is: every bridge that lists it or reports it, with its load there (from /v1/bridges,
// which is fresh on every refresh) or that it is down.
function whereLoaded(model, bridges) {
  const lines = bridges.flatMap((bridge) => {
    const load = (bridge.models || []).find((m) => m.model === model.id);
    if (!load && !model.bridges.includes(bridge.name)) return [];
    const name = h("span", { class: "mono" }, bridge.name);
    if (!bridge.healthy) return [h("div", { class: "where" }, name, pill("down", "bad"))];
    if (!load) return [h("div", { class: "where" }, name)]; // a bridge that does not report loads
    return [h("div", { class: "where" }, name,
      load.loaded ? pill("loaded", "ok") : pill("not loaded", "idle"),
      h("span", { class: "figures" }, `${number(load.in_flight)} in flight · ${number(load.slots)} slots`))];
  });
  return lines.length ? lines : ["–"];
}

// The reason names every bridge's last error, which can be long: one click away. The rows are redrawn
// on every refresh, so which reasons are open is remembered here.
function reasonFor(modelId, reason) {
  const details = h("details", { class: "reason small", open: openReasons.has(modelId) ? "" : null },
    h("summary", {}, "Why unavailable?"), h("p", { class: "error" }, reason));
  details.addEventListener("toggle", () => (details.open ? openReasons.add(modelId) : openReasons.delete(modelId)));
  return details;
}

function showModels({ models, skipped }, bridges, tools) {
  const byName = new Map(tools.map((tool) => [tool.name, tool]));
  $("models").replaceChildren(...(models.length ? models.map((model) => {
    const listed = model.tools.map((name) => byName.get(name)).filter(Boolean);
    const down = listed.filter((tool) => tool.available === false);
    const unavailable = listed.length > 0 && down.length === listed.length;
    const loaded = unavailable ? pill("unavailable", "bad")
      : model.loaded ? pill("loaded", "ok") : pill(model.loaded === false ? "not loaded" : "unknown", "idle");
    return h("tr", { class: unavailable ? "unavailable" : null },
      cell("Model", h("strong", {}, model.display_name || model.id), h("br"), h("span", { class: "mono muted small" }, model.id),
        down.length ? reasonFor(model.id, down[0].unavailable_reason) : null),
      cell("Type", model.type || "–"),
      cell("Loaded", loaded),
      cell("Context", model.context_length ? nowrap(`${number(model.context_length)} tokens`) : "–"),
      cell("Tools", ...model.tools.map((name) => byName.get(name)?.available === false
        ? h("span", { class: "chip off", title: byName.get(name).unavailable_reason }, name, " (unavailable)")
        : h("span", { class: "chip" }, name))),
      cell("Where", ...whereLoaded(model, bridges)),
    );
  }) : [emptyRow(6, "No models: no bridge is healthy, or LM Studio serves none.")]));
  const failed = skipped.filter((s) => s.error !== "not healthy").length;
  $("models-note").textContent = skipped.length ? `${skipped.length} bridge(s) not answering${failed ? "" : " (down)"}` : "";
}

function showTools(tools) {
  const select = $("tool");
  const chats = tools.filter((tool) => tool.name.startsWith("chat_"));
  const ready = chats.filter((tool) => tool.available !== false).map((tool) => tool.name);
  const wanted = chats.map((tool) => `${tool.name}:${tool.available !== false}`).join(" ");
  const listed = [...select.options].map((option) => `${option.value}:${!option.disabled}`).join(" ");
  if (listed !== wanted || !chats.length) { // rebuilt only on change, so an open list stays open
    const chosen = select.value;
    // A tool whose bridges are all down stays listed (for the grace period), greyed out.
    select.replaceChildren(...(chats.length ? chats.map((tool) => tool.available === false
      ? h("option", { value: tool.name, disabled: "" }, `${tool.name} (unavailable)`)
      : h("option", { value: tool.name }, tool.name))
      : [h("option", { value: "" }, "no chat tool available")]));
    select.value = ready.includes(chosen) ? chosen : (ready[0] ?? chats[0]?.name ?? "");
  }
  $("run").disabled = Boolean(call) || !ready.includes(select.value);
}

function notices(health, bridges) {
  const found = [];
  if (!health) {
    found.push(["error", "Cannot reach the gateway.", "Check that it is running; this page retries every few seconds."]);
  } else if (health.bridges.total === 0) {
    found.push(["error", "No bridges.", "This gateway has no bridge configured: start it with --bridge URL (or LLM_HUB_BRIDGES)."]);
  } else if (health.bridges.healthy === 0) {
    found.push(["error", "No bridge is healthy, so no tools can be called.", "Each bridge's last error below says why."]);
  }
  for (const bridge of bridges.filter((b) => !b.healthy)) {
    const name = bridgeName(bridge.url);
    if (/LM Studio/i.test(bridge.last_error || "")) {
      found.push(["warn", `LM Studio is down behind bridge ${name}.`,
        "Its models are unavailable until LM Studio's server runs again on that machine "
        + "(Developer tab, or `lms server start`); the bridge then rejoins by itself."]);
    } else {
      found.push(["warn", `Bridge ${name} is down.`, bridge.last_error || "It has not answered a health check yet."]);
    }
  }
  if (key === "") found.push(["info", "Authentication is disabled on this gateway.", "Fine for development only."]);
  return found;
}

function showNotices(found) {
  const text = JSON.stringify(found);
  if (text === shownNotices) return; // unchanged: do not make screen readers announce it again
  shownNotices = text;
  $("notices").replaceChildren(...found.map(([kind, title, detail]) =>
    h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : null }, h("strong", {}, title), " ", detail)));
}

// -- refreshing -------------------------------------------------------------------------------

async function update() {
  const health = await getHealth();
  showHealth(health);
  if (key === null) return;
  try {
    const [bridges, tools, stats] = await Promise.all([
      getJSON("/v1/bridges"), getJSON("/v1/tools"), getJSON("/v1/stats")]);
    showBridges(bridges.bridges);
    showStats(stats);
    showUsage(stats);
    showTools(tools.tools);
    const names = tools.tools.map((tool) => `${tool.name}:${tool.available}`).join(" ");
    if (tick++ % MODELS_EVERY === 0 || names !== toolNames || !catalog) {
      toolNames = names;
      catalog = await getJSON("/v1/dashboard/models");
    }
    showModels(catalog, bridges.bridges, tools.tools);
    showNotices(notices(health, bridges.bridges));
  } catch (error) {
    if (error instanceof Unauthorized) {
      signOut("The gateway no longer accepts this key. Enter a valid one.");
      return;
    }
    showNotices([...notices(health, []), ["error", "Could not refresh.", error.message]]);
  }
}

async function refresh() {
  clearTimeout(timer);
  const mine = ++refreshes;
  if (!document.hidden) await update();
  if (mine === refreshes) timer = setTimeout(refresh, REFRESH_MS);
}

// -- the key ----------------------------------------------------------------------------------

function showDashboard() {
  $("login").hidden = true;
  $("dashboard").hidden = false;
  $("sign-out").hidden = !key;
  tick = 0;
}

function signOut(message = "") {
  call?.abort();
  key = null;
  sessionStorage.removeItem(KEY_STORAGE);
  shownNotices = "";
  catalog = null;
  $("dashboard").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("key-error").textContent = message;
  $("key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const candidate = $("key").value.trim();
  $("key-error").textContent = "Checking…";
  let response;
  try {
    response = await fetch("/v1/bridges", { headers: { Authorization: `Bearer ${candidate}` } });
  } catch {
    $("key-error").textContent = "Cannot reach the gateway. Check that it is running.";
    return;
  }
  if (response.status === 401) {
    $("key-error").textContent = "Wrong API key: the gateway did not accept it. "
      + "Enter the KEY part of a NAME:KEY pair in LLM_HUB_API_KEYS.";
    $("key").select();
    return;
  }
  if (!response.ok) {
    $("key-error").textContent = `The gateway answered ${response.status}; try again in a moment.`;
    return;
  }
  key = candidate;
  sessionStorage.setItem(KEY_STORAGE, key);
  $("key").value = "";
  $("key-error").textContent = "";
  showDashboard();
  refresh();
}

// -- the playground ---------------------------------------------------------------------------

function setCallState(state, message) {
  $("play-form").closest("section").dataset.state = state;
  $("play-status").textContent = message;
  $("run").disabled = state === "running";
  $("stop").disabled = state !== "running";
  $("answer").setAttribute("aria-busy", String(state === "running"));
}

function showResult(result) {
  const text = (result.content || []).filter((c) => c.type === "text").map((c) => c.text).join("\n");
  if (result.isError) {
    setCallState("error", `The call failed: ${text}`);
    return;
  }
  const data = result.structuredContent || {};
  $("answer").textContent = data.text ?? text;
  const timings = data.timings || {};
  $("answer-meta").textContent = [
    data.model && `model ${data.model}`,
    data.finish_reason && `finished: ${data.finish_reason}`,
    data.usage && `${number(data.usage.completion_tokens)} tokens`,
    timings.tokens_per_second && `${timings.tokens_per_second} tokens/s`,
    timings.time_to_first_token_s !== undefined && timings.time_to_first_token_s !== null
      && `first token after ${timings.time_to_first_token_s.toFixed(2)} s`,
  ].filter(Boolean).join(" · ");
  setCallState("done", "Done.");
}

async function runTool(event) {
  event.preventDefault();
  const tool = $("tool").value;
  const prompt = $("prompt").value.trim();
  if (call || !tool || !prompt) return;
  const answer = $("answer");
  answer.textContent = "";
  $("answer-meta").textContent = "";
  call = new AbortController();
  setCallState("running", `Calling ${tool}…`);
  let finished = false;
  try {
    const response = await api(`/v1/tools/${encodeURIComponent(tool)}`, {
      method: "POST",
      signal: call.signal,
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ prompt }),
    });
    for await (const [type, data] of serverEvents(response.body)) {
      const payload = JSON.parse(data);
      if (type === "progress" && payload.message == null) { // a keep-alive: no text yet
        setCallState("running", "Waiting for LM Studio (loading the model or reading the prompt)…");
      } else if (type === "progress" && payload.message) {
        answer.append(payload.message);
        answer.scrollTop = answer.scrollHeight;
        setCallState("running", `Streaming… ${number(payload.progress)} tokens`);
      } else if (type === "result") {
        finished = true;
        showResult(payload);
      }
    }
    if (!finished) setCallState("error", "The connection closed before the answer was finished.");
  } catch (error) {
    if (error.name === "AbortError") setCallState("stopped", "Stopped: the call was cancelled.");
    else if (error instanceof Unauthorized) signOut("The gateway no longer accepts this key. Enter a valid one.");
    else setCallState("error", `The call failed: ${error.message}`);
  } finally {
    call = null;
    if ($("play-form").closest("section").dataset.state === "running") setCallState("error", "The call ended.");
  }
}

// -- start ------------------------------------------------------------------------------------

async function start() {
  $("key-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("play-form").addEventListener("submit", runTool);
  $("stop").addEventListener("click", () => call?.abort());
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("play-form").requestSubmit();
  });
  document.addEventListener("visibilitychange", () => document.hidden || refresh());
  if (key === null) {
    // A gateway started with LLM_HUB_AUTH_DISABLED needs no key: find out before asking for one.
    const open = await fetch("/v1/bridges").then((r) => r.ok, () => false);
    if (open) key = "";
  }
  if (key === null) signOut();
  else showDashboard();
  refresh();
}

start();

// tinyinfer's chat page: streams this server's OpenAI endpoints (/v1/chat/completions with the
// conversation so far, or /v1/completions for a model without a chat template) as server-sent events
// read through fetch + ReadableStream, so a reply shows as it is generated and Stop (AbortController)
// closes the connection -- the server then aborts the request and frees its KV blocks.
// Model output and every server message go into the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], model: null, controller: null };

// A server error: the message of its {"error": {"message": ...}} body.
class ServerError extends Error {}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  const body = await response.text();
  try {
    return JSON.parse(body).error.message;
  } catch {
    return `HTTP ${response.status} ${response.statusText}: ${body.slice(0, 300)}`;
  }
}

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

async function loadModel() {
  let r;
  try {
    r = await fetch("v1/models", { headers: headers() });
  } catch (err) {
    $("model").textContent = "server unreachable";
    return notice(String(err));
  }
  if (!r.ok) {
    $("model").textContent = r.status === 401 ? "API key needed" : "model unknown";
    return notice(await errorMessage(r));
  }
  state.model = (await r.json()).data[0].id;
  $("model").textContent = state.model;
  notice("");
}

async function init() {
  const config = await (await fetch("web/config.json")).json();
  $("key-row").hidden = !config.api_key_required;
  if (!config.chat_template) {              // the server would refuse every chat request
    const option = $("mode").querySelector('option[value="chat"]');
    option.disabled = true;
    option.textContent = "Chat (the model has no chat template)";
    $("mode").value = "completion";
  }
  modeChanged();
  $("mode").addEventListener("change", modeChanged);
  $("key").addEventListener("change", loadModel);
  $("form").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("log").replaceChildren();
  });
  if (!config.api_key_required) return loadModel();
  $("model").textContent = "API key needed";
  notice("This server needs an API key: type it above.");
}

function modeChanged() {
  const chat = $("mode").value === "chat";
  $("system").disabled = !chat;
  $("input").placeholder = chat ? "Message (Enter sends, Shift+Enter: new line)"
                                : "Prompt to continue (each one stands alone)";
}

// One turn in the log: a role label, the text, and (for replies) a line of figures.
function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  turn.append(label, body);
  $("log").append(turn);
  turn.scrollIntoView({ block: "end" });
  return { turn, body };
}

// The request body from the settings; a field left empty is left to the server's default.
function requestBody(chat, text) {
  const body = { stream: true, stream_options: { include_usage: true } };
  if (state.model) body.model = state.model;
  const temperature = $("temperature").value, maxTokens = $("max-tokens").value, seed = $("seed").value;
  if (temperature !== "") body.temperature = Number(temperature);
  if (maxTokens !== "") body.max_tokens = Number(maxTokens);
  if (seed !== "") {
    if (!Number.isSafeInteger(Number(seed))) {
      throw new Error(`seed ${seed} is not a whole number the page can send exactly (|seed| < 2^53)`);
    }
    body.seed = Number(seed);
  }
  if (chat) {
    const system = $("system").value.trim();
    body.messages = [...(system ? [{ role: "system", content: system }] : []), ...state.history,
                     { role: "user", content: text }];
  } else {
    body.prompt = text;
  }
  return body;
}

// The data of each server-sent event of a streamed response ("data: ...", events end with a blank line).
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) yield line.slice(6);
        }
      }
    }
  } finally {                                   // the caller stopped reading: close the response
    reader.cancel().catch(() => {});
  }
}

function figures(f) {
  const parts = [`${f.tokens} tokens`];
  if (f.first !== null) parts.push(`TTFT ${Math.round(f.first - f.start)} ms`);
  if (f.tokens > 1 && f.last > f.first) {       // decode speed: tokens after the first over their time
    parts.push(`${((f.tokens - 1) / ((f.last - f.first) / 1000)).toFixed(1)} tokens/s`);
  }
  parts.push(`finish: ${f.finish}`);
  return parts.join(" · ");
}

async function send() {
  const text = $("input").value;
  if (state.controller || !text.trim()) return;
  const chat = $("mode").value === "chat";
  let body;
  try {
    body = requestBody(chat, text);
  } catch (err) {
    return notice(err.message);
  }
  notice("");
  $("input").value = "";
  addTurn(chat ? "user" : "prompt", text);
  const reply = addTurn(chat ? "assistant" : "completion", "");
  const stats = document.createElement("div");
  stats.className = "stats";
  reply.turn.append(stats);
  const f = { start: performance.now(), first: null, last: null, tokens: 0, chunks: 0, finish: "?" };
  let out = "";
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  try {
    const r = await fetch(chat ? "v1/chat/completions" : "v1/completions",
                          { method: "POST", headers: headers(), body: JSON.stringify(body),
                            signal: state.controller.signal });
    if (!r.ok) throw new ServerError(await errorMessage(r));
    for await (const data of events(r)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new ServerError(event.error.message);
      if (event.usage) f.tokens = event.usage.completion_tokens;
      for (const c of event.choices || []) {
        const piece = chat ? (c.delta.content || "") : (c.text || "");
        if (piece) {
          f.last = performance.now();
          if (f.first === null) f.first = f.last;
          f.chunks += 1;
          out += piece;
          reply.body.textContent = out;         // text, never HTML
        }
        if (c.finish_reason) f.finish = c.finish_reason;
      }
    }
    if (!f.tokens) f.tokens = f.chunks;         // no usage chunk: one event per generated token
  } catch (err) {
    if (err.name === "AbortError") {
      f.finish = "stopped";
      f.tokens = f.chunks;
    } else {
      f.finish = "error";
      reply.turn.classList.add("error");
      reply.body.textContent = err instanceof ServerError ? err.message : `request failed: ${err}`;
    }
  } finally {
    state.controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  if (f.finish !== "error") {
    stats.textContent = figures(f);
    if (chat && reply.turn.isConnected) {       // (not after "New conversation" cleared the log)
      state.history.push({ role: "user", content: text }, { role: "assistant", content: out });
    }
  }
  reply.turn.dataset.finish = f.finish;         // the turn is over (tests wait for this)
  reply.turn.scrollIntoView({ block: "end" });
}

init().catch((err) => notice(`the page could not start: ${err}`));

// The kvserve playground: chat through /v1/chat/completions (stream=true), rendering tokens as they
// arrive. Stop aborts the fetch; the server sees the disconnect and aborts the generation.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], model: null, controller: null };

// Server-sent events, per the EventSource rules: lines end in LF, CRLF or CR; ":" starts a comment;
// one space after "data:" is dropped; data lines join with "\n"; a blank line ends the event.
class SSEParser {
  constructor() { this.buffer = ""; this.data = []; this.afterCR = false; }

  feed(text) {
    if (this.afterCR && text.startsWith("\n")) { text = text.slice(1); this.afterCR = false; }
    if (text) this.afterCR = text.endsWith("\r");
    const lines = (this.buffer + text).split(/\r\n|\r|\n/);
    this.buffer = lines.pop();
    const events = [];
    for (const line of lines) {
      if (line === "") {
        if (this.data.length) events.push(this.data.join("\n"));
        this.data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const name = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (name === "data") this.data.push(value);
      }
    }
    return events;
  }
}

function headers() {
  const key = $("api-key").value.trim();
  const result = { "Content-Type": "application/json" };
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    return typeof error === "object" && error ? error.message : error || body.detail || text;
  } catch { return text || response.statusText; }
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  message.append(label, content);
  $("messages").append(message);
  $("messages").scrollTop = $("messages").scrollHeight;
  return content;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    state.model = (await response.json()).data[0].id;
    $("model").textContent = `model: ${state.model}`;
  } catch (error) {
    $("model").textContent = `model unavailable: ${error.message}`;
  }
}

class Meter {
  constructor() { this.start = performance.now(); this.first = null; this.tokens = 0; }

  token() {
    const now = performance.now();
    if (this.first === null) {
      this.first = now;
      $("ttft").textContent = `${Math.round(now - this.start)} ms`;
    }
    this.tokens += 1;
    this.show(now);
  }

  show(now, exactTokens) {
    if (exactTokens !== undefined) this.tokens = exactTokens;
    $("tokens").textContent = String(this.tokens);
    const seconds = (now - this.first) / 1000;
    if (this.tokens > 1 && seconds > 0) $("tps").textContent = `${((this.tokens - 1) / seconds).toFixed(1)} tok/s`;
  }
}

function requestBody() {
  const system = $("system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.history] : state.history;
  return {
    model: state.model || undefined, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value) || 256,
  };
}

async function streamReply(content, meter) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: state.controller.signal,
  });
  if (!response.ok) throw new Error(`${response.status}: ${await errorMessage(response)}`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  let finish = "done";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    for (const data of parser.feed(value)) {
      if (data.trim() === "[DONE]") return finish;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
      if (chunk.usage) meter.show(performance.now(), chunk.usage.completion_tokens);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (choice.delta && choice.delta.content) {
        content.textContent += choice.delta.content;
        meter.token();
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  }
  return finish;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  if (!state.model) await loadModel();
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const content = addMessage("assistant", "");
  const meter = new Meter();
  state.controller = new AbortController();
  setBusy(true);
  for (const id of ["ttft", "tps"]) $(id).textContent = "–";
  $("tokens").textContent = "0";
  $("status").textContent = "streaming…";
  try {
    $("status").textContent = `finished: ${await streamReply(content, meter)}`;
  } catch (error) {
    if (error.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      content.parentElement.classList.add("error");
      content.textContent += (content.textContent ? "\n" : "") + error.message;
      $("status").textContent = "error";
    }
  } finally {
    if (!content.parentElement.classList.contains("error")) {
      state.history.push({ role: "assistant", content: content.textContent });
    } else {
      state.history.pop();  // the failed turn is not sent again
    }
    state.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("status").textContent = "idle";
});
for (const id of ["temperature", "top-p"]) {
  $(id).addEventListener("input", () => { $(`${id}-value`).textContent = $(id).value; });
}
$("api-key").value = localStorage.getItem("kvserve-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("kvserve-api-key", $("api-key").value.trim());
  loadModel();
});
loadModel();

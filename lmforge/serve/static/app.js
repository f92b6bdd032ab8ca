// lmforge chat page: streams replies from POST v1/chat/completions (OpenAI's SSE format).
// No framework and no CDN; text is always inserted with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "lmforge.chat.";  // localStorage prefix
const conversation = [];  // the conversation: {role, content}
let controller = null;  // AbortController of the reply being streamed

// --- settings kept in localStorage ---------------------------------------------------------

const SETTINGS = ["api-key", "system", "temperature", "top-p", "max-tokens", "seed"];

function loadSettings() {
  for (const id of SETTINGS) {
    const saved = localStorage.getItem(STORE + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => {
      localStorage.setItem(STORE + id, $(id).value);
      if (id === "api-key") loadModels();
    });
  }
  for (const [id, out, digits] of [["temperature", "temperature-value", 2], ["top-p", "top-p-value", 2]]) {
    const show = () => { $(out).textContent = Number($(id).value).toFixed(digits); };
    $(id).addEventListener("input", show);
    show();
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// --- status and errors -----------------------------------------------------------------------

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function errorMessage(response) {
  // OpenAI-shaped: {"error": {"message", "type", "param", "code"}}
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

// --- models ------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) {
      setStatus(await errorMessage(response), true);
      return;
    }
    const body = await response.json();
    const previous = select.value;
    select.replaceChildren();
    for (const m of body.data || []) {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      select.append(option);
    }
    if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
    if ($("status").classList.contains("error")) setStatus("");
  } catch (e) {
    setStatus("Cannot reach the server: " + e.message, true);
  }
}

// --- messages ----------------------------------------------------------------------------------

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.classList.toggle("busy", busy);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    model: $("model").value || "default",
    messages,
    stream: true,
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
  };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
  const seed = parseInt($("seed").value, 10);
  if (Number.isFinite(seed)) body.seed = seed;
  return body;
}

// Reads an SSE stream; calls onData(payload) for each `data:` line until `[DONE]`.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();  // an incomplete last line waits for more bytes
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;  // blank lines, comments, event names
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") return;
        onData(payload);
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // done, failed or aborted: release the connection
  }
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  $("prompt").value = "";
  conversation.push({ role: "user", content: text });
  addBubble("user", text);
  const bubble = addBubble("assistant pending", "");
  let reply = "";
  controller = new AbortController();
  setBusy(true);
  setStatus("Generating…");
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    let finish = null;
    await readEvents(response, (payload) => {
      const chunk = JSON.parse(payload);
      if (chunk.error) throw new Error(chunk.error.message || "error");
      const choice = (chunk.choices || [])[0];
      if (!choice) return;
      const delta = (choice.delta && choice.delta.content) || "";
      if (delta) {
        reply += delta;
        bubble.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    setStatus(finish === "length" ? "Stopped at max_tokens." : "");
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("Stopped.");
      bubble.classList.add("stopped");
    } else {
      setStatus(e.message, true);
      bubble.classList.add("failed");
      if (!reply) bubble.textContent = e.message;
    }
  } finally {
    bubble.classList.remove("pending");
    // keep what arrived (even a stopped reply) so the conversation continues from it
    if (reply) conversation.push({ role: "assistant", content: reply });
    else if (!bubble.classList.contains("failed")) bubble.remove();
    controller = null;
    setBusy(false);
    $("prompt").focus();
  }
}

function stop() {
  if (controller) controller.abort();
}

// --- wiring ------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  loadSettings();
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => {
    stop();
    conversation.length = 0;
    $("messages").replaceChildren();
    setStatus("");
  });
  loadModels();
  $("prompt").focus();
});

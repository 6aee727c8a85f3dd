// instructkit chat page: plain JavaScript, no dependencies, nothing fetched from outside this server.
// Model text is always shown with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], columns: [], controllers: [], busy: false };

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return `HTTP ${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

function addMessage(column, role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  column.list.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function buildColumns() {
  const main = $("columns");
  main.replaceChildren();
  const selected = $("model").value;
  const base = state.models.find((m) => m.role === "base");
  const ids = $("compare").checked && base ? [base.id, state.models.find((m) => m.id !== base.id).id] : [selected];
  state.columns = ids.map((id) => {
    const model = state.models.find((m) => m.id === id);
    const section = document.createElement("section");
    section.className = "column";
    section.dataset.model = id;
    const title = document.createElement("h2");
    title.textContent = `${id} (${model ? model.role : "model"})`;
    const list = document.createElement("div");
    list.className = "messages";
    section.append(title, list);
    main.appendChild(section);
    return { id, list, history: [] };
  });
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function answer(column, userText, controller) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...column.history, { role: "user", content: userText });
  column.history.push({ role: "user", content: userText });
  const bubble = addMessage(column, "assistant", "");
  const text = bubble.querySelector(".text");
  const meta = document.createElement("span");
  meta.className = "meta";
  bubble.appendChild(meta);
  const started = performance.now();
  let pieces = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: column.id, messages, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseEvents(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) {
        const seconds = (performance.now() - started) / 1000;
        meta.textContent = `${chunk.usage.completion_tokens} tokens, ${(chunk.usage.completion_tokens / seconds).toFixed(1)} tokens/s`;
      }
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        text.textContent += choice.delta.content;
        pieces += 1;
        bubble.dataset.updates = String(pieces);
        bubble.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) bubble.dataset.finish = choice.finish_reason;
    }
  } catch (error) {
    if (error.name === "AbortError") {
      bubble.dataset.finish = "stopped";
      meta.textContent = "stopped";
    } else {
      bubble.dataset.finish = "error";
      showError(`${column.id}: ${error.message}`);
    }
  } finally {
    column.history.push({ role: "assistant", content: text.textContent });
    bubble.dataset.done = "true";
  }
}

async function send(event) {
  event.preventDefault();
  const userText = $("message").value;
  if (!userText.trim() || state.busy) return;
  showError("");
  $("message").value = "";
  state.busy = true;
  $("send").disabled = true;
  $("stop").disabled = false;
  state.controllers = state.columns.map(() => new AbortController());
  for (const column of state.columns) addMessage(column, "user", userText);
  await Promise.all(state.columns.map((column, i) => answer(column, userText, state.controllers[i])));
  state.busy = false;
  $("send").disabled = false;
  $("stop").disabled = true;
}

function stop() {
  for (const controller of state.controllers) controller.abort();
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(`Could not list the models: ${await errorText(response)}`);
    return;
  }
  state.models = (await response.json()).data;
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = `${m.id} (${m.role})`;
    return option;
  }));
  const tuned = state.models.find((m) => m.role === "fine-tuned");
  if (tuned) select.value = tuned.id;
  $("compare-label").hidden = !state.models.some((m) => m.role === "base") || state.models.length < 2;
  buildColumns();
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("reset").addEventListener("click", buildColumns);
  $("model").addEventListener("change", buildColumns);
  $("compare").addEventListener("change", buildColumns);
  $("api-key").addEventListener("change", loadModels);
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  loadModels();
});

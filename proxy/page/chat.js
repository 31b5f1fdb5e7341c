// The chat page: one conversation with the gateway's OpenAI API, streamed with fetch and a stream reader.
// Each network chunk is parsed and painted as soon as it is read; nothing is held back or animated.

import { renderMarkdown } from "./markdown.js";
import { SseDecoder } from "./sse.js";
import { paintStrip, parseServerTiming } from "./timing.js";

const byId = (id) => document.getElementById(id);
const ui = {
  model: byId("model"),
  thinking: byId("thinking"),
  maxTokens: byId("max-tokens"),
  newChat: byId("new-chat"),
  apiKeyLabel: byId("api-key-label"),
  apiKey: byId("api-key"),
  status: byId("status"),
  transcript: byId("transcript"),
  composer: byId("composer"),
  prompt: byId("prompt"),
  send: byId("send"),
  stop: byId("stop"),
};

const TIMING_COMMENT = "flushgate-timing ";
// A gateway started with --api-key answers 401 until the page sends a key; it is kept for this tab only.
const KEY_STORE = "flushgate-api-key";
let apiKey = sessionStorage.getItem(KEY_STORE) ?? "";
const history = []; // the conversation sent with each request: {role, content}
let inFlight = null; // the AbortController of the streaming request

function setStatus(text) {
  ui.status.textContent = text;
}

function updateControls() {
  const busy = inFlight !== null;
  ui.send.disabled = busy || !ui.model.value;
  ui.stop.disabled = !busy;
  ui.newChat.disabled = busy;
  ui.model.disabled = busy;
}

function withKey(headers) {
  return apiKey ? { ...headers, Authorization: `Bearer ${apiKey}` } : headers;
}

function askForKey(problem) {
  ui.apiKeyLabel.hidden = false;
  setStatus(`${problem}: enter this gateway's API key`);
  ui.apiKey.focus();
}

function errorText(payload, response) {
  const message = payload?.error?.message ?? payload?.message ?? payload?.detail;
  const status = response ? `${response.status} ${response.statusText}`.trim() : "";
  if (typeof message === "string" && message) return status ? `${status}: ${message}` : message;
  return status || "unknown error";
}

async function loadModels() {
  let retryS = 2;
  try {
    const response = await fetch("/v1/models", { headers: withKey({ Accept: "application/json" }) });
    const payload = await response.json().catch(() => null);
    if (response.status === 401) {
      askForKey(errorText(payload, response)); // tried again once a key is entered
      return;
    }
    if (response.ok && Array.isArray(payload?.data)) {
      const options = payload.data.map(({ id }) => {
        const option = document.createElement("option");
        option.value = id;
        option.textContent = id;
        return option;
      });
      ui.model.replaceChildren(...options);
      setStatus(options.length ? "" : "the engine serves no model");
      updateControls();
      return;
    }
    retryS = Number(response.headers.get("Retry-After")) || retryS;
    const problem = response.ok ? "the answer has no model list" : errorText(payload, response);
    setStatus(`models: ${problem}; retrying in ${retryS} s`);
  } catch (error) {
    setStatus(`models: the gateway cannot be reached (${error.message}); retrying in ${retryS} s`);
  }
  setTimeout(loadModels, retryS * 1000);
}

function scrollIfFollowing(follow) {
  if (follow) ui.transcript.scrollTop = ui.transcript.scrollHeight;
}

function isFollowing() {
  const t = ui.transcript;
  return t.scrollHeight - t.scrollTop - t.clientHeight < 40;
}

function addMessage(role, label) {
  const article = document.createElement("article");
  article.className = `message ${role}`;
  const heading = document.createElement("div");
  heading.className = "role";
  heading.textContent = label;
  article.append(heading);
  ui.transcript.append(article);
  return article;
}

function addUserMessage(text) {
  const article = addMessage("user", "You");
  const body = document.createElement("div");
  body.className = "body";
  body.textContent = text;
  article.append(body);
  return article;
}

/** One answer being streamed: its nodes, its text so far and its timing. */
class Turn {
  constructor(model) {
    this.article = addMessage("assistant", model);
    this.article.dataset.state = "streaming";
    this.article.setAttribute("aria-busy", "true"); // screen readers wait for the finished answer
    this.reasoningBox = document.createElement("details");
    this.reasoningBox.className = "reasoning";
    this.reasoningBox.hidden = true;
    this.reasoningBox.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    this.reasoningBody = document.createElement("div");
    this.reasoningBody.className = "reasoning-body";
    this.reasoningBox.append(summary, this.reasoningBody);
    this.body = document.createElement("div");
    this.body.className = "body";
    this.notice = document.createElement("div");
    this.notice.className = "notice";
    this.notice.hidden = true;
    this.strip = document.createElement("div");
    this.strip.className = "strip";
    this.article.append(this.reasoningBox, this.body, this.notice, this.strip);

    this.content = "";
    this.reasoning = "";
    this.done = false; // "data: [DONE]" seen
    this.failed = false;
    this.finishReason = null;
    this.decoder = new SseDecoder();
    this.stats = {
      startedAt: performance.now(),
      firstAt: null,
      lastAt: null,
      endedAt: null,
      chunks: 0,
      usageTokens: null,
      serverTiming: new Map(),
      record: null,
      requestId: null,
    };
    this.paint();
  }

  headers(response) {
    this.stats.serverTiming = parseServerTiming(response.headers.get("Server-Timing"));
    this.stats.requestId = response.headers.get("X-Request-ID");
  }

  /** Parses one network chunk and paints the result at once; ``null`` marks the end of the body. */
  receive(bytes) {
    for (const item of bytes === null ? this.decoder.end() : this.decoder.push(bytes)) {
      if (item.kind === "comment") this.comment(item.text);
      else this.event(item.data);
    }
    this.paint();
  }

  comment(text) {
    if (!text.startsWith(TIMING_COMMENT)) return;
    try {
      this.stats.record = JSON.parse(text.slice(TIMING_COMMENT.length));
    } catch {
      // a malformed summary only costs the split; the answer itself is unaffected
    }
  }

  event(data) {
    if (data === "[DONE]") {
      this.done = true;
      return;
    }
    let payload;
    try {
      payload = JSON.parse(data);
    } catch {
      this.fail(`the stream carried an event that is not JSON: ${data.slice(0, 200)}`);
      return;
    }
    if (payload.error) {
      this.fail(errorText(payload));
      return;
    }
    for (const choice of payload.choices ?? []) {
      const delta = choice.delta ?? {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (typeof reasoning === "string" && reasoning) {
        this.reasoning += reasoning;
        this.tick();
      }
      if (typeof delta.content === "string" && delta.content) {
        if (!this.content && this.reasoning) this.reasoningBox.open = false; // the answer began: fold the reasoning
        this.content += delta.content;
        this.tick();
      }
      if (choice.finish_reason) this.finishReason = choice.finish_reason;
    }
    if (payload.usage?.completion_tokens !== undefined) this.stats.usageTokens = payload.usage.completion_tokens;
  }

  tick() {
    const now = performance.now();
    this.stats.firstAt ??= now;
    this.stats.lastAt = now;
    this.stats.chunks += 1;
  }

  paint() {
    const follow = isFollowing();
    if (this.reasoning) {
      this.reasoningBox.hidden = false;
      this.reasoningBody.replaceChildren(renderMarkdown(this.reasoning));
    }
    this.body.replaceChildren(renderMarkdown(this.content));
    paintStrip(this.strip, this.stats);
    scrollIfFollowing(follow);
  }

  say(text, className) {
    this.notice.hidden = false;
    this.notice.className = `notice ${className}`;
    this.notice.textContent = text;
  }

  fail(message) {
    this.failed = true;
    this.article.dataset.state = "error";
    this.say(message, "error");
  }

  finish(state, note) {
    this.stats.endedAt = performance.now();
    this.article.removeAttribute("aria-busy");
    if (!this.failed) {
      this.article.dataset.state = state;
      if (note) this.say(note, state);
    }
    this.paint();
  }

  end() {
    if (this.failed) this.finish("error");
    else if (!this.done) this.finish("truncated", "the stream ended before the answer was complete");
    else if (this.finishReason === "length") this.finish("done", "stopped at the token limit");
    else this.finish("done");
  }
}

function requestBody(messages) {
  const body = {
    model: ui.model.value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: ui.thinking.checked },
  };
  const maxTokens = parseInt(ui.maxTokens.value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function stream(turn, body, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: withKey({ "Content-Type": "application/json", Accept: "text/event-stream", "X-Flushgate-Timing": "summary" }),
    body: JSON.stringify(body),
    signal,
  });
  turn.headers(response);
  if (!response.ok) {
    const problem = errorText(await response.json().catch(() => null), response);
    turn.fail(problem);
    if (response.status === 401) askForKey(problem);
    return;
  }
  const reader = response.body.getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    turn.receive(value);
  }
  turn.receive(null);
}

async function send(text) {
  const user = { role: "user", content: text };
  const userArticle = addUserMessage(text);
  const turn = new Turn(ui.model.value);
  const body = requestBody([...history, user]);
  const controller = new AbortController();
  inFlight = controller;
  updateControls();
  try {
    await stream(turn, body, controller.signal);
    turn.end();
  } catch (error) {
    if (error.name === "AbortError") turn.finish("stopped", "stopped");
    else {
      turn.fail(`the request failed: ${error.message}`);
      turn.finish("error");
    }
  } finally {
    if (turn.content) history.push(user, { role: "assistant", content: turn.content });
    else userArticle.classList.add("unanswered"); // left out of the history, so the next turn stays well-formed
    inFlight = null;
    updateControls();
    ui.prompt.focus();
  }
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text || inFlight !== null || !ui.model.value) return;
  ui.prompt.value = "";
  send(text);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.stop.addEventListener("click", () => inFlight?.abort());

ui.newChat.addEventListener("click", () => {
  history.length = 0;
  ui.transcript.replaceChildren();
  ui.prompt.focus();
});

ui.apiKey.addEventListener("change", () => {
  apiKey = ui.apiKey.value.trim();
  sessionStorage.setItem(KEY_STORE, apiKey);
  setStatus("");
  loadModels();
});

ui.model.addEventListener("change", updateControls);
if (apiKey) ui.apiKeyLabel.hidden = false; // a key from earlier in this tab: shown, so it can be changed
updateControls();
loadModels();

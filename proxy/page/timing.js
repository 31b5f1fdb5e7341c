// The latency strip under each answer: what the browser measured (time to first token, rate) and where the
// gateway says the time went. Two sources from flushgate: the Server-Timing header (known before the body starts:
// client-body, upstream-connect, engine-ttfb) and the ": flushgate-timing {...}" comment that ends the stream
// when the request carries "X-Flushgate-Timing: summary" (the request's record: first_token_ms, total_ms, tokens,
// decode_tok_s and the split of total_ms by hop).

// The record's split, in the order the time is spent; a record without vLLM's own timing has engine_ms instead.
export const SPLIT_PARTS = [
  ["client_link_ms", "client link"],
  ["gateway_ms", "gateway"],
  ["engine_queue_ms", "queue"],
  ["engine_prefill_ms", "prefill"],
  ["engine_decode_ms", "decode"],
  ["engine_frontend_ms", "engine frontend"],
  ["engine_ms", "engine"],
];

/** "a;dur=1.5, b;dur=0;desc=\"reused\"" as a Map of name to {dur, desc}. */
export function parseServerTiming(header) {
  const entries = new Map();
  for (const metric of (header ?? "").split(",")) {
    const [name, ...params] = metric.split(";").map((part) => part.trim());
    if (!name) continue;
    const entry = { dur: null, desc: null };
    for (const param of params) {
      const eq = param.indexOf("=");
      if (eq < 0) continue;
      const key = param.slice(0, eq).trim().toLowerCase();
      const value = param.slice(eq + 1).trim().replace(/^"(.*)"$/, "$1");
      if (key === "dur" && Number.isFinite(Number(value))) entry.dur = Number(value);
      else if (key === "desc") entry.desc = value;
    }
    entries.set(name, entry);
  }
  return entries;
}

export function formatMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return "–";
  if (ms >= 1000) return `${(ms / 1000).toFixed(2)} s`;
  if (ms >= 10) return `${Math.round(ms)} ms`;
  if (ms >= 1) return `${ms.toFixed(1)} ms`;
  return `${ms.toFixed(2)} ms`;
}

function span(className, text, data = {}) {
  const node = document.createElement("span");
  node.className = className;
  node.textContent = text;
  Object.assign(node.dataset, data);
  return node;
}

/**
 * Paints a turn's figures into ``container``; called on every chunk with the turn's current stats:
 * {startedAt, firstAt, lastAt, endedAt, chunks, usageTokens, serverTiming, record, requestId}.
 */
export function paintStrip(container, stats) {
  const figures = document.createElement("div");
  figures.className = "figures";
  const ttft = stats.firstAt === null ? null : stats.firstAt - stats.startedAt;
  figures.append(span("figure ttft", `TTFT ${formatMs(ttft)}`, ttft === null ? {} : { ms: ttft.toFixed(3) }));
  figures.append(span("figure rate", rateText(stats)));
  const tokens = stats.record?.tokens ?? stats.usageTokens;
  if (tokens !== null && tokens !== undefined) figures.append(span("figure tokens", `${tokens} tokens`));
  else if (stats.chunks) figures.append(span("figure tokens", `${stats.chunks} chunks`));
  if (stats.endedAt !== null) figures.append(span("figure total", `total ${formatMs(stats.endedAt - stats.startedAt)}`));

  const parts = [figures];
  const split = stats.record?.split;
  if (split) parts.push(splitBar(split, stats.record.total_ms));
  const hops = hopsLine(stats);
  if (hops.childNodes.length) parts.push(hops);
  container.replaceChildren(...parts);
}

function rateText(stats) {
  const record = stats.record;
  if (record?.decode_tok_s) return `${record.decode_tok_s} tok/s`;
  if (record?.chunk_rate_s) return `${record.chunk_rate_s} chunks/s`;
  if (stats.chunks > 1 && stats.lastAt > stats.firstAt) {
    return `≈ ${((stats.chunks - 1) / ((stats.lastAt - stats.firstAt) / 1000)).toFixed(1)} tok/s`;
  }
  return "– tok/s";
}

function splitBar(split, totalMs) {
  const known = SPLIT_PARTS.filter(([key]) => typeof split[key] === "number");
  const total = totalMs || known.reduce((sum, [key]) => sum + Math.max(0, split[key]), 0) || 1;
  const bar = document.createElement("div");
  bar.className = "split-bar";
  bar.setAttribute("role", "img");
  const legend = document.createElement("div");
  legend.className = "split-legend";
  for (const [key, label] of known) {
    const ms = split[key];
    const segment = document.createElement("span");
    segment.className = `segment ${key.replace(/_ms$/, "").replace(/_/g, "-")}`;
    segment.style.flexGrow = String(Math.max(0, ms) / total);
    segment.title = `${label} ${formatMs(ms)}`;
    bar.append(segment);
    const entry = span(`part ${key.replace(/_ms$/, "").replace(/_/g, "-")}`, "", { part: key, ms: String(ms) });
    entry.append(span("swatch", ""), document.createTextNode(`${label} ${formatMs(ms)}`));
    legend.append(entry);
  }
  bar.setAttribute("aria-label", `where ${formatMs(total)} went: ${legend.textContent}`);
  const wrap = document.createElement("div");
  wrap.className = "split";
  wrap.append(bar, legend);
  return wrap;
}

function hopsLine(stats) {
  const line = document.createElement("div");
  line.className = "hops";
  const add = (text) => line.append(span("hop", text));
  const record = stats.record;
  if (record?.first_token_ms !== undefined && record?.first_token_ms !== null) {
    add(`first token at gateway ${formatMs(record.first_token_ms)}`);
  }
  const timing = stats.serverTiming;
  const ttfb = timing.get("engine-ttfb");
  if (ttfb?.dur !== null && ttfb?.dur !== undefined) add(`engine headers ${formatMs(ttfb.dur)}`);
  const connect = timing.get("upstream-connect");
  if (connect) add(connect.desc === "reused" ? "engine connection reused" : `engine connect ${formatMs(connect.dur)}`);
  const body = timing.get("client-body");
  if (body?.dur !== null && body?.dur !== undefined) add(`request body ${formatMs(body.dur)}`);
  if (record?.gap_max_ms) add(`largest gap ${formatMs(record.gap_max_ms)}`);
  if (stats.requestId) add(`id ${stats.requestId}`);
  return line;
}

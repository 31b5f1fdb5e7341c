// A small Markdown subset for model output, built as DOM nodes. Model text only ever becomes Text nodes
// (document.createTextNode / textContent) or checked attribute values: no string is parsed as HTML, so an
// answer that contains markup or script shows it as text. Rendering runs on every chunk of a stream, so an
// unclosed code fence is shown as code so far and an unclosed "**" as plain text.
//
// Blocks: paragraphs, # headings, fenced code, lists (nested by indent), > quotes, tables, rules.
// Inline: `code`, **strong**, *em*, _em_, ~~del~~, [links](https://...) and <https://...> (http, https, mailto).

const FENCE_OPEN = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*))?$/;
const TABLE_RULE = /^\s*\|?\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_LINK = /^(?:https?:\/\/|mailto:)/i;

const INLINE = new RegExp(
  [
    "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)", // 1, 2: code span
    "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*", // 3: strong
    "__(?=\\S)([\\s\\S]*?\\S)__(?!\\w)", // 4: strong
    "~~(?=\\S)([\\s\\S]*?\\S)~~", // 5: strikethrough
    "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*", // 6: emphasis
    "_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?!\\w)", // 7: emphasis
    '\\[([^\\]\\n]+)\\]\\(\\s*<?([^\\s()<>]+)>?(?:\\s+"[^"\\n]*")?\\s*\\)', // 8, 9: link
    "<((?:https?://|mailto:)[^\\s<>]+)>", // 10: autolink
  ].join("|"),
  "g",
);

/** Model text as a DocumentFragment of safe nodes. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  appendBlocks(fragment, text.replace(/\r\n?/g, "\n").split("\n"));
  return fragment;
}

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

function indentOf(line) {
  return line.length - line.trimStart().length;
}

function startsBlock(lines, i) {
  const line = lines[i];
  return (
    FENCE_OPEN.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    (ITEM.test(line) && ITEM.exec(line)[3] !== undefined) ||
    isTableStart(lines, i)
  );
}

function appendBlocks(parent, lines) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i += 1;
    } else if ((match = FENCE_OPEN.exec(line))) {
      i = codeBlock(parent, lines, i, match);
    } else if ((match = HEADING.exec(line))) {
      const heading = el(`h${match[1].length}`);
      appendInline(heading, match[2]);
      parent.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const inner = [];
      for (; i < lines.length && (match = QUOTE.exec(lines[i])); i += 1) inner.push(match[1]);
      const quote = el("blockquote");
      appendBlocks(quote, inner);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(parent, lines, i);
    } else if (isTableStart(lines, i)) {
      i = table(parent, lines, i);
    } else {
      const paragraph = [line.trim()];
      for (i += 1; i < lines.length && lines[i].trim() && !startsBlock(lines, i); i += 1) paragraph.push(lines[i].trim());
      const p = el("p");
      appendInline(p, paragraph.join("\n"));
      parent.append(p);
    }
  }
}

function codeBlock(parent, lines, i, open) {
  const fence = open[1];
  const close = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
  const body = [];
  for (i += 1; i < lines.length && !close.test(lines[i]); i += 1) body.push(lines[i]);
  const block = el("div", "code-block");
  if (open[2]) {
    const language = el("div", "code-language");
    language.textContent = open[2];
    block.append(language);
  }
  const pre = el("pre");
  const code = el("code");
  code.textContent = body.join("\n");
  pre.append(code);
  block.append(pre);
  parent.append(block);
  return i + 1; // past the closing fence (or the end, while the block is still streaming)
}

function list(parent, lines, i) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  let item = null;
  let contentIndent = 0;
  const flush = () => {
    if (item === null) return;
    const li = el("li");
    appendBlocks(li, item);
    if (!item.includes("")) {
      // a tight item: its paragraphs are bare text, as in any Markdown renderer
      for (const child of [...li.childNodes]) if (child.nodeName === "P") child.replaceWith(...child.childNodes);
    }
    node.append(li);
  };
  while (i < lines.length) {
    const line = lines[i];
    const match = ITEM.exec(line);
    if (match && match[1].length <= indent + 1 && /\d/.test(match[2]) === ordered) {
      flush();
      item = [match[3] ?? ""];
      contentIndent = match[1].length + match[2].length + 1;
    } else if (!line.trim()) {
      let next = i + 1;
      while (next < lines.length && !lines[next].trim()) next += 1;
      if (next >= lines.length || indentOf(lines[next]) <= indent) {
        const sibling = next < lines.length && ITEM.exec(lines[next]);
        if (!sibling || /\d/.test(sibling[2]) !== ordered) break;
      }
      item.push("");
    } else if (indentOf(line) > indent) {
      item.push(line.slice(Math.min(indentOf(line), contentIndent)));
    } else if (!match && !startsBlock(lines, i)) {
      item.push(line.trim()); // a lazy continuation of the item's paragraph
    } else {
      break;
    }
    i += 1;
  }
  flush();
  parent.append(node);
  return i;
}

function isTableStart(lines, i) {
  return i + 1 < lines.length && lines[i].includes("|") && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("-");
}

function cells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

function table(parent, lines, i) {
  const align = cells(lines[i + 1]).map((spec) => {
    if (spec.startsWith(":") && spec.endsWith(":")) return "center";
    if (spec.endsWith(":")) return "right";
    return "";
  });
  const node = el("table");
  const addRow = (section, line, tag) => {
    const row = el("tr");
    cells(line).forEach((text, column) => {
      const cell = el(tag);
      if (align[column]) cell.style.textAlign = align[column];
      appendInline(cell, text);
      row.append(cell);
    });
    section.append(row);
  };
  const head = el("thead");
  addRow(head, lines[i], "th");
  const body = el("tbody");
  for (i += 2; i < lines.length && lines[i].trim() && lines[i].includes("|"); i += 1) addRow(body, lines[i], "td");
  node.append(head, body);
  const wrap = el("div", "table-wrap");
  wrap.append(node);
  parent.append(wrap);
  return i;
}

/** Inline Markdown of ``text`` appended to ``parent``; everything that is not markup stays a Text node. */
export function appendInline(parent, text) {
  let rest = text;
  while (rest) {
    const found = nextInline(rest);
    if (found === null) {
      parent.append(document.createTextNode(rest));
      return;
    }
    if (found.index > 0) parent.append(document.createTextNode(rest.slice(0, found.index)));
    parent.append(found.node);
    rest = rest.slice(found.index + found.length);
  }
}

function nextInline(text) {
  INLINE.lastIndex = 0;
  for (let m; (m = INLINE.exec(text)); ) {
    const node = inlineNode(m, text);
    if (node !== null) return { index: m.index, length: m[0].length, node };
    INLINE.lastIndex = m.index + 1;
  }
  return null;
}

function inlineNode(m, text) {
  const before = text[m.index - 1] ?? "";
  if (m[2] !== undefined) {
    const code = el("code");
    const inner = m[2];
    code.textContent = /^ .* $/s.test(inner) && inner.trim() ? inner.slice(1, -1) : inner;
    return code;
  }
  const wrapped = (tag, inner) => {
    const node = el(tag);
    appendInline(node, inner);
    return node;
  };
  if (m[3] !== undefined) return wrapped("strong", m[3]);
  if (m[4] !== undefined) return /\w/.test(before) ? null : wrapped("strong", m[4]);
  if (m[5] !== undefined) return wrapped("del", m[5]);
  if (m[6] !== undefined) return wrapped("em", m[6]);
  if (m[7] !== undefined) return /\w/.test(before) ? null : wrapped("em", m[7]);
  const href = m[9] ?? m[10];
  if (href !== undefined) {
    if (!SAFE_LINK.test(href)) return null; // javascript:, data:, relative ...: left as the text it was
    const link = el("a");
    link.href = href;
    link.rel = "noopener noreferrer nofollow";
    link.target = "_blank";
    if (m[8] !== undefined) appendInline(link, m[8]);
    else link.textContent = href;
    return link;
  }
  return null;
}

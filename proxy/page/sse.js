// Server-sent events, parsed as the bytes come: a network chunk may end anywhere, mid-line or mid-event, and
// lines may end in LF, CRLF or CR (the WHATWG event-stream rules). Comment lines (": ...") are handed out as
// they are, because the gateway's end-of-stream timing summary is one.

const LINE_END = /\r\n|\r|\n/g;

export class SseParser {
  #buffer = "";
  #data = [];
  #event = "";
  #skipLeadingLf = false; // a CR ended the last chunk: a LF opening the next one belongs to it

  /** Feeds decoded text; returns what it completed: {kind: "event", event, data} and {kind: "comment", text}. */
  push(text) {
    const out = [];
    if (this.#skipLeadingLf && text.startsWith("\n")) text = text.slice(1);
    this.#skipLeadingLf = false;
    this.#buffer += text;
    let start = 0;
    LINE_END.lastIndex = 0;
    for (let match; (match = LINE_END.exec(this.#buffer)); ) {
      if (match[0] === "\r" && match.index === this.#buffer.length - 1) this.#skipLeadingLf = true;
      this.#line(this.#buffer.slice(start, match.index), out);
      start = LINE_END.lastIndex;
    }
    this.#buffer = this.#buffer.slice(start);
    return out;
  }

  /** True when the stream stopped inside an event (an unterminated line or data not yet dispatched). */
  get incomplete() {
    return this.#buffer.length > 0 || this.#data.length > 0;
  }

  #line(line, out) {
    if (line === "") {
      if (this.#data.length) out.push({ kind: "event", event: this.#event || "message", data: this.#data.join("\n") });
      this.#data = [];
      this.#event = "";
      return;
    }
    if (line.startsWith(":")) {
      out.push({ kind: "comment", text: line.slice(1).replace(/^ /, "") });
      return;
    }
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "data") this.#data.push(value);
    else if (field === "event") this.#event = value;
    // "id" and "retry" steer reconnection, which a chat request never does.
  }
}

/** The parser fed with bytes: UTF-8 is decoded across chunk boundaries, so a character split in two survives. */
export class SseDecoder {
  #decoder = new TextDecoder();
  #parser = new SseParser();

  push(bytes) {
    return this.#parser.push(this.#decoder.decode(bytes, { stream: true }));
  }

  end() {
    return this.#parser.push(this.#decoder.decode());
  }
}

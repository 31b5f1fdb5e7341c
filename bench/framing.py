"""HTTP/1.1 message framing and SSE event splitting, fed bytes in whatever pieces the socket gave.

The benchmark measures when each event reached the client, so it must see the bytes exactly as they arrived:
no client library, no buffering between the socket and the clock. These parsers take the recorded pieces
afterwards and say which event each piece completed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FramingError(ValueError):
    """The bytes are not a valid HTTP/1.1 message."""


class BodyMode(Enum):
    CHUNKED = "chunked"
    LENGTH = "length"
    UNTIL_CLOSE = "until_close"
    EMPTY = "empty"


@dataclass(slots=True)
class Head:
    """Start line and header fields of one message, names lower-cased."""

    start_line: str
    headers: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def status(self) -> int:
        """Status code of a response (``HTTP/1.1 200 OK``)."""
        parts = self.start_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            raise FramingError(f"not a status line: {self.start_line!r}")
        return int(parts[1])

    @property
    def method_and_target(self) -> tuple[str, str]:
        """Method and request target of a request (``POST /v1/chat/completions HTTP/1.1``)."""
        parts = self.start_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise FramingError(f"not a request line: {self.start_line!r}")
        return parts[0], parts[1]


def body_mode(head: Head, *, is_response: bool) -> tuple[BodyMode, int]:
    """RFC 9112 section 6.3: how the body of this message is delimited, and its length when it has one."""
    if is_response:
        status = head.status
        if 100 <= status < 200 or status in (204, 304):
            return BodyMode.EMPTY, 0
    encoding = head.get("transfer-encoding")
    if encoding is not None:
        if encoding.lower().rsplit(",", 1)[-1].strip() != "chunked":
            raise FramingError(f"unsupported transfer-encoding {encoding!r}")
        return BodyMode.CHUNKED, 0
    length = head.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise FramingError(f"bad content-length {length!r}")
        return BodyMode.LENGTH, int(length)
    return (BodyMode.UNTIL_CLOSE, 0) if is_response else (BodyMode.EMPTY, 0)


class _State(Enum):
    HEAD = 1
    SIZE = 2
    DATA = 3
    DATA_END = 4
    TRAILERS = 5
    LENGTH = 6
    UNTIL_CLOSE = 7
    DONE = 8


@dataclass(slots=True)
class MessageParser:
    """One HTTP/1.1 message, fed incrementally; :meth:`feed` returns the body bytes it could decode.

    ``complete`` turns true at the message's end (the zero-size chunk and trailers, the last byte of
    Content-Length, or EOF for a response delimited by close). Bytes after the end are kept in ``excess``.
    """

    is_response: bool = True
    head: Head | None = None
    mode: BodyMode | None = None
    length: int = 0
    complete: bool = False
    excess: bytes = b""
    _buf: bytearray = field(default_factory=bytearray)
    _state: _State = _State.HEAD
    _remaining: int = 0

    def feed(self, data: bytes) -> list[bytes]:
        if self.complete:
            self.excess += data
            return []
        self._buf += data
        out: list[bytes] = []
        while self._step(out):
            pass
        return out

    def feed_eof(self) -> None:
        """The peer closed; only a close-delimited body ends this way, anything else stays incomplete."""
        if self._state is _State.UNTIL_CLOSE:
            self._finish()

    def _finish(self) -> None:
        self._state = _State.DONE
        self.complete = True
        self.excess = bytes(self._buf)
        self._buf.clear()

    def _line(self) -> bytes | None:
        end = self._buf.find(b"\r\n")
        if end < 0:
            return None
        line = bytes(self._buf[:end])
        del self._buf[: end + 2]
        return line

    def _step(self, out: list[bytes]) -> bool:
        """Advance by one framing element; False when more bytes are needed or the message ended."""
        state = self._state
        buf = self._buf
        if state is _State.HEAD:
            return self._parse_head()
        if state is _State.SIZE:
            line = self._line()
            if line is None:
                return False
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise FramingError(f"bad chunk size line {line!r}") from None
            if size_text.startswith((b"-", b"+", b"0x", b"0X")):
                raise FramingError(f"bad chunk size line {line!r}")
            if size == 0:
                self._state = _State.TRAILERS
            else:
                self._remaining = size
                self._state = _State.DATA
            return True
        if state is _State.DATA or state is _State.LENGTH:
            if not buf:
                return False
            take = min(self._remaining, len(buf))
            out.append(bytes(buf[:take]))
            del buf[:take]
            self._remaining -= take
            if self._remaining:
                return False
            if state is _State.LENGTH:
                self._finish()
                return False
            self._state = _State.DATA_END
            return True
        if state is _State.DATA_END:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise FramingError(f"chunk data not followed by CRLF: {bytes(buf[:2])!r}")
            del buf[:2]
            self._state = _State.SIZE
            return True
        if state is _State.TRAILERS:
            line = self._line()
            if line is None:
                return False
            if line == b"":
                self._finish()
                return False
            return True
        if state is _State.UNTIL_CLOSE:
            if buf:
                out.append(bytes(buf))
                buf.clear()
            return False
        return False

    def _parse_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
        del self._buf[: end + 4]
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise FramingError(f"bad header line {line!r}")
            headers.append((name.lower(), value.strip()))
        self.head = Head(lines[0], headers)
        mode, length = body_mode(self.head, is_response=self.is_response)
        self.mode = mode
        self.length = length
        if mode is BodyMode.CHUNKED:
            self._state = _State.SIZE
        elif mode is BodyMode.LENGTH and length > 0:
            self._state = _State.LENGTH
            self._remaining = length
        elif mode is BodyMode.UNTIL_CLOSE:
            self._state = _State.UNTIL_CLOSE
        else:
            self._finish()
            return False
        return True


@dataclass(slots=True)
class EventSplitter:
    """Splits an event-stream body into events at blank lines (``\\n\\n`` or ``\\r\\n\\r\\n``)."""

    _buf: bytes = b""

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        events: list[bytes] = []
        start = 0
        while True:
            lf = buf.find(b"\n\n", start)
            crlf = buf.find(b"\r\n\r\n", start)
            if lf < 0 and crlf < 0:
                break
            if crlf >= 0 and (lf < 0 or crlf < lf):
                events.append(buf[start:crlf])
                start = crlf + 4
            else:
                events.append(buf[start:lf])
                start = lf + 2
        self._buf = buf[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not yet ended by a blank line."""
        return self._buf


def event_data(event: bytes) -> bytes | None:
    """The ``data:`` field of one SSE event (lines joined by ``\\n``), or None if it has none."""
    parts = [
        line[5:].removeprefix(b" ") for line in event.replace(b"\r\n", b"\n").split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(parts) if parts else None

"""Split an engine's server-sent event stream into the data of each event, as the bytes arrive.

Only framing is kept between reads: the unfinished tail of the last event. Comment lines (vLLM's keep-alives)
and fields other than ``data`` are dropped.
"""

from __future__ import annotations


class SseEvents:
    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The ``data`` of every event completed by ``chunk``, in order."""
        data = self._tail + chunk if self._tail else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        if b"\n\n" not in data:
            self._tail = data
            return []
        *events, self._tail = data.split(b"\n\n")
        out = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
                out.append(event[6:])
                continue
            payload = _data_of(event)
            if payload is not None:
                out.append(payload)
        return out

    @property
    def pending(self) -> bool:
        """Whether an event was started but not finished."""
        return bool(self._tail.strip())


def _data_of(event: bytes) -> bytes | None:
    lines = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    return b"\n".join(lines) if lines else None

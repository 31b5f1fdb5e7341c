"""How each request's bytes reached the load generator: how many pieces, and those in which a token had waited.

A scenario's delay percentiles pool every token of every stream. This tells apart the two ways a p99 rises: many
tokens a little late, or a few streams that stalled once (a whole run of tokens arriving together, late), and
where in the stream that happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flushgate.bench.framing import FramingError, MessageParser
from flushgate.bench.loadgen import Recording, token_pieces
from flushgate.bench.stats import percentile

LATE_MS = 0.5  # a piece is listed when a token in it waited longer than this
KEEP_LATE = 8  # listed per request, the earliest first; the rest are only counted


@dataclass(frozen=True, slots=True)
class LatePiece:
    at_ms: float  # since the request's first piece
    size: int
    tokens: int
    first_seq: int
    waited_ms: float  # the longest any token in the piece waited since the engine wrote it


@dataclass(frozen=True, slots=True)
class Arrivals:
    pieces: int
    largest_piece: int
    span_ms: float  # first piece to last
    delay_p50_ms: float | None
    delay_p99_ms: float | None
    late_pieces: int
    late: list[LatePiece] = field(default_factory=list)


def arrivals(recording: Recording, late_ms: float = LATE_MS, keep: int = KEEP_LATE) -> Arrivals:
    """Walk the recorded pieces as the load generator's analysis does, noting each piece's tokens and waits."""
    delays: list[float] = []
    late: list[LatePiece] = []
    late_count = 0
    first_ns = recording.pieces[0][0] if recording.pieces else 0
    try:
        for recv_ns, piece, stamps, _ in token_pieces(recording, MessageParser()):
            waits = [(recv_ns - sent_ns) / 1e6 for _, sent_ns in stamps]
            delays += waits
            waited = max(waits, default=0.0)
            if waited > late_ms:
                late_count += 1
                if len(late) < keep:
                    at_ms = round((recv_ns - first_ns) / 1e6, 3)
                    late.append(LatePiece(at_ms, len(piece), len(stamps), stamps[0][0], waited))
    except FramingError:
        pass  # the load generator's analysis reports it; what was read up to there is still told here
    span = (recording.pieces[-1][0] - first_ns) / 1e6 if recording.pieces else 0.0
    return Arrivals(
        pieces=len(recording.pieces),
        largest_piece=max((len(p) for _, p in recording.pieces), default=0),
        span_ms=span,
        delay_p50_ms=percentile(delays, 50) if delays else None,
        delay_p99_ms=percentile(delays, 99) if delays else None,
        late_pieces=late_count,
        late=late,
    )

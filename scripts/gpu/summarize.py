"""Turns scripts/gpu/run.sh results (paths-*.json, records-*.jsonl, ready-*.json) into the tables of docs/gpu.md."""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

PATHS = ("direct", "flushgate", "buffered")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def load_records(path: Path) -> dict[str, dict[str, Any]]:
    records = {}
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "request":
            records[event["request_id"]] = event
    return records


def engine_load_s(path: Path) -> float | None:
    for line in path.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "engine_ready":
            return float(event["load_s"])
    return None


def summarize(results: Path, phase: str) -> str:
    bench = json.loads((results / f"paths-{phase}.json").read_text())
    if bench["args"].get("probe"):
        return summarize_probe(results, phase, bench)
    if bench["args"].get("mixed"):
        return summarize_mixed(results, phase, bench)
    records = load_records(results / f"records-{phase}.jsonl")
    ready = json.loads((results / f"ready-{phase}.json").read_text())
    groups: dict[tuple[bool, int, str], list[dict[str, Any]]] = defaultdict(list)
    for row in bench["rows"]:
        groups[(row["thinking"], row["streams"], row["path"])].append(row)

    out = [
        f"### {phase}: engine ready in {engine_load_s(results / f'records-{phase}.jsonl')} s "
        f"(vLLM start to `/health` and the model listed); `/readyz` 200 after {ready['time_to_readyz_s']} s",
        "",
        "| thinking | streams | path | TTFT p50 / p99 (ms) | tok/s per stream | tok/s total | vs direct: tok/s | "
        "vs direct: TTFT p50 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for thinking in (False, True):
        for streams in (1, 8, 32):
            base = groups.get((thinking, streams, "direct"), [])
            base_tok = med([r["tok_s_total"] for r in base])
            base_ttft = med([r["ttft_p50_ms"] for r in base])
            for path in PATHS:
                rows = groups.get((thinking, streams, path), [])
                if not rows:
                    continue
                tok = med([r["tok_s_total"] for r in rows])
                ttft = med([r["ttft_p50_ms"] for r in rows])
                per_stream = med([r["tok_s_per_stream"] for r in rows])
                vs = "" if path == "direct" else f"{tok / base_tok * 100:.1f} %"
                added = "" if path == "direct" else f"{ttft - base_ttft:+.1f} ms"
                out.append(
                    f"| {'on' if thinking else 'off'} | {streams} | {path} | {ttft:.1f} / "
                    f"{med([r['ttft_p99_ms'] for r in rows]):.1f} | {per_stream:.1f} | {tok:.0f} | {vs} | {added} |"
                )
    out += ["", f"Rounds per point: {bench['args']['repeat']} (median of the rounds' figures; path order rotated).", ""]

    # What flushgate itself adds, from its own records of the requests that went through it.
    own = defaultdict(list)
    hop = []
    for row in bench["rows"]:
        for rid in row["request_ids"]:
            record = records.get(rid)
            if record is None or record.get("outcome") != "completed":
                continue
            split = record.get("split") or {}
            own[row["path"]].append(split.get("gateway_ms", float("nan")))
            client_ttft = row["client_first_token_ms"].get(rid)
            if row["path"] == "buffered" and client_ttft is not None and record.get("first_token_ms"):
                hop.append(client_ttft - record["first_token_ms"])
    for path in ("flushgate", "buffered"):
        values = [v for v in own[path] if v == v]
        if values:
            out.append(
                f"- flushgate's own work per request on the `{path}` path (`split.gateway_ms`, {len(values)} "
                f"requests): p50 {pct(values, 0.5):.3f} ms, p99 {pct(values, 0.99):.3f} ms, max {max(values):.3f} ms."
            )
    if hop:
        out.append(
            f"- Buffered path: the client saw its first token {med(hop):.0f} ms (median, {len(hop)} requests) after "
            f"flushgate's record shows that token written (`first_token_ms`), so the delay is in the hop in front "
            f"of flushgate, not in flushgate or the engine."
        )
    return "\n".join(out) + "\n"


def summarize_mixed(results: Path, phase: str, bench: dict[str, Any]) -> str:
    """Rounds in which the paths shared the same load at the same moment: compare them request for request."""
    records = load_records(results / f"records-{phase}.jsonl")
    ready = json.loads((results / f"ready-{phase}.json").read_text())
    ttft: dict[tuple[bool, int, str], list[float]] = defaultdict(list)
    rate: dict[tuple[bool, int, str], list[float]] = defaultdict(list)
    total: dict[tuple[bool, int, str], list[float]] = defaultdict(list)
    errors = 0
    for row in bench["rows"]:
        key = (row["thinking"], row["streams"], row["path"])
        ttft[key] += row["ttft_ms"]
        rate[key] += row["tok_s"]
        total[key].append(sum(row["completion_tokens"]) / row["wall_s"])
        errors += len(row["errors"])
    out = [
        f"### {phase}, paths sharing each round: engine ready in "
        f"{engine_load_s(results / f'records-{phase}.jsonl')} s; `/readyz` 200 after {ready['time_to_readyz_s']} s",
        "",
        "| thinking | streams | path | requests | TTFT p50 / p99 (ms) | added TTFT p50 vs direct | tok/s per stream "
        "(median) | vs direct |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for thinking in (False, True):
        for streams in (1, 8, 32):
            base = (thinking, streams, "direct")
            for path in PATHS:
                key = (thinking, streams, path)
                if not ttft.get(key):
                    continue
                added = "" if path == "direct" else f"{med(ttft[key]) - med(ttft[base]):+.2f} ms"
                vs = "" if path == "direct" else f"{med(rate[key]) / med(rate[base]) * 100:.1f} %"
                out.append(
                    f"| {'on' if thinking else 'off'} | {streams} | {path} | {len(ttft[key])} | "
                    f"{med(ttft[key]):.1f} / {pct(ttft[key], 0.99):.1f} | {added} | {med(rate[key]):.1f} | {vs} |"
                )
    out += [
        "",
        f"Requests that failed: {errors}. Rounds: {bench['args']['repeat']} per point (1-stream rounds: that "
        "many per path, alternating).",
        "",
    ]
    own, hop = [], []
    for row in bench["rows"]:
        for rid in row["request_ids"]:
            record = records.get(rid)
            if record is None or record.get("outcome") != "completed":
                continue
            if row["path"] == "flushgate":
                own.append((record.get("split") or {}).get("gateway_ms", float("nan")))
            client_ttft = row["client_first_token_ms"].get(rid)
            if row["path"] == "buffered" and client_ttft is not None and record.get("first_token_ms"):
                hop.append(client_ttft - record["first_token_ms"])
    own = [v for v in own if v == v]
    if own:
        out.append(
            f"- flushgate's own work per request (`split.gateway_ms`: before calling the engine, plus per chunk "
            f"outside the write; {len(own)} requests of 512 tokens): p50 {pct(own, 0.5):.3f} ms, "
            f"p99 {pct(own, 0.99):.3f} ms."
        )
    if hop:
        out.append(
            f"- Buffered path: the client saw its first token {med(hop):.0f} ms (median, {len(hop)} requests) after "
            "flushgate's record shows that token written (`first_token_ms`): the delay is in the hop in front of "
            "flushgate."
        )
    return "\n".join(out) + "\n"


def summarize_probe(results: Path, phase: str, bench: dict[str, Any]) -> str:
    """The pair-by-pair run (``--probe``): added TTFT per level, then the records' split of the probes."""
    ready = json.loads((results / f"ready-{phase}.json").read_text())
    out = [
        f"### {phase}, added TTFT pair by pair (`--probe {bench['args']['probe']}`): `/readyz` 200 after "
        f"{ready['time_to_readyz_s']} s",
        "",
        "| streams | pairs | direct TTFT p50 / p99 (ms) | flushgate TTFT p50 / p99 (ms) | added TTFT p50 | "
        "median of the pair differences | pair differences p10 / p90 (ms) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in bench["rows"]:
        pairs = row["pairs_ms"]
        first, second = [a for a, _ in pairs], [b for _, b in pairs]
        diffs = [b - a for a, b in pairs]
        out.append(
            f"| {row['streams']} | {len(pairs)} | {med(first):.2f} / {pct(first, 0.99):.2f} | "
            f"{med(second):.2f} / {pct(second, 0.99):.2f} | {med(second) - med(first):+.2f} ms | "
            f"{med(diffs):+.2f} ms | {pct(diffs, 0.1):+.2f} / {pct(diffs, 0.9):+.2f} |"
        )
    errors = sum(len(row["errors"]) for row in bench["rows"])
    out += ["", f"Errors: {errors}.", ""]
    records = load_records(results / f"records-{phase}.jsonl")
    parts = ("gateway_ms", "client_link_ms", "engine_queue_ms", "engine_prefill_ms", "engine_decode_ms",
             "engine_frontend_ms")  # fmt: skip
    out += [
        "| streams | probes | joined with vLLM's span | " + " | ".join(p.removesuffix("_ms") for p in parts) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in parts) + " |",
    ]
    for row in bench["rows"]:
        probes = [r for rid, r in records.items() if rid.startswith(f"probe-flushgate-{row['streams']}-")]
        splits = [r["split"] for r in probes if r.get("split")]
        joined = [s for s in splits if "engine_prefill_ms" in s]
        cells = [f"{med([s[p] for s in joined if p in s]):.3f}" for p in parts]
        out.append(f"| {row['streams']} | {len(probes)} | {len(joined)} | " + " | ".join(cells) + " |")
    gateway = [r["split"]["gateway_ms"] for rid, r in records.items() if rid.startswith("probe-flushgate-")]
    out += ["", f"`gateway_ms` of all probes: p50 {med(gateway):.3f}, p99 {pct(gateway, 0.99):.3f}, "
            f"max {max(gateway):.3f} ms."]  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results", type=Path)
    parser.add_argument("phases", nargs="+")
    args = parser.parse_args()
    print("\n".join(summarize(args.results, phase) for phase in args.phases))


if __name__ == "__main__":
    main()

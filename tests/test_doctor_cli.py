"""``flushgate doctor`` as a user runs it: arguments, output formats, the chart, and clear errors."""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from flushgate.cli import main
from flushgate.config import Access, Config
from flushgate.server import Server
from tests.doctor_hops import CadenceEngine, Hop, hold_all

ROOT = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 60  # deadlock guard for one command


async def flushgate(*args: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flushgate",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), RUN_LIMIT_S)
    assert process.returncode is not None
    return process.returncode, out, err


@pytest.fixture
async def engine_and_holding_hop() -> AsyncIterator[tuple[str, str]]:
    engine = CadenceEngine(tokens=16, step_s=0.02)
    await engine.start()
    hop = Hop(engine.url, hold_all)
    await hop.start()
    yield engine.url, hop.url
    await hop.stop()
    await engine.stop()


async def test_probe_json_has_verdicts_and_arrivals_and_the_chart_is_an_svg(
    engine_and_holding_hop: tuple[str, str], tmp_path: Path
) -> None:
    engine, holding = engine_and_holding_hop
    chart = tmp_path / "arrivals.svg"
    args = ["--requests", "1", "--warmup", "0", "--json", "--chart", str(chart)]
    code, out, err = await flushgate("doctor", "probe", f"engine={engine}", "--via", f"ui={holding}", *args)
    assert code == 0, err.decode()
    report = orjson.loads(out)
    assert report["model"] == "cadence-model"  # asked the reference for its model
    assert [(p["name"], p["verdict"]) for p in report["paths"]] == [("engine", "clean"), ("ui", "buffering")]
    reads = report["paths"][0]["runs"][0]["reads"]
    assert sum(read["tokens"] for read in reads) == 16
    assert all(later["at_ms"] >= earlier["at_ms"] for earlier, later in itertools.pairwise(reads))
    assert b"<svg" in chart.read_bytes()


async def test_probe_prints_a_table_and_draws_a_png(engine_and_holding_hop: tuple[str, str], tmp_path: Path) -> None:
    engine, holding = engine_and_holding_hop
    chart = tmp_path / "arrivals.png"
    args = ["--requests", "1", "--warmup", "0", "--chart", str(chart)]
    code, out, err = await flushgate("doctor", "probe", engine, "--via", holding, *args)
    assert code == 0, err.decode()
    text = out.decode()
    assert "TTFT ms" in text
    assert "buffering: 16 tokens arrived within" in text
    assert "token arrivals (one typical request per path):" in text
    assert chart.read_bytes().startswith(b"\x89PNG")


async def test_probe_sends_the_given_headers_so_a_gateway_with_keys_can_be_probed() -> None:
    engine = CadenceEngine(tokens=8, step_s=0.02)
    await engine.start()
    gateway = Server(Config(upstream=engine.url, port=0, access=Access(api_keys=("doctor-test-key",))))
    await gateway.start()
    try:
        url = f"http://127.0.0.1:{gateway.port}"
        args = ["--requests", "1", "--warmup", "0", "--json", "--model", "cadence-model"]
        code, out, err = await flushgate("doctor", "probe", f"engine={engine.url}", "--via", f"keyed={url}", *args)
        assert code == 0, err.decode()
        assert orjson.loads(out)["paths"][1]["verdict"] == "HTTP error"
        keyed = [*args, "--header", "Authorization: Bearer doctor-test-key"]
        code, out, err = await flushgate("doctor", "probe", f"engine={engine.url}", "--via", f"keyed={url}", *keyed)
        assert code == 0, err.decode()
        assert [p["verdict"] for p in orjson.loads(out)["paths"]] == ["clean", "clean"]
    finally:
        await gateway.stop()
        await engine.stop()


def test_probe_rejects_a_header_without_a_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["doctor", "probe", "http://127.0.0.1:1", "--header", "no colon here"])
    assert "expected 'Name: value'" in capsys.readouterr().err


def test_probe_rejects_a_url_it_cannot_use(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "probe", "localhost:8000"]) == 2
    assert "is not an http(s)://HOST[:PORT][/PREFIX] URL" in capsys.readouterr().err


def test_probe_rejects_a_chart_format_it_cannot_write(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "probe", "http://127.0.0.1:1", "--chart", "out.pdf"]) == 2
    assert "--chart must name a .png or .svg file" in capsys.readouterr().err


def test_probe_says_how_to_go_on_when_the_reference_lists_no_model(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    assert main(["doctor", "probe", f"http://127.0.0.1:{closed_port}"]) == 2
    assert "name one with --model" in capsys.readouterr().err


async def test_logs_reads_standard_input_and_prints_json_on_request() -> None:
    lines = b"".join(
        orjson.dumps({"event": "request", "request_id": f"r{i}", "upstream_ttfb_ms": 5.0, "total_ms": 10.0 * i}) + b"\n"
        for i in range(1, 4)
    )
    code, out, err = await flushgate("doctor", "logs", "-", stdin=lines)
    assert code == 0, err.decode()
    assert "doctor logs: 3 requests" in out.decode()
    code, out, _ = await flushgate("doctor", "logs", "-", "--json", stdin=lines)
    assert code == 0
    assert orjson.loads(out)["worst"][0]["request_id"] == "r3"


async def test_logs_without_records_exits_non_zero() -> None:
    code, out, _ = await flushgate("doctor", "logs", "-", stdin=b'{"event": "listening"}\n')
    assert code == 1
    assert b"no request records" in out


def test_logs_names_a_file_it_cannot_read(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["doctor", "logs", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err

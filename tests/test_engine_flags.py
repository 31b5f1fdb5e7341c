"""Flags for several engines: each also reads FLUSHGATE_*, and one --upstream means what it always meant."""

from __future__ import annotations

import pytest

from flushgate.cli import build_parser, config_from_args, main
from flushgate.config import Routing

A, B = "http://10.0.0.1:8001", "http://10.0.0.2:8001"


def test_one_upstream_stays_a_single_url_and_several_make_a_tuple() -> None:
    one = config_from_args(build_parser().parse_args(["serve", "--upstream", A]))
    assert one.upstream == A
    assert one.upstream_bases == (A,)
    several = config_from_args(build_parser().parse_args(["serve", "--upstream", A, "--upstream", B + "/"]))
    assert several.upstream == (A, B + "/")
    assert several.upstream_bases == (A, B)


def test_the_environment_lists_upstreams_and_a_flag_replaces_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUSHGATE_UPSTREAM", f"{A}, {B}")
    from_env = config_from_args(build_parser().parse_args(["serve"]))
    assert from_env.upstream == (A, B)
    flag_wins = config_from_args(build_parser().parse_args(["serve", "--upstream", B]))
    assert flag_wins.upstream == B


@pytest.mark.parametrize(
    ("flag", "variable", "value", "expected"),
    [
        ("--routing", "ROUTING", "prefix-affinity", Routing(mode="prefix-affinity")),
        ("--affinity-load-factor", "AFFINITY_LOAD_FACTOR", "2.5", Routing(affinity_load_factor=2.5)),
        ("--retries", "RETRIES", "0", Routing(retries=0)),
        ("--health-interval", "HEALTH_INTERVAL", "0", Routing(health_interval=0.0)),
        ("--eject-after", "EJECT_AFTER", "5", Routing(eject_after=5)),
        ("--eject-time", "EJECT_TIME", "30", Routing(eject_time=30.0)),
        ("--dns-interval", "DNS_INTERVAL", "1.5", Routing(dns_interval=1.5)),
    ],
)
def test_every_routing_flag_also_reads_its_variable(
    monkeypatch: pytest.MonkeyPatch, flag: str, variable: str, value: str, expected: Routing
) -> None:
    by_flag = config_from_args(build_parser().parse_args(["serve", "--upstream", A, flag, value]))
    monkeypatch.setenv("FLUSHGATE_" + variable, value)
    by_env = config_from_args(build_parser().parse_args(["serve", "--upstream", A]))
    assert by_flag.routing == by_env.routing == expected


def test_managed_engine_counts_and_gpus_read_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    by_flag = config_from_args(build_parser().parse_args(["serve", "--model", "m", "--engines", "4", "--gpus", "0,1"]))
    monkeypatch.setenv("FLUSHGATE_ENGINES", "4")
    monkeypatch.setenv("FLUSHGATE_GPUS", "0,1")
    monkeypatch.setenv("FLUSHGATE_UPSTREAM_DNS", "")
    by_env = config_from_args(build_parser().parse_args(["serve", "--model", "m"]))
    assert (by_flag.engines, by_flag.gpus) == (by_env.engines, by_env.gpus) == (4, ("0", "1"))


def test_dns_discovery_reads_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUSHGATE_UPSTREAM_DNS", "vllm.default.svc.cluster.local:8000")
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert config.upstream_dns == "vllm.default.svc.cluster.local:8000"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--upstream", A, "--upstream-dns", "vllm:8000"], "exactly one of --upstream URL, --upstream-dns"),
        (["--model", "m", "--upstream-dns", "vllm:8000"], "exactly one of --upstream URL, --upstream-dns"),
        (["--upstream", A, "--upstream", A], "names an engine twice"),
        (["--upstream", A, "--engines", "2"], "--engines and --gpus need --model"),
        (["--model", "m", "--engines", "0"], "--engines must be at least 1"),
        (["--upstream-dns", "vllm"], "expected NAME:PORT or an SRV name"),
        (["--upstream", A, "--affinity-load-factor", "0.5"], "--affinity-load-factor must be at least 1"),
        (["--upstream", A, "--retries", "-1"], "--retries must not be negative"),
        (["--upstream", A, "--eject-after", "0"], "--eject-after must be at least 1"),
        (["--upstream-dns", "vllm:8000", "--dns-interval", "0"], "--dns-interval must be positive"),
    ],
)
def test_an_unusable_several_engine_config_is_refused_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_an_unknown_routing_mode_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--upstream", A, "--routing", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err

"""How long the gateway keeps an idle engine connection: under the engine's own idle time, whoever sets it."""

from __future__ import annotations

import pytest

from flushgate.cli import build_parser, config_from_args, main
from flushgate.config import Config, ConfigError, Timeouts, engine_keepalive

UP = "http://127.0.0.1:8001"


def keepalive_of(*args: str) -> float:
    return config_from_args(build_parser().parse_args(["serve", *args])).timeouts.engine_keepalive


def test_an_attached_engine_is_taken_to_close_idle_connections_after_vllms_default_5_s(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "120")  # this process's, not the attached engine's
    assert keepalive_of("--upstream", UP) == 4.0
    assert keepalive_of("--upstream", UP, "--engine-keepalive", "90") == 90.0  # the user knows their engine


def test_a_managed_engine_defaults_to_60_s_and_the_flag_or_its_variable_sets_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", raising=False)
    assert keepalive_of("--model", "m") == 60.0
    assert keepalive_of("--model", "m", "--engine-keepalive", "15") == 15.0
    monkeypatch.setenv("FLUSHGATE_ENGINE_KEEPALIVE", "7.5")
    assert keepalive_of("--model", "m") == 7.5


def test_a_managed_engine_whose_time_the_environment_sets_bounds_the_gateways() -> None:
    env = {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "30"}
    assert engine_keepalive(None, managed=True, environ=env) == 29.0
    assert engine_keepalive(20.0, managed=True, environ=env) == 20.0
    with pytest.raises(ConfigError, match="must be under the engine's own VLLM_HTTP_TIMEOUT_KEEP_ALIVE=30"):
        engine_keepalive(30.0, managed=True, environ=env)
    with pytest.raises(ConfigError, match="must be a number of seconds"):
        engine_keepalive(None, managed=True, environ={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "soon"})
    assert engine_keepalive(None, managed=True, environ={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "0"}) == 0.0


def test_a_negative_keepalive_is_refused_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--upstream", UP, "--engine-keepalive", "-1"]) == 2
    assert "--engine-keepalive must not be negative" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--engine-keepalive must not be negative"):
        Config(upstream=UP, timeouts=Timeouts(engine_keepalive=-1.0)).validate()


def test_the_help_names_both_defaults_and_the_engines_own_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--engine-keepalive S" in text
    assert "Default: 4 with --upstream" in text
    assert "60 with --model" in text
    assert "VLLM_HTTP_TIMEOUT_KEEP_ALIVE" in text

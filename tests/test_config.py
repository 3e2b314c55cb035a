"""Settings: read from the environment, checked in one place, every error naming its
variable and flag; the help and the README list every setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from creditd.config import InvalidSettings, Settings, flag, from_env, variable
from creditd.domain.rates import PLATFORM_RATES, RateCard

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("CREDITD_", "OTEL_")):
            monkeypatch.delenv(name)


def error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(InvalidSettings) as caught:
        from_env()
    return str(caught.value)


def test_variables_and_flags_set_the_settings_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITD_SLICE_SECONDS", "30")
    monkeypatch.setenv("CREDITD_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("CREDITD_GRACE_SECONDS", "")  # empty is unset
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    settings = from_env(listen="0.0.0.0:7000", slice_seconds=None)
    assert (settings.slice_seconds, settings.log_level, settings.grace_seconds) == (30, "debug", 30.0)
    assert settings.otlp_endpoint == "http://collector:4317"
    assert settings.listen == "0.0.0.0:7000"
    assert from_env(slice_seconds="45").slice_seconds == 45


def test_platform_rates_are_micro_credits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDITD_PLATFORM_RATES", '{"voice": {"ElevenLabs": 1200000}, "sms": {"gb": 400000}}')
    rates = from_env().platform_rates
    assert rates == RateCard(
        voice={"elevenlabs": 1_200_000},
        default_voice=PLATFORM_RATES.default_voice,
        sms={"GB": 400_000},
        default_sms=PLATFORM_RATES.default_sms,
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"default_voice": 1.5}', "default_voice must be a whole number (got 1.5)"),
        ('{"default_voice": 1.0}', "default_voice must be a whole number (got 1.0)"),
        ('{"sms": {"US": -1}}', "sms.US must be at least 0 (got -1)"),
        ('{"defualt_voice": 1000000}', "has an unknown key 'defualt_voice' (the keys are voice, default_voice,"),
        ('{"voice": 5}', "voice must be an object of names to micro-credits"),
        ('{"voice": {"x": "5"}}', "voice.x must be a whole number (got '5')"),
        ("[1000000]", "must be a JSON object"),
        ("{default_voice: 1}", "is not JSON"),
    ],
)
def test_bad_platform_rates_are_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    text = error(monkeypatch, CREDITD_PLATFORM_RATES=value)
    assert text.startswith("CREDITD_PLATFORM_RATES (--platform-rates) ")
    assert message in text


def test_every_problem_is_one_line_naming_variable_and_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    text = error(monkeypatch, CREDITD_SLICE_SECONDS="abc", CREDITD_RENEWAL_LEAD_SECONDS="-1", CREDITD_LISTEN="x")
    assert text.splitlines() == [
        "CREDITD_LISTEN (--listen) must be host:port, e.g. 127.0.0.1:50051 (port 0: any free port)",
        "CREDITD_SLICE_SECONDS (--slice-seconds) must be a whole number (got 'abc')",
        "CREDITD_RENEWAL_LEAD_SECONDS (--renewal-lead-seconds) must be more than 0 (got '-1')",
    ]


def test_settings_that_go_together(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("")
    text = error(monkeypatch, CREDITD_TLS_CERT=str(cert))
    assert text == "CREDITD_TLS_CERT and CREDITD_TLS_KEY go together: set both or neither"


def test_an_unknown_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="slice_secs"):
        Settings(slice_secs=5)  # type: ignore[call-arg]


def test_serve_help_lists_every_setting_with_its_variable() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "creditd.cli", "serve", "--help"], capture_output=True, text=True, check=True
    )
    help_text = " ".join(done.stdout.split())  # argparse wraps lines
    for name in Settings.model_fields:
        assert flag(name) in help_text, name
        assert variable(name) in help_text, name
    assert "seconds of talk reserved per slice [CREDITD_SLICE_SECONDS; default 60]" in help_text


def test_the_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [variable(name) for name in Settings.model_fields if f"`{variable(name)}`" not in readme]
    assert not missing, f"README.md's configuration table lacks {missing}"

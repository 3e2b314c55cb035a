"""creditctl's version, shell completion and low-balance warnings."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from test_cli import Ctl, ctl, field

from creditd_client import __version__
from creditd_client.cli import main

__all__ = ["ctl"]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"creditctl {__version__}\n"


def complete(script: str, line: str) -> list[str]:
    """What bash offers after `line` (the word being typed is its last one)."""
    words = line.split(" ")
    program = "\n".join(
        [
            script,
            f"COMP_WORDS=({' '.join(repr(word) for word in words)})",
            f"COMP_CWORD={len(words) - 1}",
            "_creditctl",
            'printf "%s\\n" "${COMPREPLY[@]}"',
        ]
    )
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return done.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_offers_commands_actions_flags_and_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert "complete -F _creditctl creditctl" in script
    assert complete(script, "creditctl lo") == ["low-balance"]
    assert complete(script, "creditctl low-balance ") == ["set", "--help"]
    assert set(complete(script, "creditctl low-balance set dental --")) >= {"--type", "--threshold", "--off"}
    assert complete(script, "creditctl topup dental 5 --type ") == ["voice", "sms"]
    assert "agency_admin" in complete(script, "creditctl key create ")


async def test_low_balance_set_shows_the_warning_on_the_account(ctl: Ctl) -> None:
    await ctl.ok("agency", "create", "lb-agency")
    await ctl.ok("plan", "create", "lb-agency", "p", "--default-voice-rate", "1")
    await ctl.ok("client", "create", "lb-client", "--agency", "lb-agency", "--plan", "p")
    out = await ctl.ok("low-balance", "set", "lb-client", "--type", "voice", "--threshold", "2.5")
    assert field(out, "voice low-balance warning") == "below 2.5"
    account = await ctl.json("low-balance", "set", "lb-client", "--type", "voice", "--off")
    assert isinstance(account, dict)
    assert "voice low-balance warning" not in await ctl.ok("account", "get", "lb-client")
    code, _, err = await ctl("low-balance", "set", "lb-client", "--type", "voice")
    assert code == 2 and "give --threshold CREDITS or --off" in err

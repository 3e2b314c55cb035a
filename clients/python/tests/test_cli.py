"""creditctl against a real server: tables with credits, JSON for scripts, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from conftest import ADMIN_TOKEN, CREDIT, unique

from creditd_client import aio
from creditd_client.cli import main
from tests.conftest import Running


class Ctl:
    def __init__(self, address: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.address = address
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["--address", self.address, "--token", ADMIN_TOKEN, *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    async def ok(self, *argv: str) -> str:
        code, out, err = await self(*argv)
        assert code == 0, err
        assert err == ""
        return out

    async def json(self, *argv: str) -> object:
        return json.loads(await self.ok("--json", *argv))


@pytest.fixture
def ctl(fast_server: Running, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(fast_server.app.address, capsys)


def field(out: str, name: str) -> str:
    """The value of one line of a vertical `name  value` table."""
    for line in out.splitlines():
        if line.startswith(name + "  "):
            return line[len(name) :].strip()
    raise AssertionError(f"no {name!r} in\n{out}")


def columns(table: str, header: str) -> list[str]:
    """The cells of one column, cut at the header's position (checks the alignment)."""
    lines = table.strip().splitlines()
    start = lines[0].index(header)
    end = start + len(header)
    return [line[start:end].strip() for line in lines]


async def test_set_up_and_top_up_an_account_in_tables(ctl: Ctl) -> None:
    agency, client = unique("acme"), unique("dental")
    out = await ctl.ok("agency", "create", agency, "--name", "Acme Reception")
    assert field(out, "free voice credits") == "300" and field(out, "free sms credits") == "83"
    assert field(out, "default sms rate") == "0.166/segment"

    out = await ctl.ok(
        "plan", "create", agency, "gold", "--free-voice", "200", "--default-voice-rate", "60",
        "--voice-rate", "elevenlabs=75.5", "--default-sms-rate", "0.166", "--usage-limit", "500",
    )  # fmt: skip
    assert field(out, "voice rates") == "elevenlabs=75.5" and field(out, "default voice rate") == "60/min"
    assert field(out, "usage limit") == "500" and field(out, "free voice credits") == "200"
    out = await ctl.ok("plan", "update", agency, "gold", "--usage-limit", "0")
    assert field(out, "usage limit") == "none"
    assert "elevenlabs=75.5" in await ctl.ok("plan", "get", agency, "gold")

    out = await ctl.ok("client", "create", client, "--agency", agency, "--plan", "gold")
    assert field(out, "billing mode") == "rebilling" and field(out, "plan") == "gold"

    out = await ctl.ok("topup", client, "12.5", "--key", "pay-1", "--ref", "pi_1")
    assert field(out, "available") == "212.5"  # 200 free + 12.5 purchased
    out = await ctl.ok("topup", client, "0.166", "--key", "pay-2", "--type", "sms")
    assert field(out, "available") == "0.166"

    table = await ctl.ok("balance", client)
    assert table.splitlines()[0] == f"account {client}"
    body = "\n".join(table.splitlines()[1:])
    assert columns(body, "AVAILABLE") == ["AVAILABLE", "212.5", "0.166"]
    assert columns(body, "PURCHASED") == ["PURCHASED", "12.5", "0.166"]
    assert columns(body, " FREE")[1:] == ["200", "0"]

    ledger = await ctl.ok("ledger", client)
    assert "pay-1" in ledger and "pay-2" in ledger and "topup" in ledger
    assert columns(ledger, "AMOUNT")[1:3] == ["0.166", "12.5"]  # newest first

    out = await ctl.ok("subscription", "set", client, "--inbound", "off")
    assert field(out, "inbound") == "suspended" and field(out, "outbound") == "active"
    out = await ctl.ok("refill", "set", client, "--type", "voice", "--threshold", "5", "--amount", "20")
    assert field(out, "voice auto-refill") == "below 5: +20, at most 1/period"
    events = await ctl.ok("events", client)
    assert "topup_applied" in events


async def test_json_output_for_scripts(ctl: Ctl, client: aio.Client) -> None:
    agency, customer = unique("acme"), unique("dental")
    created = await ctl.json("agency", "create", agency, "--free-voice", "0")
    assert isinstance(created, dict)
    assert created["account_id"] == agency and created["free_voice_micros"] == 0
    assert created["kind"] == "ACCOUNT_KIND_AGENCY"
    await ctl.json("plan", "create", agency, "basic", "--default-voice-rate", "1")
    await ctl.json("client", "create", customer, "--agency", agency, "--plan", "basic", "--mode", "agency_paid")
    topup = await ctl.json("topup", agency, "0.166", "--key", "k1")
    assert isinstance(topup, dict) and topup["balance"]["purchased_micros"] == 166_000
    again = await ctl.json("topup", agency, "0.166", "--key", "k1")
    assert isinstance(again, dict) and again["entry_id"] == topup["entry_id"]

    balance = await ctl.json("balance", customer)
    assert isinstance(balance, dict) and balance["voice"]["has_wallet"] is False
    assert balance["voice"]["period_end"].endswith("Z")
    entries = await ctl.json("ledger", agency, "--type", "voice")
    assert isinstance(entries, list)
    assert [e["amount_micros"] for e in entries if e["kind"] == "LEDGER_ENTRY_KIND_TOPUP"] == [166_000]

    key = await ctl.json("key", "create", "worker", agency, "--description", "voice workers")
    assert isinstance(key, dict) and key["secret"] and key["api_key"]["role"] == "ROLE_WORKER"
    listed = await ctl.ok("key", "list", agency)
    assert key["key_id"] in listed and "worker" in listed and "active" in listed
    revoked = await ctl.json("key", "revoke", key["key_id"])
    assert isinstance(revoked, dict) and revoked["revoked"] is True


async def test_balance_watch_prints_each_change(ctl: Ctl, client: aio.Client) -> None:
    agency = unique("acme")
    await client.create_agency(agency)
    watching = asyncio.ensure_future(ctl("balance", agency, "--watch", "--count", "2", "--json"))
    await asyncio.sleep(0.5)
    await client.topup(agency, 5 * CREDIT, unique("pay"))
    code, out, err = await asyncio.wait_for(watching, 10)
    assert code == 0, err
    first, second = (json.loads(line) for line in out.splitlines())
    assert second["voice"]["purchased_micros"] - first["voice"]["purchased_micros"] == 5 * CREDIT


async def test_errors_are_one_line_with_the_reason_and_exit_1(ctl: Ctl) -> None:
    code, out, err = await ctl("balance", "no-such-account")
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        "creditctl: NOT_FOUND ACCOUNT_NOT_FOUND: account 'no-such-account' does not exist [account_id=no-such-account]"
    ]
    agency = unique("acme")
    await ctl.ok("agency", "create", agency)
    await ctl.ok("topup", agency, "1", "--key", "same")
    code, _, err = await ctl("topup", agency, "2", "--key", "same")
    assert code == 1 and "FAILED_PRECONDITION IDEMPOTENCY_KEY_REUSED" in err
    code, _, err = await ctl("agency", "create", agency)
    assert code == 1 and err.startswith("creditctl: ALREADY_EXISTS")


async def test_usage_errors_exit_2(ctl: Ctl) -> None:
    code, _, err = await ctl("topup", "acme", "12")  # no --key
    assert code == 2 and "--key" in err
    code, _, err = await ctl("topup", "acme", "0.0000001", "--key", "k")
    assert code == 2 and "not a whole number of micro-credits" in err
    code, _, err = await ctl("plan", "update", "acme", "gold")
    assert code == 2 and "at least one field" in err
    code, _, _ = await ctl("nonsense")
    assert code == 2


def test_the_console_script_runs_and_reports_an_unreachable_server() -> None:
    env = {**os.environ, "CREDITD_ADDRESS": "127.0.0.1:1", "CREDITD_TOKEN": "x"}
    script = os.path.join(os.path.dirname(sys.executable), "creditctl")
    result = subprocess.run(
        [script, "--timeout", "0.5", "balance", "acme"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert result.stderr.startswith("creditctl: UNAVAILABLE") and "(creditd at 127.0.0.1:1)" in result.stderr

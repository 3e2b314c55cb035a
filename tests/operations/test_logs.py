"""Structured logs: one JSON object a line, request and session ids, and never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, metering_pb2

from creditd import logs
from tests.conftest import CREDIT, Api
from tests.operations.serve import Serve

ADMIN_SECRET = "cdk_admin_Sup3r-S3cret-Adm1n-T0ken"
BAD_SECRET = "cdk_0123456789abcdef_n0t-A-Real-Key-But-Still-Secret"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logs.setup("debug", "json", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_line_is_one_json_object_with_the_ids_of_the_call(captured: io.StringIO) -> None:
    log = logging.getLogger("creditd.test")
    log.info("outside any call")
    request, session = logs.request_id.set("req-1"), logs.session_id.set("call-42")
    try:
        log.warning("inside a call: %s", "renewal failed", extra={"account_id": "c1"})
    finally:
        logs.session_id.reset(session)
        logs.request_id.reset(request)
    outside, inside = _lines(captured.getvalue())
    assert set(outside) == {"time", "level", "logger", "message"}
    assert outside["logger"] == "creditd.test" and outside["level"] == "info"
    assert str(outside["time"]).endswith("+00:00")
    assert inside["message"] == "inside a call: renewal failed"
    assert (inside["request_id"], inside["session_id"], inside["account_id"]) == ("req-1", "call-42", "c1")


def test_keys_tokens_and_authorization_metadata_are_removed(captured: io.StringIO) -> None:
    logs.add_secret("a-bootstrap-token-without-prefix")
    log = logging.getLogger("creditd.test")
    log.warning("metadata: %s", (("authorization", f"Bearer {BAD_SECRET}"), ("x-request-id", "r1")))
    log.warning("header authorization: Bearer some.jwt.value")
    log.warning("key %s and token %s", ADMIN_SECRET, "a-bootstrap-token-without-prefix", extra={"token": BAD_SECRET})
    try:
        raise ValueError(f"bad key {BAD_SECRET}")
    except ValueError:
        log.exception("failed")
    text = captured.getvalue()
    for secret in (BAD_SECRET, ADMIN_SECRET, "some.jwt.value", "a-bootstrap-token-without-prefix", "n0t-A-Real"):
        assert secret not in text
    assert text.count(logs.REDACTED) >= 6
    assert "x-request-id" in text and "r1" in text  # the rest of the line is kept


async def test_a_served_call_logs_json_with_its_request_id_and_no_secret(tmp_path: Path) -> None:
    """A real `creditd serve` at debug level: a failing and a succeeding call made with known
    secrets; every line of its log is JSON and no secret is in any of them."""
    server = Serve(tmp_path, CREDITD_ADMIN_TOKEN=ADMIN_SECRET, CREDITD_LOG_LEVEL="debug")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            admin = Api(channel, ADMIN_SECRET)
            await admin.agency("a1")
            await admin.plan("a1", "p", free_voice_micros=10 * CREDIT)
            await admin.client("c1", "a1", "p")
            worker = await admin.accounts.CreateApiKey(
                account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_WORKER, account_id="a1"), metadata=admin.metadata
            )
            as_worker = Api(channel, worker.secret)
            request = metering_pb2.AuthorizeRequest(
                session_id="call-7", client_id="c1", channel=common_pb2.CHANNEL_VOICE, direction=1
            )
            answer = await as_worker.metering.Authorize(
                request, metadata=(*as_worker.metadata, ("x-request-id", "req-ok"))
            )
            assert answer.allowed
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await Api(channel, BAD_SECRET).metering.Authorize(
                    request, metadata=(("authorization", f"Bearer {BAD_SECRET}"), ("x-request-id", "req-bad"))
                )
            assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
            # A key pasted as the request id, and ids that are too long or not of the safe set.
            for request_id in (worker.secret, "r" * 65, 'x"}{"level": "forged'):
                await as_worker.metering.Authorize(
                    request, metadata=(*as_worker.metadata, ("x-request-id", request_id))
                )
    finally:
        assert server.stop() == 0
    text = server.logs()
    lines = _lines(text)  # every line parses
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line)
    # debug is creditd's: the database driver's per-statement lines would drown it
    assert not [line for line in lines if str(line["logger"]).startswith("aiosqlite")]
    ok = [line for line in lines if line.get("request_id") == "req-ok"]
    assert ok and all(line.get("session_id") == "call-7" for line in ok)
    assert "MeteringService/Authorize OK" in str(ok[-1]["message"])
    assert any(line.get("request_id") == "req-bad" and "UNAUTHENTICATED" in str(line["message"]) for line in lines)
    for secret in (ADMIN_SECRET, BAD_SECRET, worker.secret, worker.secret.rsplit("_", 1)[1]):
        assert secret not in text
    authorized = [str(line.get("request_id")) for line in lines if "Authorize OK" in str(line["message"])]
    assert authorized.count(logs.REDACTED) == 1  # the key's call, under its redacted id
    assert "r" * 65 not in text and "forged" not in text  # replaced by ids of the replica
    assert "Bearer" not in text
    assert ADMIN_SECRET not in "".join(server.lines)  # the chosen admin token is not printed either


def test_caller_request_ids_are_kept_only_when_short_and_safe() -> None:
    assert logs.caller_request_id("4bf92f35-77b3-4da6-a3ce-929d0e0e4736") == "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
    assert logs.caller_request_id("billing:1234/5") == "billing:1234/5"
    assert logs.caller_request_id(ADMIN_SECRET) == logs.REDACTED
    assert logs.caller_request_id("req-cdk_0123_abcd") == f"req-{logs.REDACTED}"
    for unsafe in ("", "a" * 65, "id with spaces", "line\nbreak", 'quote"', "ü"):
        assert logs.caller_request_id(unsafe) is None


def test_setup_refuses_unknown_levels_and_formats() -> None:
    with pytest.raises(ValueError):
        logs.setup("verbose")
    with pytest.raises(ValueError):
        logs.setup("info", "xml")

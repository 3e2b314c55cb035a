"""Bad input: a typed status with one ErrorInfo, no change anywhere, and the server lives on."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf import field_mask_pb2
from google.rpc import status_pb2
from sqlalchemy.exc import DataError, OperationalError

from creditd.api.errors import as_creditd_error, to_status
from creditd.errors import InvalidArgument
from tests.conftest import CREDIT, Api, error_info

Call = Callable[[Api], Awaitable[Any]]


def _topup(**fields: Any) -> Call:
    request = {
        "account_id": "a1",
        "balance_type": common_pb2.BALANCE_TYPE_VOICE,
        "amount_micros": CREDIT,
        "kind": ledger_pb2.TOPUP_KIND_PURCHASE,
        "idempotency_key": "k",
        **fields,
    }
    return lambda api: api.ledger.Topup(ledger_pb2.TopupRequest(**request), metadata=api.metadata)


def _authorize(**fields: Any) -> Call:
    request = {
        "session_id": "s1",
        "client_id": "c1",
        "channel": common_pb2.CHANNEL_VOICE,
        "direction": common_pb2.DIRECTION_INBOUND,
        **fields,
    }
    return lambda api: api.metering.Authorize(metering_pb2.AuthorizeRequest(**request), metadata=api.metadata)


CASES: list[tuple[str, Call, grpc.StatusCode, str]] = [
    ("negative top-up", _topup(amount_micros=-5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("zero top-up", _topup(amount_micros=0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("huge top-up", _topup(amount_micros=2**62), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("no idempotency key", _topup(idempotency_key=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("unknown balance type", _topup(balance_type=9), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("unspecified kind", _topup(kind=0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("unknown account", _topup(account_id="nobody"), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    ("bad account id", _topup(account_id="{a1}"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("no direction", _authorize(direction=0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("unknown channel", _authorize(channel=7), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("no session id", _authorize(session_id=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ("agency as client", _authorize(client_id="a1"), grpc.StatusCode.FAILED_PRECONDITION, "NOT_A_CLIENT"),
    (
        "sms without country",
        _authorize(channel=common_pb2.CHANNEL_SMS, quantity=1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (
        "existing agency",
        lambda api: api.accounts.CreateAgency(account_pb2.CreateAgencyRequest(agency_id="c1"), metadata=api.metadata),
        grpc.StatusCode.ALREADY_EXISTS,
        "ALREADY_EXISTS",
    ),
    (
        "client of a missing plan",
        lambda api: api.accounts.CreateClient(
            account_pb2.CreateClientRequest(
                client_id="c2", agency_id="a1", plan_id="nope", billing_mode=common_pb2.BILLING_MODE_REBILLING
            ),
            metadata=api.metadata,
        ),
        grpc.StatusCode.NOT_FOUND,
        "PLAN_NOT_FOUND",
    ),
    (
        "negative plan rate",
        lambda api: api.accounts.CreatePlan(
            account_pb2.CreatePlanRequest(agency_id="a1", plan_id="x", default_voice_micros_per_minute=-1),
            metadata=api.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (
        "bad country in plan",
        lambda api: api.accounts.CreatePlan(
            account_pb2.CreatePlanRequest(agency_id="a1", plan_id="x", sms_rates={"USA": 1}), metadata=api.metadata
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (
        "update mask naming nothing known",
        lambda api: api.accounts.UpdatePlan(
            account_pb2.UpdatePlanRequest(
                plan=account_pb2.Plan(agency_id="a1", plan_id="p"),
                update_mask=field_mask_pb2.FieldMask(paths=["price"]),
            ),
            metadata=api.metadata,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (
        "no credentials",
        lambda api: api.ledger.GetBalance(ledger_pb2.GetBalanceRequest(account_id="a1")),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    ),
    (
        "wrong credentials",
        lambda api: api.as_key("cdk_nope_nope").ledger.GetBalance(
            ledger_pb2.GetBalanceRequest(account_id="a1"), metadata=(("authorization", "Bearer cdk_nope_nope"),)
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    ),
]


@pytest.mark.parametrize(("name", "call", "code", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_is_a_typed_error_that_changes_nothing(
    api: Api, name: str, call: Call, code: grpc.StatusCode, reason: str
) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=10 * CREDIT)
    await api.client("c1", "a1", "p")
    before = [await api.balance(a) for a in ("a1", "c1")]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(api)
    assert raised.value.code() is code, raised.value.details()
    info = error_info(raised.value)
    assert info.reason == reason
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert info.metadata["field"]
    assert [await api.balance(a) for a in ("a1", "c1")] == before
    assert (await api.authorize("after", "c1")).allowed  # the server is still serving


async def _stream_error(api: Api, *requests: metering_pb2.StreamUsageRequest) -> grpc.aio.AioRpcError:
    call = api.stream()
    for request in requests:
        await call.write(request)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        while True:
            if await call.read() is grpc.aio.EOF:
                break
    return raised.value


async def test_stream_protocol_violations_close_only_that_stream(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=10 * CREDIT)
    await api.client("c1", "a1", "p")
    await api.authorize("live", "c1")
    live, _ = await api.start_call("live", "c1")
    await api.authorize("s1", "c1")
    start = metering_pb2.StreamUsageRequest(
        start=metering_pb2.SessionStart(session_id="s1", client_id="c1", channel=common_pb2.CHANNEL_VOICE)
    )
    usage = metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=5))
    back = metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=2))

    error = await _stream_error(api, usage)
    assert (error.code(), error_info(error).reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STREAM_NOT_STARTED")
    error = await _stream_error(api, metering_pb2.StreamUsageRequest())
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    error = await _stream_error(
        api,
        metering_pb2.StreamUsageRequest(
            start=metering_pb2.SessionStart(session_id="never", client_id="c1", channel=common_pb2.CHANNEL_VOICE)
        ),
    )
    assert error_info(error).reason == "SESSION_NOT_AUTHORIZED"
    error = await _stream_error(api, start, usage, back)
    assert (error.code(), error_info(error).metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "seconds_used")
    error = await _stream_error(api, start, start)
    assert error_info(error).reason in ("STREAM_ALREADY_STARTED", "SESSION_RESUMED_ELSEWHERE")
    for client_id in ("", "\x00", "c 1"):  # checked before any account is looked up
        bad = metering_pb2.StreamUsageRequest(
            start=metering_pb2.SessionStart(session_id="s1", client_id=client_id, channel=common_pb2.CHANNEL_VOICE)
        )
        error = await _stream_error(api, bad)
        assert (error.code(), error_info(error).metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "start.client_id",
        ), client_id

    summary = (await api.end_call(live, 3)).summary  # the other call never noticed
    assert summary.billed_seconds == 3


def test_only_an_unreachable_store_is_unavailable() -> None:
    lost = OperationalError("SELECT 1", {}, OSError("connection refused"))
    refused = DataError("SELECT 1", {}, ValueError("integer out of range"))
    assert as_creditd_error(lost).code == "UNAVAILABLE"
    assert as_creditd_error(refused).code == "INTERNAL"  # a statement the database refused is a bug


def test_a_status_is_cut_to_fit_a_default_client() -> None:
    error = InvalidArgument("x" * 50_000, "field", value="ü" * 50_000, other="y" * 10)
    status = to_status(error)
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert len(status.details.encode()) <= 512 and len(details) < 2048
    assert status_pb2.Status.FromString(details).message == status.details

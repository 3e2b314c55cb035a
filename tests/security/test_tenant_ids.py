"""Ids that callers choose are scoped to their tenant (SPEC §5), on both backends.

Two agencies (and two clients of the first) use the same top-up idempotency key, SMS
message id and voice session id. Neither sees, blocks, replays or bills the other's
operation; within one tenant the id keeps its exactly-once meaning.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2

from creditd.engine.durability import reconcile
from tests.conftest import CREDIT, Api, ServerFactory, error_info


@dataclass(frozen=True)
class Tenant:
    agency: str
    client: str
    other_client: str
    admin: Api  # the agency's admin key
    worker: Api  # the agency's worker key


async def _key(api: Api, role: int, account_id: str) -> Api:
    created = await api.accounts.CreateApiKey(
        account_pb2.CreateApiKeyRequest(role=role, account_id=account_id), metadata=api.metadata
    )
    return api.as_key(created.secret)


async def _tenant(api: Api, agency: str) -> Tenant:
    await api.agency(agency)
    await api.plan(agency, "p", free_voice_micros=100 * CREDIT, free_sms_micros=10 * CREDIT)
    await api.client(f"{agency}-c1", agency, "p")
    await api.client(f"{agency}-c2", agency, "p")
    return Tenant(
        agency,
        f"{agency}-c1",
        f"{agency}-c2",
        await _key(api, account_pb2.ROLE_AGENCY_ADMIN, agency),
        await _key(api, account_pb2.ROLE_WORKER, agency),
    )


@pytest.fixture
async def tenants(make_server: ServerFactory) -> Any:
    # Long slices and time-to-live: no renewal or expiry changes a balance during a test.
    async with make_server(slice_seconds=120, authorize_ttl_seconds=600) as running:
        yield running, await _tenant(running.api, "ta"), await _tenant(running.api, "tb")


async def _entries(api: Api, account_id: str, kind: int) -> list[ledger_pb2.LedgerEntry]:
    page = await api.ledger.ListLedgerEntries(
        ledger_pb2.ListLedgerEntriesRequest(account_id=account_id, page_size=100), metadata=api.metadata
    )
    return [e for e in page.entries if e.kind == kind]


async def _failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


# -- top-up idempotency keys: per agency ------------------------------------------------------


async def test_topup_idempotency_keys_are_per_agency(tenants: Any) -> None:
    running, a, b = tenants
    admin = running.api
    first = await a.admin.topup(a.client, 5 * CREDIT, "invoice-X")

    # Another agency with the same key and other parameters: a top-up of its own.
    theirs = await b.admin.topup(b.client, 7 * CREDIT, "invoice-X")
    assert theirs.entry_id != first.entry_id
    assert theirs.balance.purchased_micros == 7 * CREDIT
    assert (await b.admin.topup(b.client, 7 * CREDIT, "invoice-X")).entry_id == theirs.entry_id  # its own retry

    # A's key still means A's top-up: a retry answers the original, other parameters are refused.
    assert (await a.admin.topup(a.client, 5 * CREDIT, "invoice-X")).entry_id == first.entry_id
    error = await _failure(a.admin.topup(a.client, 6 * CREDIT, "invoice-X"))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert info.reason == "IDEMPOTENCY_KEY_REUSED" and info.metadata["entry_id"] == first.entry_id
    # The agency and its clients share one set of keys.
    error = await _failure(a.admin.topup(a.other_client, 5 * CREDIT, "invoice-X"))
    assert error_info(error).reason == "IDEMPOTENCY_KEY_REUSED"

    # A key used in B first does not make A's top-up with it fail.
    await admin.topup(b.agency, CREDIT, "invoice-Y")
    later = await a.admin.topup(a.other_client, 2 * CREDIT, "invoice-Y")
    assert later.balance.purchased_micros == 2 * CREDIT

    for tenant, expected in ((a, [(5 * CREDIT, "invoice-X")]), (b, [(7 * CREDIT, "invoice-X")])):
        topups = await _entries(admin, tenant.client, ledger_pb2.LEDGER_ENTRY_KIND_TOPUP)
        assert [(e.purchased_micros, e.idempotency_key) for e in topups] == expected
        assert (await admin.balance(tenant.client)).voice.purchased_micros == expected[0][0]
    topups = await _entries(admin, a.other_client, ledger_pb2.LEDGER_ENTRY_KIND_TOPUP)
    assert [(e.purchased_micros, e.idempotency_key) for e in topups] == [(2 * CREDIT, "invoice-Y")]
    assert (await admin.balance(b.agency)).voice.purchased_micros == CREDIT


# -- SMS message ids: per client --------------------------------------------------------------


async def _sms(
    api: Api, client_id: str, message_id: str, country: str = "US", segments: int = 1
) -> metering_pb2.SmsResult:
    """Send one SMS on a stream of its own and end the stream; returns the result."""
    call = api.stream()
    start = metering_pb2.SessionStart(
        session_id=f"sms-{message_id}", client_id=client_id, channel=common_pb2.CHANNEL_SMS
    )
    await call.write(metering_pb2.StreamUsageRequest(start=start))
    send = metering_pb2.SmsSend(message_id=message_id, destination_country=country, segments=segments)
    await call.write(metering_pb2.StreamUsageRequest(sms=send))
    result = (await call.read()).sms_result
    await call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd()))
    assert (await call.read()).WhichOneof("msg") == "summary"
    return result


async def _sms_used(api: Api, account_id: str) -> int:
    return (await api.balance(account_id)).sms.period_used_micros


async def test_sms_message_ids_are_per_client(tenants: Any) -> None:
    running, a, b = tenants
    admin = running.api
    first = await _sms(a.worker, a.client, "msg-M", "US", 1)
    assert (first.allowed, first.charged_micros) == (True, 166_000)

    # Another agency's client with the same id and other parameters: its own message, billed.
    theirs = await _sms(b.worker, b.client, "msg-M", "GB", 3)
    assert (theirs.allowed, theirs.charged_micros) == (True, 3 * 166_000)
    # Another client of the same agency: its own message too.
    sibling = await _sms(a.worker, a.other_client, "msg-M", "US", 2)
    assert (sibling.allowed, sibling.charged_micros) == (True, 2 * 166_000)

    # The same client again: the first result, not charged again.
    again = await _sms(a.worker, a.client, "msg-M", "US", 1)
    assert (again.allowed, again.charged_micros) == (True, 166_000)

    for account_id, used in ((a.client, 166_000), (b.client, 3 * 166_000), (a.other_client, 2 * 166_000)):
        assert await _sms_used(admin, account_id) == used
        entries = await _entries(admin, account_id, ledger_pb2.LEDGER_ENTRY_KIND_SMS_USAGE)
        assert [(e.message_id, e.usage_micros) for e in entries] == [("msg-M", used)]
    # Each agency pays the platform for its own clients' messages only.
    assert await _sms_used(admin, a.agency) == 3 * 166_000
    assert await _sms_used(admin, b.agency) == 3 * 166_000


@pytest.mark.parametrize(("country", "segments"), [("GB", 1), ("US", 2)])
async def test_a_reused_message_id_with_other_parameters_is_refused(tenants: Any, country: str, segments: int) -> None:
    running, a, _ = tenants
    admin = running.api
    await _sms(a.worker, a.client, "msg-R", "US", 1)
    before = await admin.balance(a.client), await admin.balance(a.agency)

    call = a.worker.stream()
    start = metering_pb2.SessionStart(session_id="sms-retry", client_id=a.client, channel=common_pb2.CHANNEL_SMS)
    await call.write(metering_pb2.StreamUsageRequest(start=start))
    send = metering_pb2.SmsSend(message_id="msg-R", destination_country=country, segments=segments)
    await call.write(metering_pb2.StreamUsageRequest(sms=send))
    error = await _failure(call.read())
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert (info.reason, info.metadata["message_id"]) == ("MESSAGE_ID_REUSED", "msg-R")
    assert (await admin.balance(a.client), await admin.balance(a.agency)) == before


# -- voice session ids: per agency, under concurrency -----------------------------------------


async def _authorize(tenant: Tenant, session_id: str) -> metering_pb2.AuthorizeResponse:
    return await tenant.worker.authorize(session_id, tenant.client)


async def test_one_session_id_in_two_agencies_at_once(tenants: Any) -> None:
    running, a, b = tenants
    admin = running.api
    answers = await asyncio.gather(*(_authorize(t, "call-1") for t in [a, b] * 8))
    assert all(answer.allowed and answer.granted_seconds == 120 for answer in answers), answers
    slice_micros = 120 * CREDIT // 60  # 120 s at 1 credit per minute, once per session
    for tenant in (a, b):
        assert (await admin.balance(tenant.client)).voice.reserved_micros == slice_micros
    # The database knows both reservations apart: it agrees with the hot store.
    assert await reconcile(running.app.ctx) == []

    async def call(tenant: Tenant, seconds: int) -> metering_pb2.SessionSummary:
        stream, first = await tenant.worker.start_call("call-1", tenant.client)
        assert first.WhichOneof("msg") == "grant" and first.grant.granted_seconds == 120, first
        await stream.write(metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=seconds - 1)))
        final = await tenant.worker.end_call(stream, seconds)
        assert final.WhichOneof("msg") == "summary", final
        return final.summary

    summaries = await asyncio.gather(call(a, 30), call(b, 90))
    for tenant, summary, seconds in zip((a, b), summaries, (30, 90), strict=True):
        cost = seconds * CREDIT // 60
        assert (summary.billed_seconds, summary.client_charged_micros) == (seconds, cost)
        balance = (await admin.balance(tenant.client)).voice
        assert (balance.reserved_micros, balance.period_used_micros) == (0, cost)
        agency = (await admin.balance(tenant.agency)).voice
        assert (agency.reserved_micros, agency.period_used_micros) == (0, cost)
        usage = await _entries(admin, tenant.client, ledger_pb2.LEDGER_ENTRY_KIND_VOICE_USAGE)
        assert [(e.session_id, e.seconds, e.usage_micros) for e in usage] == [("call-1", seconds, cost)]
    assert await reconcile(running.app.ctx) == []
    # Settled once: a retried Authorize in either agency is told so, and nothing is reserved again.
    for tenant in (a, b):
        error = await _failure(_authorize(tenant, "call-1"))
        assert error_info(error).reason == "SESSION_SETTLED"
        assert (await admin.balance(tenant.client)).voice.reserved_micros == 0


async def test_a_session_id_stays_unique_within_an_agency(tenants: Any) -> None:
    _, a, _ = tenants
    assert (await _authorize(a, "call-2")).allowed
    error = await _failure(a.worker.authorize("call-2", a.other_client))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(error).reason == "SESSION_ID_REUSED"

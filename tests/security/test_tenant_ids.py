"""Ids that callers choose are scoped to their tenant (SPEC §5), on both backends.

Two agencies (and two clients of the first) use the same top-up idempotency key, SMS
message id and voice session id. Neither sees, blocks, replays or bills the other's
operation; within one tenant the id keeps its exactly-once meaning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, ledger_pb2

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

"""Every RPC, every role, own and foreign tenant: allowed, or PERMISSION_DENIED.

The list of RPCs comes from the service descriptors, so a new RPC without a row here
fails `test_every_rpc_has_a_row`. "Allowed" means any answer other than
PERMISSION_DENIED or UNAUTHENTICATED (a NOT_FOUND or FAILED_PRECONDITION still shows
that the key got past the scope check). A missing, unknown or revoked key is
UNAUTHENTICATED on every RPC.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf import field_mask_pb2

from tests.conftest import CREDIT, Api, Running, ServerFactory, error_info

PLATFORM, AGENCY_ADMIN, WORKER, READER = "platform_admin", "agency_admin", "worker", "reader"
ROLES = (PLATFORM, AGENCY_ADMIN, WORKER, READER)
EVERYONE = frozenset(ROLES)
ADMINS = frozenset({PLATFORM, AGENCY_ADMIN})
METERING = frozenset({PLATFORM, AGENCY_ADMIN, WORKER})
ONLY_PLATFORM = frozenset({PLATFORM})
DENIED = {grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED}
_ids = itertools.count()


@dataclass(frozen=True)
class Tenant:
    agency: str
    client: str


OWN = Tenant("a1", "a1-c")
FOREIGN = Tenant("a2", "a2-c")

Call = Callable[[Api, Tenant, Api], Awaitable[Any]]  # (caller, target tenant, admin for setup)


@dataclass(frozen=True)
class Case:
    label: str
    method: str
    call: Call
    own: frozenset[str]  # roles allowed on their own tenant
    foreign: frozenset[str] = field(default=ONLY_PLATFORM)  # ... and on another tenant


def _uid(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


async def _authorize(api: Api, t: Tenant, _: Api) -> Any:
    return await api.authorize(_uid("s"), t.client)


async def _authorize_agency(api: Api, t: Tenant, _: Api) -> Any:
    return await api.authorize(_uid("s"), t.agency)


async def _stream_usage(api: Api, t: Tenant, _: Api) -> Any:
    """An SMS stream: start, then end. A denied key gets its status before anything else."""
    start = metering_pb2.SessionStart(session_id=_uid("sms"), client_id=t.client, channel=common_pb2.CHANNEL_SMS)
    for _attempt in range(3):
        call = api.stream()
        try:
            await call.write(metering_pb2.StreamUsageRequest(start=start))
            first = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({first}, timeout=0.3)  # an error comes at once
            if not done:  # started: nothing to say until the end
                await call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd()))
            return await asyncio.wait_for(first, 5)
        except grpc.aio.AioRpcError as error:
            if not _lost_race(error):
                raise
        finally:
            call.cancel()
    raise AssertionError("the stream never got a status")


def _lost_race(error: grpc.aio.AioRpcError) -> bool:
    """grpc.aio replaces the status of a call the server ended while the client was still
    writing with a local INTERNAL error ("execute_batch"): the server's answer is lost."""
    return error.code() is grpc.StatusCode.INTERNAL and "execute_batch" in (error.debug_error_string() or "")


def _topup_of(pick: Callable[[Tenant], str]) -> Call:
    async def topup(api: Api, t: Tenant, _: Api) -> Any:
        return await api.topup(pick(t), CREDIT, _uid("k"))

    return topup


def _balance_of(pick: Callable[[Tenant], str]) -> Call:
    async def balance(api: Api, t: Tenant, _: Api) -> Any:
        return await api.balance(pick(t))

    return balance


async def _watch_balance(api: Api, t: Tenant, _: Api) -> Any:
    call = api.ledger.WatchBalance(ledger_pb2.WatchBalanceRequest(account_id=t.client), metadata=api.metadata)
    try:
        return await asyncio.wait_for(call.read(), 5)
    finally:
        call.cancel()


async def _watch_events(api: Api, t: Tenant, _: Api) -> Any:
    # No event arrives within the deadline for an allowed watch: DEADLINE_EXCEEDED is "allowed".
    call = api.ledger.WatchEvents(
        ledger_pb2.WatchEventsRequest(account_id=t.client), metadata=api.metadata, timeout=0.4
    )
    try:
        return await call.read()
    finally:
        call.cancel()


async def _ledger(api: Api, t: Tenant, _: Api) -> Any:
    request = ledger_pb2.ListLedgerEntriesRequest(account_id=t.client)
    return await api.ledger.ListLedgerEntries(request, metadata=api.metadata)


async def _events(api: Api, t: Tenant, _: Api) -> Any:
    return await api.ledger.ListEvents(ledger_pb2.ListEventsRequest(account_id=t.client), metadata=api.metadata)


async def _create_agency(api: Api, t: Tenant, _: Api) -> Any:
    return await api.agency(_uid("ag"))


async def _create_plan(api: Api, t: Tenant, _: Api) -> Any:
    return await api.plan(t.agency, _uid("plan"))


async def _update_plan(api: Api, t: Tenant, _: Api) -> Any:
    request = account_pb2.UpdatePlanRequest(
        plan=account_pb2.Plan(agency_id=t.agency, plan_id="p", usage_limit_micros=0),
        update_mask=field_mask_pb2.FieldMask(paths=["usage_limit_micros"]),
    )
    return await api.accounts.UpdatePlan(request, metadata=api.metadata)


async def _get_plan(api: Api, t: Tenant, _: Api) -> Any:
    request = account_pb2.GetPlanRequest(agency_id=t.agency, plan_id="p")
    return await api.accounts.GetPlan(request, metadata=api.metadata)


async def _create_client(api: Api, t: Tenant, _: Api) -> Any:
    return await api.client(_uid("cl"), t.agency, "p")


def _subscription_of(pick: Callable[[Tenant], str]) -> Call:
    async def update(api: Api, t: Tenant, _: Api) -> Any:
        request = account_pb2.UpdateSubscriptionRequest(account_id=pick(t), inbound_active=True, outbound_active=True)
        return await api.accounts.UpdateSubscription(request, metadata=api.metadata)

    return update


def _auto_refill_of(pick: Callable[[Tenant], str]) -> Call:
    async def update(api: Api, t: Tenant, _: Api) -> Any:
        request = account_pb2.SetAutoRefillRequest(
            account_id=pick(t), balance_type=common_pb2.BALANCE_TYPE_VOICE, auto_refill=account_pb2.AutoRefill()
        )
        return await api.accounts.SetAutoRefill(request, metadata=api.metadata)

    return update


async def _low_balance(api: Api, t: Tenant, _: Api) -> Any:
    request = account_pb2.SetLowBalanceWarningRequest(
        account_id=t.client, balance_type=common_pb2.BALANCE_TYPE_VOICE, threshold_micros=CREDIT
    )
    return await api.accounts.SetLowBalanceWarning(request, metadata=api.metadata)


def _account_of(pick: Callable[[Tenant], str]) -> Call:
    async def get(api: Api, t: Tenant, _: Api) -> Any:
        return await api.accounts.GetAccount(account_pb2.GetAccountRequest(account_id=pick(t)), metadata=api.metadata)

    return get


def _create_key(role: int, pick: Callable[[Tenant], str]) -> Call:
    async def create(api: Api, t: Tenant, _: Api) -> Any:
        request = account_pb2.CreateApiKeyRequest(role=role, account_id=pick(t))
        return await api.accounts.CreateApiKey(request, metadata=api.metadata)

    return create


async def _revoke_key(api: Api, t: Tenant, admin: Api) -> Any:
    victim = await admin.accounts.CreateApiKey(
        account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_WORKER, account_id=t.agency), metadata=admin.metadata
    )
    request = account_pb2.RevokeApiKeyRequest(key_id=victim.key_id)
    return await api.accounts.RevokeApiKey(request, metadata=api.metadata)


async def _list_keys(api: Api, t: Tenant, _: Api) -> Any:
    request = account_pb2.ListApiKeysRequest(account_id=t.agency)
    return await api.accounts.ListApiKeys(request, metadata=api.metadata)


def _agency(t: Tenant) -> str:
    return t.agency


def _client(t: Tenant) -> str:
    return t.client


M, L, A = "/creditd.v1.MeteringService/", "/creditd.v1.LedgerService/", "/creditd.v1.AccountService/"
CASES = [
    Case("Authorize a client", M + "Authorize", _authorize, METERING),
    Case("Authorize an agency", M + "Authorize", _authorize_agency, ADMINS),
    Case("StreamUsage of a client", M + "StreamUsage", _stream_usage, METERING),
    Case("Topup a client", L + "Topup", _topup_of(_client), ADMINS),
    Case("Topup an agency", L + "Topup", _topup_of(_agency), ONLY_PLATFORM),
    Case("GetBalance of a client", L + "GetBalance", _balance_of(_client), EVERYONE),
    Case("GetBalance of an agency", L + "GetBalance", _balance_of(_agency), ADMINS),
    Case("WatchBalance of a client", L + "WatchBalance", _watch_balance, EVERYONE),
    Case("ListLedgerEntries of a client", L + "ListLedgerEntries", _ledger, EVERYONE),
    Case("ListEvents of a client", L + "ListEvents", _events, EVERYONE),
    Case("WatchEvents of a client", L + "WatchEvents", _watch_events, EVERYONE),
    Case("CreateAgency", A + "CreateAgency", _create_agency, ONLY_PLATFORM),
    Case("CreatePlan", A + "CreatePlan", _create_plan, ADMINS),
    Case("UpdatePlan", A + "UpdatePlan", _update_plan, ADMINS),
    Case("GetPlan", A + "GetPlan", _get_plan, ADMINS),
    Case("CreateClient", A + "CreateClient", _create_client, ADMINS),
    Case("UpdateSubscription of a client", A + "UpdateSubscription", _subscription_of(_client), ADMINS),
    Case("UpdateSubscription of an agency", A + "UpdateSubscription", _subscription_of(_agency), ONLY_PLATFORM),
    Case("SetAutoRefill of a client", A + "SetAutoRefill", _auto_refill_of(_client), ADMINS),
    Case("SetAutoRefill of an agency", A + "SetAutoRefill", _auto_refill_of(_agency), ADMINS),
    Case("SetLowBalanceWarning of a client", A + "SetLowBalanceWarning", _low_balance, ADMINS),
    Case("GetAccount of a client", A + "GetAccount", _account_of(_client), EVERYONE),
    Case("GetAccount of an agency", A + "GetAccount", _account_of(_agency), ADMINS),
    Case("CreateApiKey: reader of a client", A + "CreateApiKey", _create_key(account_pb2.ROLE_READER, _client), ADMINS),
    Case(
        "CreateApiKey: worker of an agency", A + "CreateApiKey", _create_key(account_pb2.ROLE_WORKER, _agency), ADMINS
    ),
    Case(
        "CreateApiKey: agency admin",
        A + "CreateApiKey",
        _create_key(account_pb2.ROLE_AGENCY_ADMIN, _agency),
        ADMINS,
    ),
    Case(
        "CreateApiKey: platform admin",
        A + "CreateApiKey",
        _create_key(account_pb2.ROLE_PLATFORM_ADMIN, _agency),
        ONLY_PLATFORM,
    ),
    Case("RevokeApiKey of an agency's key", A + "RevokeApiKey", _revoke_key, ADMINS),
    Case("ListApiKeys of an agency", A + "ListApiKeys", _list_keys, ADMINS),
]


def _all_methods() -> set[str]:
    return {
        f"/{method.full_name.rpartition('.')[0]}/{method.name}"
        for module in (metering_pb2, ledger_pb2, account_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_has_a_row() -> None:
    missing = _all_methods() - {case.method for case in CASES}
    assert not missing, f"RPCs with no row in the role table: {sorted(missing)}"


async def _setup(api: Api) -> dict[str, Api]:
    for t in (OWN, FOREIGN):
        await api.agency(t.agency)
        await api.plan(t.agency, "p", free_voice_micros=100 * CREDIT, free_sms_micros=10 * CREDIT)
        await api.client(t.client, t.agency, "p")
        await api.topup(t.client, 5 * CREDIT, f"setup-{t.client}")

    async def key(role: int, account_id: str) -> Api:
        request = account_pb2.CreateApiKeyRequest(role=role, account_id=account_id, description=f"role test {role}")
        return api.as_key((await api.accounts.CreateApiKey(request, metadata=api.metadata)).secret)

    return {
        PLATFORM: await key(account_pb2.ROLE_PLATFORM_ADMIN, ""),
        AGENCY_ADMIN: await key(account_pb2.ROLE_AGENCY_ADMIN, OWN.agency),
        WORKER: await key(account_pb2.ROLE_WORKER, OWN.agency),
        READER: await key(account_pb2.ROLE_READER, OWN.client),
    }


class Allowed:
    """The key got past the scope check; `status` is how the call ended (OK or another error)."""

    def __init__(self, status: grpc.StatusCode) -> None:
        self.status = status

    def __eq__(self, other: object) -> bool:
        return other is None

    def __repr__(self) -> str:
        return f"allowed ({self.status.name})"


async def _outcome(call: Awaitable[Any]) -> grpc.StatusCode | Allowed:
    """The denying status (PERMISSION_DENIED, UNAUTHENTICATED), or Allowed."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        if error.code() in DENIED:
            assert error_info(error).reason in ("PERMISSION_DENIED", "INVALID_CREDENTIALS")
            return error.code()
        return Allowed(error.code())
    return Allowed(grpc.StatusCode.OK)


async def test_each_role_reaches_exactly_what_the_table_says(server: Running) -> None:
    admin = server.api
    keys = await _setup(admin)
    wrong: list[str] = []
    ran = 0
    for case in CASES:
        for role in ROLES:
            for tenant, allowed in ((OWN, case.own), (FOREIGN, case.foreign)):
                got = await _outcome(case.call(keys[role], tenant, admin))
                ran += 1
                want = None if role in allowed else grpc.StatusCode.PERMISSION_DENIED
                if not (isinstance(got, Allowed) if want is None else got is want):
                    where = "own" if tenant is OWN else "foreign"
                    wrong.append(f"{case.label} as {role} on its {where} tenant: want {want}, got {got}")
    assert not wrong, "\n".join(wrong)
    assert ran == len(CASES) * len(ROLES) * 2


async def test_no_key_unknown_key_and_revoked_key_are_unauthenticated_on_every_rpc(server: Running) -> None:
    admin = server.api
    await _setup(admin)
    revoked = await admin.accounts.CreateApiKey(
        account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_AGENCY_ADMIN, account_id=OWN.agency),
        metadata=admin.metadata,
    )
    as_revoked = admin.as_key(revoked.secret)
    assert isinstance(await _outcome(_balance_of(_client)(as_revoked, OWN, admin)), Allowed)  # works, and is now cached
    await admin.accounts.RevokeApiKey(account_pb2.RevokeApiKeyRequest(key_id=revoked.key_id), metadata=admin.metadata)
    nobody = admin.as_key("")
    nobody.metadata = ()
    callers = {
        "no key": nobody,
        "not a bearer token": Api(admin.channel, "x"),
        "unknown key": admin.as_key(f"cdk_{revoked.key_id}_not-the-secret"),
        "unknown key id": admin.as_key("cdk_0123456789abcdef_whatever"),
        "revoked key": as_revoked,
    }
    callers["not a bearer token"].metadata = (("authorization", "Basic dXNlcjpwYXNz"),)
    wrong = []
    for case in CASES:
        for name, caller in callers.items():
            got = await _outcome(case.call(caller, OWN, admin))
            if got is not grpc.StatusCode.UNAUTHENTICATED:
                wrong.append(f"{case.label} with {name}: got {got}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("backend", ["redis+postgres"], indirect=True)
async def test_a_key_revoked_on_one_replica_stops_working_on_the_others_at_once(make_server: ServerFactory) -> None:
    async with make_server() as one, make_server() as two:
        await one.api.agency("a1")
        created = await one.api.accounts.CreateApiKey(
            account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_AGENCY_ADMIN, account_id="a1"),
            metadata=one.api.metadata,
        )
        on_two = two.api.as_key(created.secret)
        assert (await on_two.balance("a1")).account_id == "a1"  # replica two caches the key
        await one.api.accounts.RevokeApiKey(
            account_pb2.RevokeApiKeyRequest(key_id=created.key_id), metadata=one.api.metadata
        )
        for _ in range(50):
            if await _outcome(on_two.balance("a1")) is grpc.StatusCode.UNAUTHENTICATED:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the revoked key still works on the other replica")


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
async def test_revoking_a_key_ends_its_open_watches(server: Running) -> None:
    admin = server.api
    await _setup(admin)
    created = await admin.accounts.CreateApiKey(
        account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_READER, account_id=OWN.client), metadata=admin.metadata
    )
    reader = admin.as_key(created.secret)
    balances = reader.ledger.WatchBalance(
        ledger_pb2.WatchBalanceRequest(account_id=OWN.client), metadata=reader.metadata, timeout=10
    )
    events = reader.ledger.WatchEvents(
        ledger_pb2.WatchEventsRequest(account_id=OWN.client), metadata=reader.metadata, timeout=10
    )
    await balances.read()
    await asyncio.sleep(0.2)  # the events watch is subscribed
    await admin.accounts.RevokeApiKey(account_pb2.RevokeApiKeyRequest(key_id=created.key_id), metadata=admin.metadata)
    for call in (balances, events):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_another_tenant_reusing_a_live_session_id_gets_a_call_of_its_own(server: Running) -> None:
    admin = server.api
    keys = await _setup(admin)
    own_worker = keys[WORKER]
    foreign_worker = admin.as_key(
        (
            await admin.accounts.CreateApiKey(
                account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_WORKER, account_id=FOREIGN.agency),
                metadata=admin.metadata,
            )
        ).secret
    )
    assert (await own_worker.authorize("call-1", OWN.client)).allowed
    # Session ids are per agency: the same id in another agency is another session.
    assert (await foreign_worker.authorize("call-1", FOREIGN.client)).allowed
    call, first = await own_worker.start_call("call-1", OWN.client)  # the call is still ours
    assert first.grant.granted_seconds > 0
    summary = await own_worker.end_call(call, 3)
    assert summary.summary.billed_seconds == 3
    foreign = (await admin.balance(FOREIGN.client)).voice
    assert foreign.period_used_micros == 0 and foreign.reserved_micros > 0  # its own call, not started yet
    call, _ = await foreign_worker.start_call("call-1", FOREIGN.client)
    assert (await foreign_worker.end_call(call, 5)).summary.billed_seconds == 5
    foreign = (await admin.balance(FOREIGN.client)).voice
    assert (foreign.reserved_micros, foreign.period_used_micros) == (0, 5 * CREDIT // 60 + 1)

"""AccountService: agencies with platform overrides, plans, clients, keys and their scopes."""

from __future__ import annotations

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2
from google.protobuf import field_mask_pb2

from tests.conftest import ALL_BACKENDS, CREDIT, Api, error_info

# The rules hold on every backend, the Redis Cluster one included.
pytestmark = pytest.mark.parametrize("backend", ALL_BACKENDS, indirect=True)


async def test_unset_agency_overrides_take_platform_defaults_and_zero_is_a_real_value(api: Api) -> None:
    default = await api.agency("standard")
    trial = await api.agency("trial", free_voice_micros=0, default_voice_micros_per_minute=2 * CREDIT)
    assert (default.free_voice_micros, default.free_sms_micros) == (300 * CREDIT, 83 * CREDIT)
    assert default.platform_rates.default_voice_micros_per_minute == CREDIT
    assert default.platform_rates.sms_rates["US"] == 166_000
    assert (trial.free_voice_micros, trial.free_sms_micros) == (0, 83 * CREDIT)
    assert trial.platform_rates.default_voice_micros_per_minute == 2 * CREDIT
    assert (await api.balance("trial")).voice.free_micros == 0
    fetched = await api.accounts.GetAccount(account_pb2.GetAccountRequest(account_id="trial"), metadata=api.metadata)
    assert fetched.account == trial


async def test_agency_and_client_ids_share_one_namespace(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.client("a1", "a1", "p")
    assert raised.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert error_info(raised.value).reason == "ALREADY_EXISTS"


async def test_update_plan_changes_only_the_masked_fields_and_prices_the_next_slice(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=100 * CREDIT, usage_limit_micros=50 * CREDIT)
    await api.client("c1", "a1", "p")
    updated = await api.accounts.UpdatePlan(
        account_pb2.UpdatePlanRequest(
            plan=account_pb2.Plan(agency_id="a1", plan_id="p", default_voice_micros_per_minute=3 * CREDIT),
            update_mask=field_mask_pb2.FieldMask(paths=["default_voice_micros_per_minute"]),
        ),
        metadata=api.metadata,
    )
    assert updated.plan.default_voice_micros_per_minute == 3 * CREDIT
    assert updated.plan.usage_limit_micros == 50 * CREDIT  # not in the mask: kept
    got = await api.accounts.GetPlan(account_pb2.GetPlanRequest(agency_id="a1", plan_id="p"), metadata=api.metadata)
    assert got.plan == updated.plan
    await api.authorize("s1", "c1")
    call, _ = await api.start_call("s1", "c1")
    assert (await api.end_call(call, 60)).summary.client_charged_micros == 3 * CREDIT


async def test_scoped_keys_reach_only_their_own_tenant(api: Api) -> None:
    for agency in ("a1", "a2"):
        await api.agency(agency)
        await api.plan(agency, "p", free_voice_micros=10 * CREDIT)
        await api.client(f"{agency}-c", agency, "p")
    worker = await api.accounts.CreateApiKey(
        account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_WORKER, account_id="a1"), metadata=api.metadata
    )
    as_worker = api.as_key(worker.secret)
    assert (await as_worker.authorize("s1", "a1-c")).allowed
    assert (await as_worker.balance("a1-c")).voice.free_micros == 10 * CREDIT
    for forbidden in (
        as_worker.authorize("s2", "a2-c"),
        as_worker.balance("a2-c"),
        as_worker.topup("a1-c", CREDIT, "worker-topup"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await forbidden
        assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert error_info(raised.value).reason == "PERMISSION_DENIED"
    assert (await api.balance("a1-c")).voice.purchased_micros == 0

    listed = await api.accounts.ListApiKeys(account_pb2.ListApiKeysRequest(account_id="a1"), metadata=api.metadata)
    assert [(k.key_id, k.role, k.revoked) for k in listed.api_keys] == [(worker.key_id, account_pb2.ROLE_WORKER, False)]
    assert worker.secret not in str(listed)
    await api.accounts.RevokeApiKey(account_pb2.RevokeApiKeyRequest(key_id=worker.key_id), metadata=api.metadata)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await as_worker.balance("a1-c")
    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_a_reader_key_sees_one_account(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p")
    await api.client("c1", "a1", "p")
    reader = await api.accounts.CreateApiKey(
        account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_READER, account_id="c1"), metadata=api.metadata
    )
    as_reader = api.as_key(reader.secret)
    assert (await as_reader.balance("c1")).voice.has_wallet
    entries = await as_reader.ledger.ListLedgerEntries(
        ledger_pb2.ListLedgerEntriesRequest(account_id="c1", balance_type=common_pb2.BALANCE_TYPE_VOICE),
        metadata=as_reader.metadata,
    )
    assert entries.entries == []  # the plan gives no free credits: nothing happened yet
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await as_reader.balance("a1")
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED

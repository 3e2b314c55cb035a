"""The edge checks (creditd.api.limits): every field of every request has limits, and a field
outside them is INVALID_ARGUMENT naming it, small enough for a default client, changing nothing.

The RPCs and their fields come from the descriptors, so a new RPC or field is covered too.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import field_mask_pb2, message_factory
from google.protobuf.message import Message

from creditd.api.limits import MAX_RATES
from tests.conftest import (
    CREDIT,
    DEFAULT_MAX_METADATA_BYTES,
    Api,
    creditd_methods,
    error_info,
    trailers_size,
)

FD = pb_descriptor.FieldDescriptor
METHODS = creditd_methods()
HUGE = "x" * 20_000


async def _setup(api: Api) -> None:
    await api.agency("a1")
    await api.plan("a1", "p", free_voice_micros=10 * CREDIT, free_sms_micros=10 * CREDIT)
    await api.client("c1", "a1", "p")


async def _call(api: Api, path: str, request: Message) -> Any:
    """Call any RPC with one request; a stream is read until it ends or fails."""
    method = METHODS[path]
    response = message_factory.GetMessageClass(method.output_type)
    kind = api.channel.unary_stream if method.server_streaming else api.channel.unary_unary
    if method.client_streaming:
        kind = api.channel.stream_stream
    call = kind(path, request_serializer=type(request).SerializeToString, response_deserializer=response.FromString)
    if method.client_streaming:
        return [r async for r in call(iter([request]), metadata=api.metadata, timeout=10)]
    if method.server_streaming:
        return [r async for r in call(request, metadata=api.metadata, timeout=10)]
    return await call(request, metadata=api.metadata, timeout=10)


async def _invalid(api: Api, path: str, request: Message) -> tuple[str, str]:
    """The field an INVALID_ARGUMENT names, and its message; checks the error fits a default client."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _call(api, path, request)
    error = raised.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (path, error.details())
    assert trailers_size(error) <= DEFAULT_MAX_METADATA_BYTES
    info = error_info(error)
    assert len(error.details() or "") <= 512 and all(len(v) <= 128 for v in info.metadata.values())
    return info.metadata["field"], error.details() or ""


def _stream_request(member: str, field: str, value: Any) -> metering_pb2.StreamUsageRequest:
    request = metering_pb2.StreamUsageRequest()
    setattr(getattr(request, member), field, value)
    return request


def _fields(kind: int) -> list[tuple[str, str, str]]:
    """(RPC path, oneof member or "", field) of every request field of this type, one level
    into StreamUsage's messages."""
    found = []
    for path, method in METHODS.items():
        if method.client_streaming:
            for member in method.input_type.fields:
                found += [(path, member.name, f.name) for f in member.message_type.fields if f.type == kind]
        else:
            found += [(path, "", f.name) for f in method.input_type.fields if f.type == kind and not f.is_repeated]
    return found


def _request(path: str, member: str, field: str, value: Any) -> Message:
    if member:
        return _stream_request(member, field, value)
    request = message_factory.GetMessageClass(METHODS[path].input_type)()
    setattr(request, field, value)
    return request


STRINGS = _fields(FD.TYPE_STRING)
ENUMS = _fields(FD.TYPE_ENUM)


async def test_every_string_field_has_a_length_limit(api: Api) -> None:
    await _setup(api)
    before = await api.balance("c1")
    assert len(STRINGS) > 30
    for path, member, field in STRINGS:
        named, message = await _invalid(api, path, _request(path, member, field, HUGE))
        assert named == (f"{member}.{field}" if member else field), path
        assert HUGE[:100] not in message
    assert await api.balance("c1") == before


async def test_every_enum_field_takes_only_its_declared_values(api: Api) -> None:
    await _setup(api)
    assert len(ENUMS) > 8
    for path, member, field in ENUMS:
        named, _ = await _invalid(api, path, _request(path, member, field, 99))
        assert named == (f"{member}.{field}" if member else field), path


LIST = "/creditd.v1.LedgerService/ListLedgerEntries"
EVENTS = "/creditd.v1.LedgerService/ListEvents"
BAD_TOKENS = ["9223372036854775808", "99999999999999999999999", "0", "-1", "12a", "\uff11\uff12", " 1"]


async def test_page_tokens_are_cursors_or_invalid(api: Api) -> None:
    await _setup(api)
    for token in BAD_TOKENS:
        for path, request in (
            (LIST, ledger_pb2.ListLedgerEntriesRequest(account_id="c1", page_token=token)),
            (EVENTS, ledger_pb2.ListEventsRequest(account_id="c1", page_token=token)),
        ):
            assert (await _invalid(api, path, request))[0] == "page_token", token
    # The largest cursor is a valid one: the page before it is the newest.
    page = await _call(api, LIST, ledger_pb2.ListLedgerEntriesRequest(account_id="c1", page_token=str(2**63 - 1)))
    assert page == await _call(api, LIST, ledger_pb2.ListLedgerEntriesRequest(account_id="c1"))


async def test_page_size_is_bounded(api: Api) -> None:
    await _setup(api)
    assert (await _invalid(api, EVENTS, ledger_pb2.ListEventsRequest(account_id="c1", page_size=1001)))[0] == (
        "page_size"
    )
    assert (await _invalid(api, EVENTS, ledger_pb2.ListEventsRequest(account_id="c1", page_size=-1)))[0] == "page_size"


async def test_stream_messages_are_checked_like_requests(api: Api) -> None:
    await _setup(api)
    path = "/creditd.v1.MeteringService/StreamUsage"
    for channel in (common_pb2.CHANNEL_SMS, common_pb2.CHANNEL_VOICE):
        start = metering_pb2.SessionStart(session_id="s", client_id="c1", channel=channel, direction=99)
        field, message = await _invalid(api, path, metering_pb2.StreamUsageRequest(start=start))
        assert field == "start.direction" and "DIRECTION_INBOUND" in message
    sms = metering_pb2.SmsSend(message_id="m", destination_country="US", segments=2**31 - 1)
    assert (await _invalid(api, path, metering_pb2.StreamUsageRequest(sms=sms)))[0] == "sms.segments"


def _plan(**fields: Any) -> account_pb2.CreatePlanRequest:
    return account_pb2.CreatePlanRequest(agency_id="a1", plan_id="big", **fields)


CREATE_PLAN, CREATE_AGENCY = "/creditd.v1.AccountService/CreatePlan", "/creditd.v1.AccountService/CreateAgency"
UPDATE_PLAN = "/creditd.v1.AccountService/UpdatePlan"
OVERSIZED = [
    ("long voice rate key", CREATE_PLAN, _plan(voice_rates={HUGE: 5}), "voice_rates"),
    ("long sms rate key", CREATE_PLAN, _plan(sms_rates={HUGE: 5}), "sms_rates"),
    ("many voice rates", CREATE_PLAN, _plan(voice_rates={f"p{i}": 5 for i in range(20_000)}), "voice_rates"),
    ("many sms rates", CREATE_PLAN, _plan(sms_rates={f"{i:05d}": 5 for i in range(MAX_RATES + 1)}), "sms_rates"),
    ("negative rate", CREATE_PLAN, _plan(voice_rates={"deepgram": -5}), "voice_rates"),
    (
        "agency rates",
        CREATE_AGENCY,
        account_pb2.CreateAgencyRequest(agency_id="a2", voice_rates={HUGE: 5}),
        "voice_rates",
    ),
    (
        "unknown mask paths",
        UPDATE_PLAN,
        account_pb2.UpdatePlanRequest(
            plan=account_pb2.Plan(agency_id="a1", plan_id="p"),
            update_mask=field_mask_pb2.FieldMask(paths=[f"unknown_{i}" for i in range(3000)]),
        ),
        "update_mask.paths",
    ),
    (
        "long mask path",
        UPDATE_PLAN,
        account_pb2.UpdatePlanRequest(
            plan=account_pb2.Plan(agency_id="a1", plan_id="p"), update_mask=field_mask_pb2.FieldMask(paths=[HUGE])
        ),
        "update_mask.paths",
    ),
    (
        "plan's own map",
        UPDATE_PLAN,
        account_pb2.UpdatePlanRequest(plan=account_pb2.Plan(agency_id="a1", plan_id="p", sms_rates={HUGE: 1})),
        "plan.sms_rates",
    ),
]


@pytest.mark.parametrize(("name", "path", "request_", "field"), OVERSIZED, ids=[o[0] for o in OVERSIZED])
async def test_oversized_maps_and_masks_get_a_short_error(
    api: Api, name: str, path: str, request_: Message, field: str
) -> None:
    await _setup(api)
    named, message = await _invalid(api, path, request_)
    assert named == field and HUGE[:100] not in message
    plans = await api.accounts.GetPlan(account_pb2.GetPlanRequest(agency_id="a1", plan_id="p"), metadata=api.metadata)
    assert not plans.plan.voice_rates and not plans.plan.sms_rates  # nothing changed


async def test_the_largest_maps_are_accepted(api: Api) -> None:
    await _setup(api)
    countries = [chr(65 + i // 26) + chr(65 + i % 26) for i in range(MAX_RATES)]
    providers = [f"provider-{i}" for i in range(MAX_RATES)]
    plan = await api.plan(
        "a1", "big", voice_rates=dict.fromkeys(providers, CREDIT), sms_rates=dict.fromkeys(countries, 166_000)
    )
    assert len(plan.voice_rates) == len(plan.sms_rates) == MAX_RATES


async def test_a_bad_value_in_a_domain_check_is_quoted_short(api: Api) -> None:
    """Values within the edge limits that a domain rule refuses are quoted, not repeated whole."""
    await _setup(api)
    key = "Not A Provider " + "y" * 40  # within 64 characters, not a provider name
    named, message = await _invalid(api, CREATE_PLAN, _plan(voice_rates={key: 5}))
    assert named == "voice_rates" and key not in message and key[:32] in message

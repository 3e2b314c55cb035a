"""Hostile input against a live server, property-based (hypothesis).

Every RPC of the creditd.v1 file descriptors (not a hand-kept list) gets requests built
from its descriptor with random field values (negative, zero and huge numbers, numbers
past 2^63 in page tokens, empty, oversized and non-printable strings, unknown enum values,
oversized maps and update masks, missing or several oneof members), random keys, and raw
bytes that are no valid message. StreamUsage gets random sequences (usage before start,
two starts, end twice, decreasing seconds, SMS on a voice stream, storms of hundreds of
messages). After every case:

- the answer is normal, or a typed status (never INTERNAL, UNKNOWN, or UNAVAILABLE while
  both stores are up) carrying exactly one ErrorInfo (domain creditd), small enough for a
  default client's 8 KiB metadata limit;
- the server still answers;
- a request that failed changed no balance and no ledger of any account;
- a concurrent good SMS stream and a long good voice call on the same connection go on
  undisturbed.

On both backends, about 30 s each. The number of cases that ran is printed (pytest -s).
"""

from __future__ import annotations

import asyncio
import queue
import string
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2, metering_pb2
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import (
    ADMIN_TOKEN,
    CREDIT,
    DEFAULT_MAX_METADATA_BYTES,
    Api,
    ServerFactory,
    creditd_methods,
    error_info,
    trailers_size,
)

FD = pb_descriptor.FieldDescriptor
METHODS = creditd_methods()
TYPED_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
# Accounts whose balances and ledgers an invalid request must never change.
WATCHED = ("fa", "fc", "fd", "fb", "fe")
IDS = ["fa", "fc", "fd", "fb", "fe", "fp", "ga", "nobody", "s-authorized", "US", "GB", "deepgram", "elevenlabs"]
UNARY_EXAMPLES = 20  # per RPC and backend
STREAM_EXAMPLES = 120
RAW_EXAMPLES = 5  # per RPC


# -- strategies from descriptors ----------------------------------------------------------

_INT_LIMITS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_TEXT = st.characters(blacklist_categories=("Cs",))  # any code point protobuf can encode


def _ints(low: int, high: int) -> st.SearchStrategy[int]:
    special = [v for v in (0, 1, -1, 60, 1_000_000, 10**12, 2**31 - 1, -(2**31), 2**53, low, high) if low <= v <= high]
    return st.one_of(
        st.sampled_from(special), st.integers(low, high), st.integers(-100, 100).filter(lambda v: low <= v)
    )


NUMBERS = ["0", "-1", "1", str(2**63 - 1), str(2**63), str(2**64), "9" * 40, "1e3", "0x10"]


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([*IDS, *NUMBERS, "", " ", "a" * 65, "\x00", "ü", "{fa}", "fa:fc", "*"]),
        st.text(string.ascii_letters + string.digits + "-_.:", max_size=12),
        st.text(_TEXT, max_size=20),
        st.text(st.sampled_from("\x00\x01\x07\x1b\x7f\u200b\u202e\ufeff"), min_size=1, max_size=8),
        st.text(string.ascii_lowercase, min_size=200, max_size=5000),  # oversized
        st.just("k" * 20_000),
    )


def _scalar(field: FD) -> st.SearchStrategy[Any]:
    if field.type in _INT_LIMITS:
        return _ints(*_INT_LIMITS[field.type])
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_STRING:
        return _strings()
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if field.type == FD.TYPE_ENUM:
        known = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-5, 40), st.just(2**31 - 1), st.just(-(2**31)))
    raise AssertionError(f"no strategy for {field.full_name}")


def _value(field: FD, depth: int) -> st.SearchStrategy[Any]:
    if field.type == FD.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


@st.composite
def _message(draw: st.DrawFn, descriptor: pb_descriptor.Descriptor, depth: int) -> Message:
    cls = message_factory.GetMessageClass(descriptor)
    message = cls()
    if descriptor.full_name == "google.protobuf.FieldMask":
        names = ["free_voice_micros", "usage_limit_micros", "voice_rates", "plan_id", "agency_id", "nonsense"]
        paths = st.lists(st.one_of(st.sampled_from(names), _strings()), max_size=3)
        many = st.lists(st.sampled_from(names), min_size=33, max_size=3000)  # past the limit of paths
        message.paths.extend(draw(st.one_of(paths, paths, paths, many)))
        return message
    oneofs = {oneof.name: oneof for oneof in descriptor.oneofs if not oneof.name.startswith("_")}
    chosen = {name: draw(st.sampled_from([None, *o.fields])) for name, o in oneofs.items()}
    for field in descriptor.fields:
        real_oneof = field.containing_oneof is not None and field.containing_oneof.name in oneofs
        if real_oneof and chosen[field.containing_oneof.name] is not field:
            continue
        if not real_oneof and depth > 2:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            few = st.dictionaries(_scalar(key_field), _value(value_field, depth), max_size=3)
            many = st.integers(301, 2000).map(lambda n: {f"k{i}": 1 for i in range(n)})  # past the limit of entries
            if key_field.type != FD.TYPE_STRING or value_field.type not in _INT_LIMITS:
                many = few
            entries = draw(st.one_of(few, few, few, many))
            target = getattr(message, field.name)
            for key, value in entries.items():
                if value_field.type == FD.TYPE_MESSAGE:
                    target[key].CopyFrom(value)
                else:
                    target[key] = value
            continue
        if field.is_repeated:
            values = draw(st.lists(_value(field, depth), max_size=3))
            if field.type == FD.TYPE_MESSAGE:
                getattr(message, field.name).extend(values)
            else:
                getattr(message, field.name).extend(values)
            continue
        if not real_oneof and not draw(st.booleans()):
            continue  # left unset (proto3 optional fields stay absent)
        value = draw(_value(field, depth))
        if field.type == FD.TYPE_MESSAGE:
            getattr(message, field.name).CopyFrom(value)
        else:
            setattr(message, field.name, value)
    return message


def messages(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    return _message(descriptor, depth)


# Valid requests, one per RPC: the fuzzer mutates one or two of their fields so that many
# cases get past validation and reach the business rules.
_M, _L, _A = "/creditd.v1.MeteringService/", "/creditd.v1.LedgerService/", "/creditd.v1.AccountService/"
TEMPLATES: dict[str, Callable[[str], Message]] = {
    _M + "Authorize": lambda u: metering_pb2.AuthorizeRequest(
        session_id=f"t-{u}", client_id="fc", channel=common_pb2.CHANNEL_VOICE, direction=common_pb2.DIRECTION_INBOUND
    ),
    _L + "Topup": lambda u: ledger_pb2.TopupRequest(
        account_id="fc",
        balance_type=common_pb2.BALANCE_TYPE_VOICE,
        amount_micros=CREDIT,
        kind=ledger_pb2.TOPUP_KIND_PURCHASE,
        idempotency_key=f"k-{u}",
    ),
    _L + "GetBalance": lambda u: ledger_pb2.GetBalanceRequest(account_id="fc"),
    _L + "WatchBalance": lambda u: ledger_pb2.WatchBalanceRequest(account_id="fc"),
    _L + "ListLedgerEntries": lambda u: ledger_pb2.ListLedgerEntriesRequest(account_id="fc", page_size=5),
    _L + "ListEvents": lambda u: ledger_pb2.ListEventsRequest(account_id="fc", page_size=5),
    _L + "WatchEvents": lambda u: ledger_pb2.WatchEventsRequest(account_id="fc"),
    _A + "CreateAgency": lambda u: account_pb2.CreateAgencyRequest(agency_id=f"ag-{u}", display_name="Agency"),
    _A + "CreatePlan": lambda u: account_pb2.CreatePlanRequest(
        agency_id="fa", plan_id=f"p-{u}", free_voice_micros=CREDIT, default_voice_micros_per_minute=CREDIT
    ),
    _A + "UpdatePlan": lambda u: account_pb2.UpdatePlanRequest(
        plan=account_pb2.Plan(agency_id="fa", plan_id="fp", usage_limit_micros=0),
        update_mask={"paths": ["usage_limit_micros"]},
    ),
    _A + "GetPlan": lambda u: account_pb2.GetPlanRequest(agency_id="fa", plan_id="fp"),
    _A + "CreateClient": lambda u: account_pb2.CreateClientRequest(
        client_id=f"c-{u}", agency_id="fa", plan_id="fp", billing_mode=common_pb2.BILLING_MODE_REBILLING
    ),
    _A + "UpdateSubscription": lambda u: account_pb2.UpdateSubscriptionRequest(
        account_id="fc", inbound_active=True, outbound_active=True
    ),
    _A + "SetAutoRefill": lambda u: account_pb2.SetAutoRefillRequest(
        account_id="fc",
        balance_type=common_pb2.BALANCE_TYPE_VOICE,
        auto_refill=account_pb2.AutoRefill(
            enabled=True, threshold_micros=CREDIT, amount_micros=CREDIT, max_refills_per_period=2
        ),
    ),
    _A + "SetLowBalanceWarning": lambda u: account_pb2.SetLowBalanceWarningRequest(
        account_id="fc", balance_type=common_pb2.BALANCE_TYPE_VOICE, threshold_micros=CREDIT
    ),
    _A + "GetAccount": lambda u: account_pb2.GetAccountRequest(account_id="fc"),
    _A + "CreateApiKey": lambda u: account_pb2.CreateApiKeyRequest(role=account_pb2.ROLE_READER, account_id="fc"),
    _A + "RevokeApiKey": lambda u: account_pb2.RevokeApiKeyRequest(key_id=u[:16]),
    _A + "ListApiKeys": lambda u: account_pb2.ListApiKeysRequest(account_id="fa"),
}


@st.composite
def _mutated(draw: st.DrawFn, path: str) -> Message:
    message = TEMPLATES[path](draw(st.uuids()).hex)
    fields = list(message.DESCRIPTOR.fields)
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique_by=lambda f: f.name)):
        if draw(st.integers(0, 4)) == 0:
            message.ClearField(field.name)
            continue
        replacement = draw(_message(message.DESCRIPTOR, 0))
        if field.is_repeated or field.type == FD.TYPE_MESSAGE:
            message.ClearField(field.name)
        if replacement.DESCRIPTOR.fields_by_name[field.name].has_presence and not replacement.HasField(field.name):
            continue
        message.MergeFrom(_only(replacement, field.name))
    return message


def _only(message: Message, name: str) -> Message:
    copy = type(message)()
    copy.CopyFrom(message)
    for field in copy.DESCRIPTOR.fields:
        if field.name != name:
            copy.ClearField(field.name)
    return copy


def requests_for(path: str, method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[Message]:
    if path in TEMPLATES:
        return st.one_of(messages(method.input_type), _mutated(path), _mutated(path))
    return messages(method.input_type)


# -- the sync client the fuzzing thread uses ------------------------------------------------


class Client:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.admin = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
        self.keys: dict[str, tuple[tuple[str, str], ...]] = {"admin": self.admin, "none": ()}
        self.calls: dict[str, Any] = {}
        for path, method in METHODS.items():
            request = message_factory.GetMessageClass(method.input_type)
            response = message_factory.GetMessageClass(method.output_type)
            kind = (
                self.channel.stream_stream
                if method.client_streaming
                else self.channel.unary_stream
                if method.server_streaming
                else self.channel.unary_unary
            )
            self.calls[path] = kind(
                path, request_serializer=request.SerializeToString, response_deserializer=response.FromString
            )
        self.raw = {
            path: (self.channel.stream_stream if m.client_streaming else self.channel.unary_unary)(
                path, request_serializer=bytes, response_deserializer=bytes
            )
            for path, m in METHODS.items()
            if not m.server_streaming or m.client_streaming
        }

    def add_key(self, name: str, secret: str) -> None:
        self.keys[name] = (("authorization", f"Bearer {secret}"),)

    def state(self) -> dict[str, tuple[bytes, bytes]]:
        """The balances and the newest ledger entry of every watched account."""
        balance = self.calls["/creditd.v1.LedgerService/GetBalance"]
        ledger = self.calls["/creditd.v1.LedgerService/ListLedgerEntries"]
        return {
            account: (
                balance(
                    ledger_pb2.GetBalanceRequest(account_id=account), metadata=self.admin, timeout=5
                ).SerializeToString(),
                ledger(
                    ledger_pb2.ListLedgerEntriesRequest(account_id=account, page_size=1), metadata=self.admin, timeout=5
                ).SerializeToString(),
            )
            for account in WATCHED
        }

    def close(self) -> None:
        self.channel.close()


def _typed(error: grpc.RpcError) -> None:
    """A real failure: an expected status with exactly one ErrorInfo of domain creditd, which
    a default client can receive."""
    assert error.code() in TYPED_ERRORS, f"{error.code()}: {error.details()}"
    assert trailers_size(error) <= DEFAULT_MAX_METADATA_BYTES
    info = error_info(error)  # type: ignore[arg-type]  # checks one ErrorInfo, domain creditd
    assert info.reason and info.reason == info.reason.upper() and " " not in info.reason


# -- the tests ------------------------------------------------------------------------------


async def _setup(api: Api) -> dict[str, str]:
    for agency in ("fa", "fb", "ga"):
        await api.agency(agency)
        await api.topup(agency, 5000 * CREDIT, f"fund-{agency}")
        await api.plan(agency, "fp", free_voice_micros=200 * CREDIT, free_sms_micros=50 * CREDIT)
    await api.plan("fa", "big", free_voice_micros=5000 * CREDIT, free_sms_micros=500 * CREDIT)
    await api.client("fc", "fa", "big")
    await api.client("fd", "fa", "fp", mode=common_pb2.BILLING_MODE_AGENCY_PAID)
    await api.client("fe", "fb", "fp")
    for client in ("gc", "gv"):
        await api.client(client, "ga", "fp")
    await api.topup("fc", 20 * CREDIT, "fund-fc")
    for account in ("ga", "gc", "fa", "fc"):  # enough SMS credits for every witness and storm
        await api.topup(account, 2000 * CREDIT, f"sms-{account}", balance_type=common_pb2.BALANCE_TYPE_SMS)
    keys = {}
    for name, role, account in (
        ("worker", account_pb2.ROLE_WORKER, "fa"),
        ("reader", account_pb2.ROLE_READER, "fc"),
        ("agency_admin", account_pb2.ROLE_AGENCY_ADMIN, "fa"),
    ):
        created = await api.accounts.CreateApiKey(
            account_pb2.CreateApiKeyRequest(role=role, account_id=account), metadata=api.metadata
        )
        keys[name] = created.secret
    await api.authorize("s-authorized", "fc")
    return keys


@pytest.fixture
async def fuzzed(make_server: ServerFactory) -> Any:
    # Long slices, time-to-live and grace: nothing changes a balance behind the test's back.
    async with make_server(
        slice_seconds=120, authorize_ttl_seconds=3600, grace_seconds=3600, renewal_lead_seconds=10
    ) as running:
        keys = await _setup(running.api)
        client = Client(running.app.address)
        for name, secret in keys.items():
            client.add_key(name, secret)
        client.add_key("garbage", "cdk_0123456789abcdef_not-a-key")
        try:
            yield running, client
        finally:
            client.close()


class GoodCall:
    """A long voice call on another agency, read in the background: it must see nothing but
    its first grant until it ends, and be billed exactly what it used."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.seen: list[str] = []

    async def start(self) -> None:
        assert (await self.api.authorize("good-call", "gv")).allowed
        self.call, first = await self.api.start_call("good-call", "gv")
        self.started = time.monotonic()
        self.seen.append(first.WhichOneof("msg"))
        self.reader = asyncio.ensure_future(self.call.read())

    async def finish(self) -> None:
        assert not self.reader.done(), f"the good call was disturbed: {self.reader.result()}"
        seconds = int(time.monotonic() - self.started)
        await self.call.write(metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=seconds)))
        final = await asyncio.wait_for(self.reader, 10)
        assert final.WhichOneof("msg") == "summary", final
        assert final.summary.billed_seconds == seconds
        assert self.seen == ["grant"]


def _in_thread(work: Callable[[], None]) -> Any:
    return asyncio.to_thread(work)


async def test_every_rpc_answers_random_requests_with_a_typed_error_or_a_normal_answer(fuzzed: Any) -> None:
    running, client = fuzzed
    good = GoodCall(running.api)
    await good.start()
    ran: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()

    def fuzz_all() -> None:
        for path, method in METHODS.items():
            if method.client_streaming:
                continue
            fuzz_method(path, method)

    def fuzz_method(path: str, method: pb_descriptor.MethodDescriptor) -> None:
        call = client.calls[path]
        known: dict[str, tuple[bytes, bytes]] | None = None

        @settings(
            max_examples=UNARY_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(request=requests_for(path, method), key=st.sampled_from(["admin"] * 4 + sorted(client.keys)))
        def case(request: Message, key: str) -> None:
            nonlocal known
            ran[path] += 1
            before = known or client.state()
            known = None
            try:
                if method.server_streaming:
                    responses = call(request, metadata=client.keys[key], timeout=0.3)
                    for count, _ in enumerate(responses):
                        if count >= 2:
                            responses.cancel()
                            break
                else:
                    call(request, metadata=client.keys[key], timeout=10)
            except grpc.RpcError as error:
                outcomes[error.code().name] += 1
                if method.server_streaming and error.code() in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.CANCELLED,
                ):
                    return  # a watch that was allowed and ran until the deadline
                _typed(error)
                known = client.state()  # the state after a failure is the next case's state before
                assert known == before, f"a failed {path} changed a balance or a ledger"
                return
            outcomes["OK"] += 1
            client.state()  # the server still answers

        case()

    await _in_thread(fuzz_all)
    await good.finish()
    total = sum(ran.values())
    print(f"\nfuzzed unary and server-streaming RPCs: {total} cases over {len(ran)} RPCs: {dict(outcomes)}")
    assert len(ran) == len([m for m in METHODS.values() if not m.client_streaming])


async def test_requests_that_are_no_valid_message_get_invalid_argument(fuzzed: Any) -> None:
    _, client = fuzzed
    ran = Counter[str]()

    def fuzz_all() -> None:
        for path in client.raw:
            fuzz_method(path)

    def fuzz_method(path: str) -> None:
        @settings(max_examples=RAW_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(
            payload=st.one_of(
                st.binary(min_size=1, max_size=200),
                st.just(b"\x0a\x02\xff\xfe"),  # field 1, a string that is not UTF-8
                st.just(b"\xff\xff\xff\xff"),
            )
        )
        def case(payload: bytes) -> None:
            ran[path] += 1
            before = client.state()
            try:
                if METHODS[path].client_streaming:
                    for _ in client.raw[path](iter([payload]), metadata=client.admin, timeout=5):
                        pass
                else:
                    client.raw[path](payload, metadata=client.admin, timeout=5)
            except grpc.RpcError as error:
                _typed(error)
                assert client.state() == before
                return
            # Random bytes can happen to be a valid message: then they got a normal answer.

        case()

    await _in_thread(fuzz_all)

    def not_utf8() -> grpc.RpcError:
        try:
            client.raw["/creditd.v1.LedgerService/Topup"](b"\x0a\x02\xff\xfe", metadata=client.admin, timeout=5)
        except grpc.RpcError as error:
            return error
        raise AssertionError("a string field that is not UTF-8 was accepted")

    error = await _in_thread(not_utf8)
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "MALFORMED_REQUEST"  # type: ignore[arg-type]
    print(f"\nraw-bytes cases: {sum(ran.values())} over {len(ran)} RPCs")


# -- StreamUsage --------------------------------------------------------------------------


def _start(session: str, client: str, channel: int = common_pb2.CHANNEL_VOICE) -> metering_pb2.StreamUsageRequest:
    return metering_pb2.StreamUsageRequest(
        start=metering_pb2.SessionStart(session_id=session, client_id=client, channel=channel)
    )


def _usage(seconds: int) -> metering_pb2.StreamUsageRequest:
    return metering_pb2.StreamUsageRequest(usage=metering_pb2.UsageReport(seconds_used=seconds))


def _end(seconds: int) -> metering_pb2.StreamUsageRequest:
    return metering_pb2.StreamUsageRequest(end=metering_pb2.SessionEnd(seconds_used=seconds))


def _sms(message_id: str, country: str = "US", segments: int = 1) -> metering_pb2.StreamUsageRequest:
    return metering_pb2.StreamUsageRequest(
        sms=metering_pb2.SmsSend(message_id=message_id, destination_country=country, segments=segments)
    )


_SECONDS = st.one_of(st.integers(-5, 200), st.sampled_from([2**63 - 1, -(2**63), 10**9]))
_SEGMENTS = st.one_of(st.integers(-5, 20), st.sampled_from([2**31 - 1, -(2**31), 10**6]))
_STREAM_MESSAGE = st.one_of(
    st.builds(
        _start,
        st.sampled_from(["s-authorized", "s-new", "nobody", ""]),
        st.sampled_from(["fc", "fd", "fe", "fa", "nobody", ""]),
        st.sampled_from([common_pb2.CHANNEL_VOICE, common_pb2.CHANNEL_SMS, 0, 9]),
    ),
    st.builds(_usage, _SECONDS),
    st.builds(_end, _SECONDS),
    st.builds(_sms, st.sampled_from(["m1", "m2", ""]), st.sampled_from(["US", "GB", "", "ZZ", "usa"]), _SEGMENTS),
    st.just(metering_pb2.StreamUsageRequest()),  # no oneof member at all
    messages(metering_pb2.StreamUsageRequest.DESCRIPTOR),
)


@st.composite
def _storm(draw: st.DrawFn) -> list[metering_pb2.StreamUsageRequest]:
    size = draw(st.integers(100, 400))
    kind = draw(st.sampled_from(["usage", "sms", "garbage", "starts"]))
    if kind == "usage":
        return [_start("s-new", "fc"), *[_usage(i) for i in range(size)]]
    if kind == "sms":
        return [_start("sms-storm", "fc", common_pb2.CHANNEL_SMS), *[_sms(f"m{i % 7}") for i in range(size)]]
    if kind == "starts":
        return [_start("s-new", "fc")] * size
    return [metering_pb2.StreamUsageRequest()] * size


@st.composite
def _plausible(draw: st.DrawFn) -> list[metering_pb2.StreamUsageRequest]:
    """A well-formed call or SMS session, sometimes with one bad message slipped in."""
    if draw(st.booleans()):
        reports = sorted(draw(st.lists(st.integers(0, 30), max_size=6)))
        stream = [_start("s-new", "fc"), *[_usage(r) for r in reports], _end(draw(st.integers(0, 40)))]
    else:
        texts = draw(st.lists(st.sampled_from(["m1", "m2", "m3"]), max_size=5))
        stream = [_start("sms-storm", "fc", common_pb2.CHANNEL_SMS), *[_sms(t) for t in texts], _end(0)]
    if draw(st.booleans()):
        stream.insert(draw(st.integers(0, len(stream))), draw(_STREAM_MESSAGE))
    return stream


STREAMS = st.one_of(st.lists(_STREAM_MESSAGE, max_size=8), _plausible(), _storm())


class GoodSms:
    """An SMS stream opened before a bad stream and used after it, on the same connection."""

    def __init__(self, client: Client, name: str) -> None:
        self.requests: queue.Queue[metering_pb2.StreamUsageRequest | None] = queue.Queue()
        self.responses = client.calls["/creditd.v1.MeteringService/StreamUsage"](
            iter(self.requests.get, None), metadata=client.admin, timeout=30
        )
        self.name = name
        self.requests.put(_start(name, "gc", common_pb2.CHANNEL_SMS))

    def finish(self) -> None:
        self.requests.put(_sms(f"{self.name}-m"))
        self.requests.put(_end(0))
        self.requests.put(None)
        answers = list(self.responses)
        assert [a.WhichOneof("msg") for a in answers] == ["sms_result", "summary"], answers
        assert answers[0].sms_result.allowed and answers[1].summary.messages_sent == 1


def _new_session(client: Client, name: str) -> None:
    authorize = client.calls["/creditd.v1.MeteringService/Authorize"]
    answer = authorize(
        metering_pb2.AuthorizeRequest(
            session_id=name, client_id="fc", channel=common_pb2.CHANNEL_VOICE, direction=common_pb2.DIRECTION_INBOUND
        ),
        metadata=client.admin,
        timeout=5,
    )
    assert answer.allowed


async def test_random_usage_streams_end_typed_and_disturb_nobody(fuzzed: Any) -> None:
    running, client = fuzzed
    good = GoodCall(running.api)
    await good.start()
    stream_usage = client.calls["/creditd.v1.MeteringService/StreamUsage"]
    counts: Counter[str] = Counter()
    numbers = iter(range(1_000_000))

    @settings(max_examples=STREAM_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(stream=STREAMS, key=st.sampled_from(["admin", "admin", "worker", "reader", "none"]))
    def case(stream: list[metering_pb2.StreamUsageRequest], key: str) -> None:
        n = next(numbers)
        counts["streams"] += 1
        counts["messages"] += len(stream)
        session = f"s-new-{n}"
        if any(r.WhichOneof("msg") == "start" and r.start.session_id == "s-new" for r in stream):
            _new_session(client, session)  # a fresh authorized session for this stream to start
        for request in stream:
            if request.WhichOneof("msg") == "start" and request.start.session_id == "s-new":
                request.start.session_id = session
            elif request.WhichOneof("msg") == "start" and request.start.session_id == "sms-storm":
                request.start.session_id = f"sms-storm-{n}"
        witness = GoodSms(client, f"good-{n}")
        before = client.state()
        answers: list[metering_pb2.StreamUsageResponse] = []
        try:
            for answer in stream_usage(iter(stream), metadata=client.keys[key], timeout=20):
                answers.append(answer)
        except grpc.RpcError as error:
            _typed(error)
            counts[f"error {error.code().name}"] += 1
        else:
            assert answers and answers[-1].WhichOneof("msg") in ("summary", "cutoff"), answers
            counts["normal end"] += 1
        effects = {"sms_result", "summary", "cutoff"}
        if not any(a.WhichOneof("msg") in effects for a in answers):
            assert client.state() == before, "a stream that did nothing changed a balance or a ledger"
        witness.finish()

    await _in_thread(case)
    await good.finish()
    print(f"\nfuzzed StreamUsage: {dict(counts)}")
    assert counts["streams"] >= STREAM_EXAMPLES // 2


BAD_STREAMS = [
    ("usage before start", [_usage(5)], "STREAM_NOT_STARTED"),
    ("end before start", [_end(5)], "STREAM_NOT_STARTED"),
    ("sms before start", [_sms("m")], "STREAM_NOT_STARTED"),
    ("two starts", [_start("{s}", "fc"), _start("{s}", "fc")], "STREAM_ALREADY_STARTED"),
    ("decreasing seconds", [_start("{s}", "fc"), _usage(10), _usage(9)], "INVALID_ARGUMENT"),
    ("negative seconds", [_start("{s}", "fc"), _usage(-1)], "INVALID_ARGUMENT"),
    ("sms on a voice stream", [_start("{s}", "fc"), _sms("m")], "INVALID_ARGUMENT"),
    ("usage on an sms stream", [_start("{s}-sms", "fc", common_pb2.CHANNEL_SMS), _usage(3)], "INVALID_ARGUMENT"),
    # The server ends the stream after the summary: a second end is never read, nothing is billed twice.
    ("end twice", [_start("{s}", "fc"), _end(2), _end(2)], None),
    ("empty message", [_start("{s}", "fc"), metering_pb2.StreamUsageRequest()], "INVALID_ARGUMENT"),
    ("closed without end", [_start("{s}", "fc")], "STREAM_NOT_ENDED"),
    ("nothing at all", [], "STREAM_NOT_STARTED"),
    ("unauthorized session", [_start("never-authorized", "fc")], "SESSION_NOT_AUTHORIZED"),
]


@pytest.mark.parametrize(("name", "stream", "reason"), BAD_STREAMS, ids=[b[0] for b in BAD_STREAMS])
async def test_each_protocol_violation_gets_its_own_reason(
    make_server: ServerFactory, name: str, stream: list[metering_pb2.StreamUsageRequest], reason: str | None
) -> None:
    async with make_server() as running:
        api = running.api
        await api.agency("fa")
        await api.plan("fa", "fp", free_voice_micros=100 * CREDIT, free_sms_micros=10 * CREDIT)
        await api.client("fc", "fa", "fp")
        await api.authorize("s1", "fc")
        client = Client(running.app.address)
        try:

            def run() -> tuple[list[str], grpc.RpcError | None]:
                requests = []
                for request in stream:
                    copy = metering_pb2.StreamUsageRequest()
                    copy.CopyFrom(request)
                    if copy.WhichOneof("msg") == "start":
                        copy.start.session_id = copy.start.session_id.replace("{s}", "s1")
                    requests.append(copy)
                seen: list[str] = []
                try:
                    for answer in client.calls["/creditd.v1.MeteringService/StreamUsage"](
                        iter(requests), metadata=client.admin, timeout=10
                    ):
                        seen.append(answer.WhichOneof("msg"))
                except grpc.RpcError as error:
                    return seen, error
                return seen, None

            before = await api.balance("fc")
            seen, error = await asyncio.to_thread(run)
            if reason is None:
                assert (error, seen) == (None, ["grant", "summary"])
                used = (await api.balance("fc")).voice.period_used_micros
                assert used == 2 * CREDIT // 60 + (1 if 2 * CREDIT % 60 else 0)  # 2 s at 1 credit/min, once
                return
            assert error is not None, f"{name}: the stream ended normally after {seen}"
            _typed(error)
            assert error_info(error).reason == reason  # type: ignore[arg-type]
            if not any(kind in ("summary", "cutoff") for kind in seen):
                assert (await api.balance("fc")) == before
        finally:
            client.close()

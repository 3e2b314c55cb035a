"""The hot store interface.

Each method is one atomic unit: the embedded store runs it without yielding to the event
loop, the Redis store runs it as one Lua script. Every balance change appends the ledger
entries, events and session states it implies to the store's outbox in the same atomic
step; a flusher moves them to the database in batches (see creditd.engine.durability).

Sessions are owned through the store, not by a process: every SessionStart claims the
session (`claim`), which raises its epoch; renewals and settlements carry the epoch of
the owner that sends them, and one whose epoch is no longer the session's fails with
SessionTakenOver, having changed nothing. So any replica can serve any call, and a
replica that lost a call to another can no longer renew or settle it.

A store that lost what it held (Redis restarted empty, a cluster shard came back empty)
never answers as if an account or a session did not exist: each agency's state carries a
marker, and an operation that finds neither the marker nor what it needs raises
StoreUnavailable until the state is rebuilt from the database.
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass, field

from creditd.domain.records import BalanceType, DenyReason, LedgerRecord, Record
from creditd.domain.tariff import SliceTerms
from creditd.domain.wallet import Constraint, WalletConfig, WalletState
from creditd.errors import CreditdError, FailedPrecondition, StoreUnavailable

log = logging.getLogger(__name__)


class SessionTakenOver(FailedPrecondition):
    """Another replica claimed the session since this one did: it serves the call now."""

    def __init__(self, session_id: str) -> None:
        super().__init__(
            "the session was resumed on another stream", "SESSION_RESUMED_ELSEWHERE", session_id=session_id
        )


def lost(agency_id: str) -> StoreUnavailable:
    return StoreUnavailable(
        "the hot store lost this agency's state and it is being rebuilt; try again",
        state="rebuilding",
        agency_id=agency_id,
    )


@dataclass(slots=True)
class Payer:
    """One account that pays for a voice slice, and the terms of its current price segment."""

    account_id: str
    terms: SliceTerms


@dataclass(slots=True)
class SessionOpen:
    """Present on the first reservation of a session: creates it and checks concurrency."""

    client_id: str
    channel: int
    direction: int
    provider: str
    max_concurrent: int  # 0: no cap
    authorized_until: float  # when the authorization is released if no SessionStart came


@dataclass(slots=True)
class ReserveRequest:
    session_id: str
    agency_id: str
    balance_type: BalanceType
    want_seconds: int
    payers: tuple[Payer, ...]
    now: float
    # Until when the session is known to be served: past it (grant, renewal margin and grace
    # included) any replica may settle the session at everything it was granted.
    lease_until: float
    open: SessionOpen | None = None
    epoch: int = 0  # a renewal: the epoch of the owner that sends it


@dataclass(slots=True)
class ReserveResult:
    granted_seconds: int  # seconds added by this call (0: nothing could be reserved)
    total_granted_seconds: int  # cumulative seconds granted to the session
    headroom_seconds: int | None  # seconds every payer could still pay for before this call
    limited_by: tuple[str, Constraint] | None = None  # the payer and rule that bound the slice
    concurrency_denied: bool = False
    reserved: dict[str, int] = field(default_factory=dict)  # cumulative per payer


@dataclass(slots=True)
class SettleRequest:
    session_id: str
    agency_id: str
    billed_seconds: int
    costs: dict[str, int]  # account id -> micro-credits owed for billed_seconds
    now: float
    cutoff_reason: int = 0
    epoch: int = 0  # the settling owner's; 0: whoever owns it (the rebuild, an expired lease)

    @classmethod
    def abandoned(cls, state: SessionState, now: float, epoch: int = 0) -> SettleRequest:
        """Settle a session that nobody serves any more (SESSION_ABANDONED). A call that was
        answered is billed its whole grant: nobody can prove how much of it was used, and it
        is exactly what was reserved, so no payer goes below zero. One that was authorized
        and never answered used nothing: it is released at 0 s."""
        answered = bool(state.started_at)
        return cls(
            session_id=state.session_id,
            agency_id=state.agency_id,
            billed_seconds=state.granted_seconds if answered else 0,
            costs=dict(state.reserved) if answered else dict.fromkeys(state.reserved, 0),
            now=now,
            cutoff_reason=int(DenyReason.SESSION_ABANDONED),
            epoch=epoch,
        )


@dataclass(slots=True)
class SettleResult:
    billed_seconds: int
    charged: dict[str, int]
    already_settled: bool
    cutoff_reason: int = 0


@dataclass(slots=True)
class SmsDebitRequest:
    message_id: str
    session_id: str
    agency_id: str
    client_id: str
    segments: int
    costs: dict[str, int]  # account id -> micro-credits, every payer of the message
    now: float
    destination_country: str  # recorded on the usage entries

    def parameters(self) -> str:
        """What makes a retry the same message: where it goes and how many segments."""
        return f"{self.destination_country}:{self.segments}"


def message_id_reused(request: SmsDebitRequest) -> FailedPrecondition:
    return FailedPrecondition(
        "message_id was already used with another destination_country or segments",
        "MESSAGE_ID_REUSED",
        message_id=request.message_id,
    )


@dataclass(slots=True)
class SmsDebitResult:
    allowed: bool
    charged: dict[str, int]
    limited_by: tuple[str, Constraint] | None = None
    duplicate: bool = False


@dataclass(slots=True)
class SessionState:
    session_id: str
    agency_id: str
    client_id: str
    channel: int
    direction: int
    provider: str
    status: str  # "open" or "settled"; what claim returns may also be "expired"
    granted_seconds: int
    reserved: dict[str, int]
    expires_at: float  # the lease: see ReserveRequest.lease_until
    billed_seconds: int = 0
    charged: dict[str, int] = field(default_factory=dict)
    cutoff_reason: int = 0
    epoch: int = 1
    authorized_until: float = 0.0
    started_at: float = 0.0  # wall time of the first SessionStart; 0: not answered yet
    tariffs: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # payer -> (start, rate)...


class HotStore(abc.ABC):
    """Balances and live reservations, shared by every replica that uses the same store."""

    # Agencies an operation found without their state (the store lost its data); the
    # health monitor has them rebuilt.
    lost: set[str]
    # Called with the agency when an operation finds its state gone (see `found_lost`):
    # the health monitor checks the store at once instead of at its next interval.
    loss_listeners: list[Callable[[str], None]]
    # Whether the store can lose the state of some agencies alone (a Redis Cluster's shard):
    # then the health monitor checks every agency's marker, not only the whole store's.
    sharded: bool = False

    def __init__(self) -> None:
        self.lost = set()
        self.loss_listeners = []

    def found_lost(self, agency_id: str) -> StoreUnavailable:
        """An operation found the agency's state gone (the store lost its data): note it,
        say so once in the log, tell the listeners, and return the error to raise
        (UNAVAILABLE: retryable, never a NOT_FOUND)."""
        if agency_id not in self.lost:
            self.lost.add(agency_id)
            log.warning(
                "the hot store lost the state of agency %s (Redis lost its data): it answers UNAVAILABLE"
                " until the state is rebuilt from the database",
                agency_id,
            )
            for listener in list(self.loss_listeners):
                listener(agency_id)
        return lost(agency_id)

    @abc.abstractmethod
    async def configure_wallet(
        self,
        agency_id: str,
        account_id: str,
        balance_type: BalanceType,
        config: WalletConfig,
        now: float,
        *,
        new_agency: bool = False,
    ) -> list[Record]:
        """Create the wallet or change its configuration. Returns records of a new period.

        `new_agency`: the wallet is the first of an agency being created, which marks the
        agency's state present; otherwise the agency must be there (StoreUnavailable)."""

    @abc.abstractmethod
    async def read_wallet(
        self, agency_id: str, account_id: str, balance_type: BalanceType, now: float
    ) -> WalletState | None:
        """The wallet as of `now` (a period that ended is rolled over first)."""

    @abc.abstractmethod
    async def reserve(self, request: ReserveRequest) -> ReserveResult:
        """Reserve up to want_seconds more on every payer at once: all the same seconds or none."""

    @abc.abstractmethod
    async def settle(self, request: SettleRequest) -> SettleResult:
        """Debit what was used, release the rest of the reservation. Exactly once per session."""

    async def reserve_many(self, requests: Sequence[ReserveRequest]) -> list[ReserveResult | CreditdError]:
        """`reserve` for each request, each its own atomic unit; a failure is returned in its
        request's place and fails nothing else."""
        results: list[ReserveResult | CreditdError] = []
        for request in requests:
            try:
                results.append(await self.reserve(request))
            except CreditdError as exc:
                results.append(exc)
        return results

    async def settle_many(self, requests: Sequence[SettleRequest]) -> list[SettleResult | CreditdError]:
        """`settle` for each request, as `reserve_many` does."""
        results: list[SettleResult | CreditdError] = []
        for request in requests:
            try:
                results.append(await self.settle(request))
            except CreditdError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    async def debit_sms(self, request: SmsDebitRequest) -> SmsDebitResult:
        """Debit one message on every payer at once, or deny it. Exactly once per message_id
        of the client: the same id again answers the first result, or MESSAGE_ID_REUSED
        (FailedPrecondition) if its country or segments differ."""

    @abc.abstractmethod
    async def apply_topup(self, agency_id: str, entry: LedgerRecord, now: float) -> WalletState:
        """Credit a durable top-up entry. Applying the same entry again changes nothing."""

    @abc.abstractmethod
    async def claim(
        self, agency_id: str, session_id: str, client_id: str, now: float, lease_until: float
    ) -> SessionState | None:
        """Serve the voice session from the caller (its epoch goes up; see the module doc).

        Returns the claimed session (status "open", with the new epoch and when it was
        answered: `now` on the first claim); a settled one as it is; status "expired" for
        an authorization never answered whose time is up (it is to be released, at its
        epoch); None if the client has no such session."""

    @abc.abstractmethod
    async def session(self, agency_id: str, session_id: str) -> SessionState | None: ...

    @abc.abstractmethod
    async def live_sessions(self, agency_id: str, skip: Collection[str] = ()) -> list[SessionState]:
        """Sessions of the agency and its clients that are not settled yet, less the ids in
        `skip` (not even read: a replica skips the sessions it serves itself)."""

    @abc.abstractmethod
    async def append_records(self, agency_id: str, records: list[Record]) -> None:
        """Add records that change no balance (an SMS cutoff event) to the outbox."""

    @abc.abstractmethod
    async def take_records(self, limit: int) -> list[tuple[str, Record]]:
        """Outbox records not yet acknowledged, oldest first, with their outbox ids."""

    @abc.abstractmethod
    async def ack_records(self, ids: list[str]) -> None:
        """Forget records the database now holds."""

    @abc.abstractmethod
    async def load(
        self,
        wallets: list[tuple[str, WalletState]],
        sessions: list[SessionState],
        applied_topups: Collection[tuple[str, str]] = (),
    ) -> None:
        """Replace everything held with state rebuilt from the database (agency id, wallet).

        `applied_topups` are the (agency id, entry id) of the top-ups the wallets already
        include, so that a retried Topup does not credit them a second time.
        """

    async def agencies_present(self, agency_ids: Sequence[str]) -> set[str]:
        """Those of the agencies whose state the store holds (a store that lost its data, or
        a cluster shard that came back empty, holds none of its agencies)."""
        return set(agency_ids)

    async def ping(self) -> bool | None:
        """Raise StoreUnavailable if unreachable; False if the store lost what it held."""
        return True

    def rebuild_lock(self) -> contextlib.AbstractAsyncContextManager[bool]:
        """Held by the one replica that rebuilds a lost store; yields False to the others,
        which wait for the store to be whole again."""
        return _always_mine()

    async def close(self) -> None:
        return None


@contextlib.asynccontextmanager
async def _always_mine() -> AsyncIterator[bool]:
    yield True

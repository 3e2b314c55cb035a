"""One balance (voice or SMS) of one account, and the rules that change it.

The embedded store applies these functions directly; the Redis scripts apply the same
rules to the same fields, so both stores agree to the micro-credit.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from creditd.domain.periods import period_bounds_epoch
from creditd.domain.records import (
    BalanceType,
    EntryKind,
    EventRecord,
    EventType,
    LedgerRecord,
    new_id,
)


class Constraint(enum.Enum):
    """Which rule stops a payer from paying more."""

    WALLET = "wallet"
    LIMIT = "limit"


@dataclass
class RefillSettings:
    enabled: bool = False
    threshold_micros: int = 0
    amount_micros: int = 0
    target_balance_micros: int = 0
    max_per_period: int = 0


@dataclass
class WalletConfig:
    """What an account's configuration says about one of its balances."""

    has_wallet: bool = True
    free_allowance_micros: int = 0
    usage_limit_micros: int = 0  # 0: none
    anchor_day: int = 1
    refill: RefillSettings | None = None
    low_balance_threshold_micros: int = 0  # 0: off


@dataclass
class WalletState:
    account_id: str
    balance_type: BalanceType
    config: WalletConfig
    period_start: int  # epoch seconds
    period_end: int
    free_micros: int = 0
    purchased_micros: int = 0
    reserved_micros: int = 0
    used_micros: int = 0
    refills_this_period: int = 0
    limit_notified: bool = False

    # -- reading -----------------------------------------------------------------------

    def wallet_available(self) -> int | None:
        if not self.config.has_wallet:
            return None
        return self.free_micros + self.purchased_micros - self.reserved_micros

    def limit_available(self) -> int | None:
        if self.config.usage_limit_micros <= 0:
            return None
        return self.config.usage_limit_micros - self.used_micros - self.reserved_micros

    def headroom(self) -> tuple[int | None, Constraint | None]:
        """What more this account can pay now, and the rule that sets it (None: no bound)."""
        bounds = [
            (value, constraint)
            for value, constraint in (
                (self.wallet_available(), Constraint.WALLET),
                (self.limit_available(), Constraint.LIMIT),
            )
            if value is not None
        ]
        if not bounds:
            return None, None
        value, constraint = min(bounds, key=lambda b: (b[0], b[1] is Constraint.WALLET))
        return max(0, value), constraint

    def available(self) -> int:
        """The figure shown to owners: what can still be spent (0 when unbounded and walletless)."""
        value, _ = self.headroom()
        return 0 if value is None else value

    def alert_level(self) -> int | None:
        """The balance that refill and low-balance thresholds are compared with."""
        return self.wallet_available() if self.config.has_wallet else self.limit_available()

    # -- changing ----------------------------------------------------------------------

    def roll_period(self, now: float) -> list[LedgerRecord | EventRecord]:
        """Start the period holding `now` if it is a new one: free credits reset, usage zeroed.

        Free credits still backing live reservations are carried (only as many as the
        reservations need beyond purchased credits and the new allowance), so a wallet
        never ends below zero when those sessions settle.
        """
        if now < self.period_end:
            return []
        start, end = period_bounds_epoch(now, self.config.anchor_day)
        records: list[LedgerRecord | EventRecord] = []
        allowance = self.config.free_allowance_micros if self.config.has_wallet else 0
        if self.config.has_wallet:
            needed = self.reserved_micros - self.purchased_micros - allowance
            carried = max(0, min(self.free_micros, needed))
            expired = self.free_micros - carried
            if expired:
                records.append(self._entry(EntryKind.FREE_EXPIRY, now, free=-expired))
                records.append(self._event(EventType.FREE_CREDITS_EXPIRED, now, amount=expired))
            if allowance:
                records.append(self._entry(EntryKind.FREE_ALLOWANCE, now, free=allowance))
            self.free_micros = carried + allowance
        self.period_start, self.period_end = start, end
        self.used_micros = 0
        self.refills_this_period = 0
        self.limit_notified = False
        return records

    def reserve(self, micros: int) -> None:
        self.reserved_micros += micros

    def settle(self, released_micros: int, cost_micros: int) -> tuple[int, int]:
        """Release a reservation and debit the actual cost, free credits first.

        Returns the (free, purchased) split of the debit. The cost never exceeds what was
        reserved, and a reservation is always backed, so no balance goes below zero.
        """
        if not 0 <= cost_micros <= released_micros <= self.reserved_micros:
            raise ValueError("settlement outside its reservation")
        self.reserved_micros -= released_micros
        return self.debit(cost_micros)

    def debit(self, cost_micros: int) -> tuple[int, int]:
        if not self.config.has_wallet:
            self.used_micros += cost_micros
            return 0, 0
        from_free = min(self.free_micros, cost_micros)
        from_purchased = cost_micros - from_free
        if from_purchased > self.purchased_micros:
            raise ValueError("debit beyond the wallet")
        self.used_micros += cost_micros
        self.free_micros -= from_free
        self.purchased_micros -= from_purchased
        return from_free, from_purchased

    def credit(self, micros: int, to_free: bool) -> None:
        if to_free:
            self.free_micros += micros
        else:
            self.purchased_micros += micros

    def alerts(self, before: int | None, now: float) -> list[EventRecord]:
        """Events for thresholds crossed downward since `before` (at most one each).

        A refill request carries a key built from the account, the balance, the period and
        the refill's number in it: the same crossing always yields the same key.
        """
        after = self.alert_level()
        if before is None or after is None:
            return []
        events: list[EventRecord] = []
        low = self.config.low_balance_threshold_micros
        if low > 0 and before >= low > after:
            events.append(self._event(EventType.LOW_BALANCE, now, amount=max(0, after)))
        refill = self.config.refill
        if (
            refill is not None
            and refill.enabled
            and refill.threshold_micros > 0
            and before >= refill.threshold_micros > after
            and self.refills_this_period < refill.max_per_period
        ):
            self.refills_this_period += 1
            amount = refill.amount_micros
            if refill.target_balance_micros > 0:
                amount = max(0, refill.target_balance_micros - max(0, after))
            key = refill_key(self.account_id, self.balance_type, self.period_start, self.refills_this_period)
            events.append(self._event(EventType.REFILL_REQUESTED, now, amount=amount, key=key))
        return events

    def limit_reached(self, now: float) -> list[EventRecord]:
        """One LIMIT_REACHED event per period, when the usage limit first stops this account."""
        if self.limit_notified:
            return []
        self.limit_notified = True
        return [self._event(EventType.LIMIT_REACHED, now, amount=self.config.usage_limit_micros)]

    # -- records -----------------------------------------------------------------------

    def _entry(self, kind: EntryKind, now: float, free: int = 0, purchased: int = 0) -> LedgerRecord:
        return LedgerRecord(
            entry_id=new_id(),
            account_id=self.account_id,
            balance_type=self.balance_type,
            kind=kind,
            amount_micros=free + purchased,
            free_micros=free,
            purchased_micros=purchased,
            usage_micros=0,
            created_at=now,
        )

    def _event(self, type_: EventType, now: float, amount: int = 0, key: str = "") -> EventRecord:
        return EventRecord(
            event_id=new_id(),
            account_id=self.account_id,
            type=type_,
            balance_type=self.balance_type,
            created_at=now,
            amount_micros=amount,
            idempotency_key=key,
        )


def refill_key(account_id: str, balance_type: BalanceType, period_start: int, number: int) -> str:
    return f"refill:{account_id}:{balance_type.name.lower()}:{period_start}:{number}"


def new_wallet(account_id: str, balance_type: BalanceType, config: WalletConfig, now: float) -> WalletState:
    """A wallet at the start of its first period, before its allowance is granted."""
    start, end = period_bounds_epoch(now, config.anchor_day)
    return WalletState(account_id, balance_type, config, period_start=start, period_end=end)

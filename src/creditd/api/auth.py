"""Who is calling (a bearer API key) and what that key may touch.

Roles: a platform admin reaches everything; an agency admin its agency, that agency's
plans and clients, and their top-ups; a worker meters and reads balances of its agency's
clients; a reader sees one account's balance, ledger and events.

A worker key meters and reads the agency's clients, not the agency's own account. What
only the platform does, even to an agency's own account: create agencies and
platform-admin keys, credit an agency's wallet (the agency buys its credits from the
platform) and change an agency's subscriptions.

Keys are cached in process for at most KEY_CACHE_SECONDS; a revocation reaches every
replica at once through the bus ("apikey:<key id>"), and the cache bound covers a
notification lost while the bus was away.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hmac
import logging
import time
from dataclasses import dataclass
from typing import Any

import grpc

from creditd.domain.accounts import Account, ApiKey, Role
from creditd.engine.accounts import hash_secret, key_id_of
from creditd.engine.context import Context
from creditd.errors import PermissionDenied, StoreUnavailable, Unauthenticated

log = logging.getLogger(__name__)
KEY_CACHE_SECONDS = 30.0


class Action(enum.Enum):
    METER = "meter"  # Authorize, StreamUsage
    READ = "read"  # balances, ledger, events, accounts, plans
    TOPUP = "topup"
    MANAGE = "manage"  # plans, clients, subscriptions, settings, keys of an agency
    PLATFORM = "platform"  # agencies, platform admin keys


_ALLOWED: dict[Role, frozenset[Action]] = {
    Role.PLATFORM_ADMIN: frozenset(Action),
    Role.AGENCY_ADMIN: frozenset({Action.METER, Action.READ, Action.TOPUP, Action.MANAGE}),
    Role.WORKER: frozenset({Action.METER, Action.READ}),
    Role.READER: frozenset({Action.READ}),
}


@dataclass(frozen=True)
class Principal:
    key_id: str
    role: Role
    account_id: str  # the agency (admins, workers) or the account (readers)

    def require(self, action: Action, account: Account | None = None, agency_id: str | None = None) -> None:
        """Raise PERMISSION_DENIED unless this key may do `action` on the account or agency."""
        if action not in _ALLOWED[self.role]:
            raise PermissionDenied(f"a {self.role.name.lower()} key may not do this", role=self.role.name)
        if self.role is Role.PLATFORM_ADMIN:
            return
        if self.role is Role.READER:
            if account is None or account.account_id != self.account_id:
                raise PermissionDenied("this key is scoped to another account", account_id=self.account_id)
            return
        target_agency = account.agency_id if account is not None else agency_id
        if target_agency != self.account_id:
            raise PermissionDenied("this key is scoped to another agency", agency_id=self.account_id)
        if self.role is Role.WORKER and account is not None and account.is_agency:
            raise PermissionDenied("a worker key reaches its agency's clients, not the agency itself")
        if action is Action.TOPUP and account is not None and account.is_agency:
            raise PermissionDenied("an agency's credits are bought from the platform", account_id=account.account_id)


class Authenticator:
    def __init__(self, ctx: Context, admin_token: str) -> None:
        self.ctx = ctx
        self._admin_digest = hash_secret(admin_token)
        self._keys: dict[str, tuple[ApiKey, float]] = {}  # key id -> key, monotonic time it was read
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Follow revocations made on any replica."""
        ready = asyncio.Event()
        self._watcher = asyncio.create_task(self._watch(ready), name="apikey-watch")
        await ready.wait()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self, ready: asyncio.Event) -> None:
        async with self.ctx.bus.subscribe(lambda channel: channel.startswith("apikey:")) as changes:
            ready.set()
            while True:
                self.forget((await changes.get()).partition(":")[2])

    def forget(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    async def _key(self, key_id: str) -> ApiKey | None:
        cached = self._keys.get(key_id)
        now = time.monotonic()
        if cached is not None and now - cached[1] < KEY_CACHE_SECONDS:
            return cached[0]
        try:
            key = await self.ctx.db.get_api_key(key_id)
        except StoreUnavailable:
            if cached is None:
                raise
            log.warning("database unavailable: API key %s checked against its cached copy", key_id)
            return cached[0]
        if key is None:  # unknown ids are not cached: guessing them must not fill memory
            self._keys.pop(key_id, None)
            return None
        self._keys[key_id] = (key, now)
        return key

    async def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
                token = value[7:].strip()
        if not token:
            raise Unauthenticated("send 'authorization: Bearer <key>' metadata")
        digest = hash_secret(token)  # once: compared with the bootstrap token's and the key's
        if hmac.compare_digest(digest, self._admin_digest):
            return Principal("bootstrap", Role.PLATFORM_ADMIN, "")
        key_id = key_id_of(token)
        key = await self._key(key_id) if key_id else None
        if key is None or key.revoked_at is not None or not hmac.compare_digest(digest, key.secret_sha256):
            raise Unauthenticated("the API key is unknown or revoked")
        return Principal(key.key_id, key.role, key.account_id)

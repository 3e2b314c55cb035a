"""Who is calling (a bearer API key) and what that key may touch.

Roles: a platform admin reaches everything; an agency admin its agency, that agency's
plans and clients, and their top-ups; a worker meters and reads balances of its agency's
clients; a reader sees one account's balance, ledger and events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import grpc

from creditd.domain.accounts import Account, ApiKey, Role
from creditd.engine.accounts import hash_secret, key_id_of, secrets_match
from creditd.engine.context import Context
from creditd.errors import PermissionDenied, Unauthenticated


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
        if self.role is Role.WORKER and action is Action.METER and account is not None and account.is_agency:
            raise PermissionDenied("workers meter clients, not agencies")


class Authenticator:
    def __init__(self, ctx: Context, admin_token: str) -> None:
        self.ctx = ctx
        self._admin_digest = hash_secret(admin_token)
        self._keys: dict[str, ApiKey] = {}

    def forget(self, key_id: str) -> None:
        self._keys.pop(key_id, None)

    async def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        token = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str) and value.lower().startswith("bearer "):
                token = value[7:].strip()
        if not token:
            raise Unauthenticated("send 'authorization: Bearer <key>' metadata")
        if secrets_match(token, self._admin_digest):
            return Principal("bootstrap", Role.PLATFORM_ADMIN, "")
        key_id = key_id_of(token)
        key = self._keys.get(key_id)
        if key is None and key_id:
            key = await self.ctx.db.get_api_key(key_id)
            if key is not None:  # unknown ids are not cached: guessing them must not fill memory
                self._keys[key_id] = key
        if key is None or key.revoked_at is not None or not secrets_match(token, key.secret_sha256):
            raise Unauthenticated("the API key is unknown or revoked")
        return Principal(key.key_id, key.role, key.account_id)

"""The tables between the domain's enums and the generated ones agree on every value."""

from __future__ import annotations

import enum
from typing import Any

import pytest
from creditd_client.v1 import account_pb2, common_pb2, ledger_pb2

from creditd.api import convert
from creditd.domain.accounts import AccountKind, BillingMode, Role
from creditd.domain.records import BalanceType, DenyReason, EntryKind, EventType, TopupKind

TABLES: list[tuple[dict[int, Any], type[enum.IntEnum], Any, str]] = [
    (convert.ACCOUNT_KINDS, AccountKind, common_pb2.AccountKind, "ACCOUNT_KIND_"),
    (convert.BILLING_MODES, BillingMode, common_pb2.BillingMode, "BILLING_MODE_"),
    (convert.BALANCE_TYPES, BalanceType, common_pb2.BalanceType, "BALANCE_TYPE_"),
    (convert.DENY_REASONS, DenyReason, common_pb2.DenyReason, "DENY_REASON_"),
    (convert.ENTRY_KINDS, EntryKind, ledger_pb2.LedgerEntryKind, "LEDGER_ENTRY_KIND_"),
    (convert.TOPUP_KINDS, TopupKind, ledger_pb2.TopupKind, "TOPUP_KIND_"),
    (convert.EVENT_TYPES, EventType, ledger_pb2.EventType, "EVENT_TYPE_"),
    (convert.ROLES, Role, account_pb2.Role, "ROLE_"),
]


@pytest.mark.parametrize(("table", "domain", "proto", "prefix"), TABLES, ids=[t[3].rstrip("_") for t in TABLES])
def test_each_domain_value_has_the_generated_value_of_its_name(
    table: dict[int, Any], domain: type[enum.IntEnum], proto: Any, prefix: str
) -> None:
    for member in domain:
        name = "UNSPECIFIED" if member.name == "NONE" else member.name
        assert table[member] == proto.Value(prefix + name) == member.value
    # ... and the API has no value the domain lacks (UNSPECIFIED aside).
    assert set(table.values()) | {0} == set(proto.values())

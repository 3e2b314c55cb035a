"""The client ships its own copy of the creditd.v1 stubs: it must equal the server's, file by file."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
CLIENT_STUBS = ROOT / "clients" / "python" / "src" / "creditd_client" / "v1"
SERVER_STUBS = ROOT / "src" / "creditd" / "v1"


def _files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir()) if p.is_file() and p.suffix in (".py", ".pyi")}


def test_client_stubs_equal_the_server_stubs_file_by_file() -> None:
    client, server = _files(CLIENT_STUBS), _files(SERVER_STUBS)
    assert set(client) == set(server), "run `python scripts/genproto.py clients/python/src/creditd_client/v1`"
    stale = [name for name in sorted(server) if client[name] != server[name]]
    assert not stale, f"run `python scripts/genproto.py clients/python/src/creditd_client/v1`: {stale} differ"


def test_both_copies_load_in_one_process_and_speak_the_same_wire_format() -> None:
    from creditd.v1 import ledger_pb2 as server_ledger

    from creditd_client.v1 import ledger_pb2 as client_ledger

    request = client_ledger.TopupRequest(account_id="a", amount_micros=166_000, idempotency_key="k")
    parsed = server_ledger.TopupRequest.FromString(request.SerializeToString())
    assert parsed.amount_micros == 166_000 and parsed.idempotency_key == "k"

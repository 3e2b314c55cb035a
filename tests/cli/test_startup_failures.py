"""Operator mistakes at start-up: the command exits non-zero within 10 s with one line that
names the cause (no traceback), whatever the mistake."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from creditd.startup import StartupFailed, check_listen
from tests import services
from tests.cli.test_serve import Serve

DEADLINE_SECONDS = 10


def creditd(home: Path, *args: str, **env: str) -> tuple[int, list[str]]:
    """Run `creditd ARGS`; its exit code and the non-empty lines it printed (both streams)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITD_", "OTEL_"))}
    environ.update({"HOME": str(home), "CREDITD_LISTEN": "127.0.0.1:0", **env})
    done = subprocess.run(
        [sys.executable, "-m", "creditd.cli", *args],
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEADLINE_SECONDS,
    )
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return done.returncode, lines


def one_line(home: Path, *args: str, **env: str) -> str:
    code, lines = creditd(home, *args, **env)
    assert code != 0, lines
    assert len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith("creditd: ") and "Traceback" not in lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def stores(postgres_template: str) -> Iterator[dict[str, str]]:
    """A migrated Postgres database and a Redis prefix of this test."""
    with services.redis_and_postgres(postgres_template) as settings:
        yield {f"CREDITD_{name.upper()}": value for name, value in settings.items()}


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = services.create_database()
    yield services.postgres_url(name)
    services.drop_database(name)


# -- the listening address -----------------------------------------------------------------


def test_a_port_in_use_is_one_line_also_with_redis_and_postgres(tmp_path: Path, stores: dict[str, str]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        line = one_line(tmp_path, "serve", **stores, CREDITD_LISTEN=address)
    assert f"cannot listen on {address}: the port is in use" in line
    assert "CREDITD_LISTEN" in line


def test_a_port_shared_with_so_reuseport_is_free_to_a_process_that_shares_it() -> None:
    with socket.socket() as holder:  # another `creditd serve --reuse-port true`
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        with pytest.raises(StartupFailed, match="the port is in use"):
            check_listen(address)
        check_listen(address, reuse_port=True)


def test_an_address_of_another_machine_is_one_line(tmp_path: Path) -> None:
    line = one_line(tmp_path, "serve", CREDITD_LISTEN="192.0.2.1:50051")  # TEST-NET-1: never local
    assert "cannot listen on 192.0.2.1:50051: that is not an address of this machine" in line


# -- the database --------------------------------------------------------------------------


def test_a_database_never_migrated_says_to_run_migrate(tmp_path: Path, empty_database: str) -> None:
    line = one_line(tmp_path, "serve", CREDITD_DATABASE_URL=empty_database)
    assert "holds no creditd schema: run `creditd migrate` first" in line


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        (services.postgres_url("creditd_no_such_database"), 'database "creditd_no_such_database" does not exist'),
        (
            make_url(services.postgres_url("postgres")).set(username="creditd_no_such_user").render_as_string(False),
            'role "creditd_no_such_user" does not exist',
        ),
        (f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/creditd", "Connection refused"),
        ("postgresql+psycopg://postgres@no-such-host.invalid/creditd", "failed to resolve host 'no-such-host.invalid'"),
    ],
    ids=["missing-database", "unknown-user", "closed-port", "unknown-host"],
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_database_that_cannot_be_used_is_one_line(tmp_path: Path, command: str, url: str, cause: str) -> None:
    line = one_line(tmp_path, command, CREDITD_DATABASE_URL=url)
    assert "cannot use the database" in line and cause in line
    assert "CREDITD_DATABASE_URL" in line


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_unparsable_database_url_names_its_variable(tmp_path: Path, command: str) -> None:
    line = one_line(tmp_path, command, CREDITD_DATABASE_URL="db.internal/creditd")
    assert "CREDITD_DATABASE_URL (--database-url) is not a database URL" in line


def test_a_database_url_creditd_cannot_run_on_names_the_drivers_it_can(tmp_path: Path) -> None:
    line = one_line(tmp_path, "serve", "--database-url", "mysql://creditd@db/creditd")
    assert "uses mysql://" in line and "postgresql+psycopg://" in line


def test_a_second_server_on_the_same_embedded_database_is_refused(tmp_path: Path) -> None:
    first = Serve(tmp_path, CREDITD_LISTEN="127.0.0.1:0")
    try:
        line = one_line(tmp_path, "serve")
        assert f"is in use by another creditd serve (pid {first.process.pid})" in line
    finally:
        assert first.stop() == 0


# -- Redis ---------------------------------------------------------------------------------


def test_a_redis_url_without_scheme_names_its_variable(tmp_path: Path) -> None:
    line = one_line(tmp_path, "serve", CREDITD_REDIS_URL="127.0.0.1:6379")
    assert "CREDITD_REDIS_URL (--redis-url) must start with redis://" in line


def test_redis_on_a_closed_port_is_one_line(tmp_path: Path, stores: dict[str, str]) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    line = one_line(tmp_path, "serve", **{**stores, "CREDITD_REDIS_URL": url})
    assert f"cannot reach Redis at {url}" in line and "Connection refused" in line


# -- TLS -----------------------------------------------------------------------------------


def test_a_missing_tls_file_names_its_variable(tmp_path: Path, stores: dict[str, str]) -> None:
    missing, key = tmp_path / "server.pem", tmp_path / "server.key"
    key.write_text("")
    line = one_line(tmp_path, "serve", **stores, CREDITD_TLS_CERT=str(missing), CREDITD_TLS_KEY=str(key))
    assert f"CREDITD_TLS_CERT (--tls-cert) names no file: {missing}" in line


def test_each_bad_setting_gets_its_line(tmp_path: Path) -> None:
    code, lines = creditd(tmp_path, "serve", CREDITD_TLS_CLIENT_CA="/nonexistent/ca.pem", CREDITD_SLICE_SECONDS="x")
    assert code == 2
    assert lines == [
        "creditd: CREDITD_SLICE_SECONDS (--slice-seconds) must be a whole number (got 'x')",
        "creditd: CREDITD_TLS_CLIENT_CA (--tls-client-ca) names no file: /nonexistent/ca.pem",
    ]


def test_a_tls_file_that_is_not_pem_is_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "server.pem"
    garbage.write_text("not a certificate\n")
    line = one_line(tmp_path, "serve", CREDITD_TLS_CERT=str(garbage), CREDITD_TLS_KEY=str(garbage))
    assert f"cannot use {garbage} with {garbage}: not PEM" in line


# -- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CREDITD_SLICE_SECONDS", "abc", "CREDITD_SLICE_SECONDS (--slice-seconds) must be a whole number (got 'abc')"),
        ("CREDITD_SLICE_SECONDS", "0", "CREDITD_SLICE_SECONDS (--slice-seconds) must be at least 1"),
        ("CREDITD_DRAIN_SECONDS", "soon", "CREDITD_DRAIN_SECONDS (--drain-seconds) must be a finite number"),
        ("CREDITD_MAX_MESSAGE_BYTES", "12", "CREDITD_MAX_MESSAGE_BYTES (--max-message-bytes) must be at least 1024"),
        ("CREDITD_LOG_LEVEL", "loud", "CREDITD_LOG_LEVEL (--log-level) must be one of 'debug'"),
    ],
)
def test_a_bad_setting_names_its_variable_and_flag(tmp_path: Path, variable: str, value: str, message: str) -> None:
    assert message in one_line(tmp_path, "serve", **{variable: value})


def test_a_bad_flag_is_named_like_its_variable(tmp_path: Path) -> None:
    line = one_line(tmp_path, "serve", "--slice-seconds", "1.5")
    assert "CREDITD_SLICE_SECONDS (--slice-seconds) must be a whole number (got '1.5')" in line

"""What `creditd serve` checks before it starts, and one line for each way a start can fail.

An operator's mistake (a port in use, a database that is missing or not migrated, a Redis
that does not answer) ends the command at once with one line saying what is wrong and what
to do; the traceback is logged at debug level only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from creditd.config import Settings, flag, host_port, variable
from creditd.db.migrate import schema_problem
from creditd.errors import CreditdError

DEBUG_HINT = "(CREDITD_LOG_LEVEL=debug shows the traceback)"


class StartupFailed(Exception):
    """A start that cannot succeed; the message is the one line to print."""


def shown(url: str) -> str:
    """A URL as it may be printed: without its password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(unparsable URL)"


def _setting(name: str) -> str:
    return f"{variable(name)}, {flag(name)}"


# -- the embedded database belongs to one server ------------------------------------------


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite database URL (None for other databases and in-memory ones)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser().resolve()


@contextlib.contextmanager
def embedded_database_lock(settings: Settings) -> Iterator[None]:
    """Hold the embedded database for this process. Two servers each with its own in-process
    hot store on one SQLite file would each keep their own balances, silently diverging."""
    path = sqlite_path(settings.database_url)
    if path is None or settings.redis_url:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StartupFailed(
                f"{path} is in use by another creditd serve (pid {holder}); stop it, "
                f"or give this one its own database ({_setting('database_url')})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# -- checks before anything starts ---------------------------------------------------------


def check_listen(listen: str, reuse_port: bool = False) -> None:
    """Fail now, with a reason, where gRPC would fail to bind (beside other processes that
    listen with SO_REUSEPORT on the same port, when `reuse_port`)."""
    host, port = host_port(listen, variable("listen"))
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        raise StartupFailed(
            f"cannot listen on {listen}: unknown host {host!r}; use an address of this machine ({_setting('listen')})"
        ) from None
    failure: OSError | None = None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind(address)
                return
            except OSError as exc:
                failure = exc
    raise StartupFailed(_listen_failure(listen, failure))


def _listen_failure(listen: str, exc: OSError | None) -> str:
    code = exc.errno if exc is not None else None
    if code == errno.EADDRINUSE:
        reason = "the port is in use (another creditd?); stop what holds it or listen elsewhere"
    elif code == errno.EADDRNOTAVAIL:
        reason = "that is not an address of this machine"
    elif code == errno.EACCES:
        reason = "permission denied (ports below 1024 need privileges)"
    else:
        reason = exc.strerror if exc is not None and exc.strerror else "gRPC could not bind it"
    return f"cannot listen on {listen}: {reason} ({_setting('listen')})"


def check_database(url: str) -> None:
    """A server database (not the embedded one, migrated at start) answers and is migrated."""
    if sqlite_path(url) is not None:
        return
    try:
        problem = schema_problem(url)
    except sa.exc.DBAPIError as exc:
        raise StartupFailed(database_failure(url, exc)) from exc
    if problem:
        raise StartupFailed(f"the database {shown(url)} {problem}")


def check_redis(url: str) -> None:
    if not url:
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StartupFailed(redis_failure(url, exc)) from exc
    finally:
        client.close()


def check_tls(settings: Settings) -> None:
    """The certificate, its key and the client CA are PEM files that belong together."""
    if not settings.tls_cert:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise StartupFailed(
            f"cannot use {settings.tls_cert} with {settings.tls_key}: {_ssl_reason(exc)}; they must be a PEM "
            f"certificate chain and its private key ({_setting('tls_cert')}; {_setting('tls_key')})"
        ) from exc
    if settings.tls_client_ca:
        try:
            context.load_verify_locations(settings.tls_client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise StartupFailed(
                f"cannot use {settings.tls_client_ca} as client CA: {_ssl_reason(exc)}; it must hold PEM "
                f"certificates ({_setting('tls_client_ca')})"
            ) from exc


def _ssl_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        if exc.reason is None or exc.reason == "PEM_lib":  # what OpenSSL says of a file that is not PEM
            return "not PEM"
        return str(exc.reason).lower().replace("_", " ")
    return str(getattr(exc, "strerror", None) or exc)


def preflight(settings: Settings) -> None:
    check_tls(settings)
    check_listen(settings.listen, settings.reuse_port)
    check_database(settings.database_url)
    check_redis(settings.redis_url)


# -- one line per failure ------------------------------------------------------------------


def database_failure(url: str, exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    reason = text.rpartition(" failed: ")[2].replace("FATAL:", "").strip() or text
    lowered = reason.lower()
    if "database" in lowered and "does not exist" in lowered:
        hint = "create it, then run `creditd migrate`"
    elif "role" in lowered or "password" in lowered or "authentication" in lowered:
        hint = "check the user and password in the URL"
    elif "connection refused" in lowered:
        hint = "is PostgreSQL running there?"
    elif "resolve host" in lowered:
        hint = "check the host name"
    elif "timeout" in lowered:
        hint = "no answer in time: check the host, the port and the network"
    elif "relation" in lowered and "does not exist" in lowered:
        hint = "the schema is missing: run `creditd migrate` first"
    else:
        hint = "check the URL"
    return f"cannot use the database {shown(url)}: {reason}; {hint} ({_setting('database_url')})"


def redis_failure(url: str, exc: BaseException) -> str:
    reason = str(exc).strip().rstrip(".") or type(exc).__name__
    if isinstance(exc, redis.AuthenticationError) or "NOAUTH" in reason or "WRONGPASS" in reason:
        hint = "check the password in the URL"
    else:
        hint = "is Redis running there?"
    return f"cannot reach Redis at {shown(url)}: {reason}; {hint} ({_setting('redis_url')})"


def _cause(exc: BaseException) -> BaseException:
    """The driver's error under creditd's own StoreUnavailable."""
    while isinstance(exc, CreditdError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def explain(exc: BaseException, settings: Settings) -> str:
    """The one line for a command that failed with `exc`."""
    cause = _cause(exc)
    if isinstance(exc, StartupFailed):
        return str(exc)
    if isinstance(cause, sa.exc.DBAPIError):
        return database_failure(settings.database_url, cause)
    if isinstance(cause, redis.RedisError):
        return redis_failure(settings.redis_url, cause)
    if isinstance(cause, OSError) and cause.filename:
        return f"cannot read {cause.filename}: {cause.strerror}"
    if isinstance(cause, RuntimeError) and "Failed to bind" in str(cause):
        return _listen_failure(settings.listen, None)
    if isinstance(exc, CreditdError):
        return exc.message
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first} {DEBUG_HINT}"

"""creditd errors as gRPC statuses carrying one google.rpc.ErrorInfo (domain "creditd"), and
the decorators that put every handler behind the edge checks of creditd.api.limits."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from creditd.api import limits
from creditd.errors import CreditdError, InvalidArgument, StoreUnavailable

log = logging.getLogger(__name__)
DOMAIN = "creditd"
T = TypeVar("T")
# A status travels in the trailers, which a default client accepts up to 8 KiB in all: the
# message (percent-encoded there, and again in the details) and each metadata value are cut.
MAX_MESSAGE_BYTES = 512
MAX_METADATA_VALUE_BYTES = 128


class MalformedRequest(InvalidArgument):
    """The bytes of a request are not a valid protobuf message of the method's type."""

    reason = "MALFORMED_REQUEST"


class Malformed:
    """What a request that cannot be parsed turns into (instead of an UNKNOWN status): the
    handler of a stream raises its `error` when it reads one."""

    __slots__ = ("detail",)

    def __init__(self, detail: str) -> None:
        self.detail = detail

    def error(self, method: str) -> MalformedRequest:
        return MalformedRequest(f"the request is not a valid message for {method}", "request", method=method)


def lenient(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that answers Malformed instead of raising."""
    if parse is None:
        return None

    def parse_or_mark(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return Malformed(type(exc).__name__)

    return parse_or_mark


def _cut(text: str, limit: int) -> str:
    raw = text.encode()
    return text if len(raw) <= limit else raw[: limit - 3].decode(errors="ignore") + "..."


def to_status(error: CreditdError) -> grpc.Status:
    metadata = {key: _cut(value, MAX_METADATA_VALUE_BYTES) for key, value in error.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    message = _cut(error.message, MAX_MESSAGE_BYTES)
    status = status_pb2.Status(code=getattr(code_pb2, error.code), message=message, details=[detail])
    return rpc_status.to_status(status)


def as_creditd_error(exc: BaseException) -> CreditdError:
    if isinstance(exc, CreditdError):
        return exc
    if _is_outage(exc):
        return StoreUnavailable("a store is unavailable; nothing was changed", cause=type(exc).__name__)
    log.exception("unexpected error", exc_info=exc)
    return CreditdError("internal error")


def _is_outage(exc: BaseException) -> bool:
    """A store that cannot be reached, as opposed to a statement it refused (a bug)."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
    return isinstance(exc, OSError | ConnectionError) or type(exc).__module__.startswith("redis")


def reject(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """End the call with the error's status once its handler returns.

    Not `context.abort()`: the AbortError it raises is kept by the call's state while its
    traceback keeps the handler's frames, which hold the call's context, which holds the
    call's state. That cycle, the whole call with it, waits for a garbage collection (and
    is never freed if the collector froze it meanwhile: creditd.gc_tuning)."""
    status = to_status(as_creditd_error(exc))
    context.set_trailing_metadata(status.trailing_metadata)
    context.set_code(status.code)
    context.set_details(status.details)


def unary(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]]:
    """Check the request against its limits, then run the handler; errors become rich statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            limits.check(request)
            return await fn(self, request, context)
        except Exception as exc:
            reject(context, exc)
            return cast(T, None)  # gRPC sends no message with a failed status

    return wrapper


def streaming(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[T]]:
    """The same for handlers that answer with a stream."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[T]:
        try:
            limits.check(request)
            async for item in fn(self, request, context):
                yield item
        except Exception as exc:
            reject(context, exc)

    return wrapper

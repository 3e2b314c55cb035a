"""creditd errors as gRPC statuses carrying one google.rpc.ErrorInfo (domain "creditd")."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from sqlalchemy.exc import DBAPIError

from creditd.errors import CreditdError, InvalidArgument, StoreUnavailable

log = logging.getLogger(__name__)
DOMAIN = "creditd"
T = TypeVar("T")


class MalformedRequest(InvalidArgument):
    """The bytes of a request are not a valid protobuf message of the method's type."""

    reason = "MALFORMED_REQUEST"


def to_status(error: CreditdError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=getattr(code_pb2, error.code), message=error.message, details=[detail])
    return rpc_status.to_status(status)


def as_creditd_error(exc: BaseException) -> CreditdError:
    if isinstance(exc, CreditdError):
        return exc
    if isinstance(exc, DBAPIError | OSError | ConnectionError) or type(exc).__module__.startswith("redis"):
        return StoreUnavailable("a store is unavailable; nothing was changed", cause=type(exc).__name__)
    log.exception("unexpected error", exc_info=exc)
    return CreditdError("internal error")


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    await context.abort_with_status(to_status(as_creditd_error(exc)))


def unary(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]]:
    """Turn creditd errors raised by a unary handler into rich statuses."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        try:
            return await fn(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from exc

    return wrapper


def streaming(
    fn: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[T]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[T]]:
    """The same for handlers that answer with a stream."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[T]:
        try:
            async for item in fn(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)

    return wrapper

"""One exception tree for everything the client raises.

A failed call becomes the subclass of `CreditdError` for its gRPC status code, built from
the `google.rpc.ErrorInfo` that creditd puts in the status details (`reason`, `metadata`).
`Denied` and `SessionClosed` are not gRPC errors: they are raised by the client when an
authorization was refused or a stream has ended.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "creditd"
_DETAILS_KEY = "grpc-status-details-bin"


class CreditdError(Exception):
    """A creditd failure: the gRPC `code`, the ErrorInfo `reason`, a `message` and `metadata`."""

    def __init__(
        self,
        code: grpc.StatusCode | None,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{reason}: {message}" if message else reason)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.attempts = 1  # how many times the call was tried before this error

    def __repr__(self) -> str:
        code = self.code.name if self.code is not None else None
        return f"{type(self).__name__}(code={code}, reason={self.reason!r}, message={self.message!r})"


class InvalidArgument(CreditdError):
    """The request was malformed; `metadata["field"]` names the offending field."""


class NotFound(CreditdError):
    """An account, plan, key or session does not exist (reason ACCOUNT_NOT_FOUND, ...)."""


class AlreadyExists(CreditdError):
    """Something with this id exists already."""


class FailedPrecondition(CreditdError):
    """The request is valid but not now (IDEMPOTENCY_KEY_REUSED, SESSION_NOT_AUTHORIZED, ...)."""


class Unauthenticated(CreditdError):
    """No API key, or one that is unknown or revoked."""


class PermissionDenied(CreditdError):
    """The API key may not do this, or not to this account."""


class Unavailable(CreditdError):
    """The server or one of its stores cannot be reached; nothing was changed."""


class DeadlineExceeded(CreditdError):
    """The call did not finish before its deadline."""


class Denied(CreditdError):
    """An authorization was refused: `reason` is the DenyReason name (not a gRPC error)."""

    def __init__(self, reason: str, authorization: Any = None) -> None:
        super().__init__(None, reason, "not allowed")
        self.authorization = authorization


class SessionClosed(CreditdError):
    """The voice session or SMS sender has ended; `reason` says why (a DenyReason name or ENDED)."""

    def __init__(self, reason: str, message: str = "the session has ended") -> None:
        super().__init__(None, reason, message)


_BY_CODE: dict[grpc.StatusCode, type[CreditdError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


def error_info(trailing_metadata: Any) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in a `grpc-status-details-bin` trailer, if there is one."""
    for key, value in trailing_metadata or ():
        if key != _DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except Exception:  # a malformed trailer is no reason to hide the status code
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
                return info
    return None


def from_rpc_error(error: grpc.RpcError) -> CreditdError:
    """The typed error of a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message: str = (error.details() if hasattr(error, "details") else "") or ""
    info = error_info(error.trailing_metadata() if hasattr(error, "trailing_metadata") else None)
    reason = info.reason if info is not None and info.reason else code.name
    metadata = dict(info.metadata) if info is not None else {}
    cls = _BY_CODE.get(code, CreditdError)
    result = cls(code, reason, message, metadata)
    result.__cause__ = error
    return result


def retryable(error: CreditdError) -> bool:
    """Only UNAVAILABLE is retried: the server did not change anything."""
    return error.code is grpc.StatusCode.UNAVAILABLE

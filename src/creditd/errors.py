"""The one exception tree of creditd. Each error names its gRPC status code and a reason."""

from __future__ import annotations

QUOTE_LENGTH = 32  # characters of a caller's value an error message may repeat


def quote(value: str, limit: int = QUOTE_LENGTH) -> str:
    """A caller's value for an error message: at most `limit` characters of it, in ASCII."""
    if len(value) <= limit:
        return ascii(value)
    return f"{value[:limit]!a}... ({len(value)} characters)"


class CreditdError(Exception):
    """Base of every error creditd raises on purpose."""

    code = "INTERNAL"  # name of a grpc.StatusCode
    reason = "INTERNAL"  # UPPER_SNAKE reason of the google.rpc.ErrorInfo

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidArgument(CreditdError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(self, message: str, field: str, **metadata: object) -> None:
        super().__init__(message, field=field, **metadata)


class NotFound(CreditdError):
    code = "NOT_FOUND"
    reason = "NOT_FOUND"

    def __init__(self, message: str, reason: str = "NOT_FOUND", **metadata: object) -> None:
        super().__init__(message, **metadata)
        self.reason = reason


class AlreadyExists(CreditdError):
    code = "ALREADY_EXISTS"
    reason = "ALREADY_EXISTS"


class FailedPrecondition(CreditdError):
    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, reason: str, **metadata: object) -> None:
        super().__init__(message, **metadata)
        self.reason = reason


class Unauthenticated(CreditdError):
    code = "UNAUTHENTICATED"
    reason = "INVALID_CREDENTIALS"


class PermissionDenied(CreditdError):
    code = "PERMISSION_DENIED"
    reason = "PERMISSION_DENIED"


class Unavailable(CreditdError):
    code = "UNAVAILABLE"
    reason = "UNAVAILABLE"


class StoreUnavailable(Unavailable):
    """The hot store or the database cannot be reached; nothing was changed or granted."""

    reason = "STORE_UNAVAILABLE"

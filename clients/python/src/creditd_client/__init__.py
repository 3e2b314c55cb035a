"""Python client for creditd, the credit authorization and metering sidecar.

- `creditd_client.Client`: blocking client (billing services, scripts, creditctl).
- `creditd_client.aio.Client`: asyncio client, with `voice_session()` and `sms_sender()`.
- `creditd_client.errors`: the exception tree (`CreditdError` and one subclass per status).
"""

from importlib import metadata

from creditd_client import aio
from creditd_client.client import Client
from creditd_client.credits import MICROS_PER_CREDIT, format_credits, to_micros
from creditd_client.errors import (
    AlreadyExists,
    CreditdError,
    DeadlineExceeded,
    Denied,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    SessionClosed,
    Unauthenticated,
    Unavailable,
)
from creditd_client.options import Options, RetryPolicy
from creditd_client.sms import SmsSender
from creditd_client.types import (
    Authorization,
    Balance,
    Balances,
    Cutoff,
    Event,
    Grant,
    LowCreditWarning,
    SessionSummary,
    SmsResult,
    TopupResult,
)
from creditd_client.voice import VoiceSession

__version__ = metadata.version("creditd-client")  # written once, in pyproject.toml
__all__ = [
    "MICROS_PER_CREDIT",
    "AlreadyExists",
    "Authorization",
    "Balance",
    "Balances",
    "Client",
    "CreditdError",
    "Cutoff",
    "DeadlineExceeded",
    "Denied",
    "Event",
    "FailedPrecondition",
    "Grant",
    "InvalidArgument",
    "LowCreditWarning",
    "NotFound",
    "Options",
    "PermissionDenied",
    "RetryPolicy",
    "SessionClosed",
    "SessionSummary",
    "SmsResult",
    "SmsSender",
    "TopupResult",
    "Unauthenticated",
    "Unavailable",
    "VoiceSession",
    "aio",
    "format_credits",
    "to_micros",
]

"""Connection options shared by the sync and asyncio clients: deadlines and retries."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from creditd_client.errors import CreditdError

DEFAULT_ADDRESS = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 5.0

# Reconnect quickly after the server comes back (gRPC's default waits up to 2 minutes).
DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

OnRetry = Callable[[str, int, CreditdError, float], None]
"""Called before each retry with the method, the attempt that failed (1-based), its error, the delay."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for UNAVAILABLE only and only on calls that are safe to repeat.

    Retried: reads, `Topup` (same idempotency key) and `Authorize` (idempotent by session_id).
    Never retried: account changes and the messages of a usage stream. All attempts of one call
    share its deadline; a retry that would not start before the deadline is not made.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5  # each delay is drawn from [(1 - jitter) * d, d]

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1 or not 0 <= self.jitter <= 1:
            raise ValueError("backoffs must be >= 0, multiplier >= 1 and jitter in [0, 1]")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the failed attempt number `attempt` (1-based)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return ceiling * (1 - self.jitter * random.random())


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class Options:
    """How a client talks to creditd.

    `timeout` is the default deadline of every unary call (all its attempts included) and of
    every request/answer exchange on a stream; a method's own `timeout=` overrides it.
    """

    timeout: float = DEFAULT_TIMEOUT
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    on_retry: OnRetry | None = None
    channel_options: Sequence[tuple[str, Any]] = DEFAULT_CHANNEL_OPTIONS
    credentials: Any = None  # grpc.ChannelCredentials for TLS; None for a plaintext channel
    metadata: Sequence[tuple[str, str]] = ()  # extra metadata sent with every call

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError("timeout must be positive")

"""What the sync and asyncio clients share: configuration, metadata and the retry decision."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from creditd_client.errors import CreditdError, retryable
from creditd_client.options import DEFAULT_ADDRESS, DEFAULT_CHANNEL_OPTIONS, OnRetry, Options, RetryPolicy

log = logging.getLogger("creditd_client")


def options_from(
    options: Options | None,
    timeout: float | None,
    retry: RetryPolicy | None,
    on_retry: OnRetry | None,
    credentials: Any,
    channel_options: Sequence[tuple[str, Any]] | None,
) -> Options:
    base = options or Options()
    return Options(
        timeout=timeout if timeout is not None else base.timeout,
        retry=retry if retry is not None else base.retry,
        on_retry=on_retry if on_retry is not None else base.on_retry,
        channel_options=channel_options if channel_options is not None else base.channel_options,
        credentials=credentials if credentials is not None else base.credentials,
        metadata=base.metadata,
    )


def address_and_key(address: str | None, api_key: str | None, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The address and key given, else CREDITD_ADDRESS and CREDITD_TOKEN, else the defaults."""
    source = os.environ if env is None else env
    resolved_address = address or source.get("CREDITD_ADDRESS") or DEFAULT_ADDRESS
    key = api_key if api_key is not None else source.get("CREDITD_TOKEN", "")
    return resolved_address, key


class Retrier:
    """Decides whether and when a failed attempt of one call is tried again."""

    def __init__(self, method: str, policy: RetryPolicy, allowed: bool, deadline: float, on_retry: OnRetry | None):
        self.method = method
        self.policy = policy
        self.allowed = allowed
        self.deadline = deadline
        self.on_retry = on_retry
        self.attempt = 0

    def remaining(self) -> float:
        return max(0.001, self.deadline - time.monotonic())

    def next_delay(self, error: CreditdError) -> float | None:
        """Seconds to wait before the next attempt, or None to give up with `error`."""
        error.attempts = self.attempt
        if not (self.allowed and retryable(error)) or self.attempt >= self.policy.max_attempts:
            return None
        delay = self.policy.delay(self.attempt)
        if time.monotonic() + delay >= self.deadline:
            return None
        log.debug("%s failed with %s (attempt %d); retrying in %.3fs", self.method, error.reason, self.attempt, delay)
        if self.on_retry is not None:
            self.on_retry(self.method, self.attempt, error, delay)
        return delay


class ClientBase:
    def __init__(self, address: str, api_key: str, options: Options) -> None:
        self.address = address
        self.options = options
        self._metadata: tuple[tuple[str, str], ...] = (
            *((("authorization", f"Bearer {api_key}"),) if api_key else ()),
            *options.metadata,
        )
        self._channel_options = list(options.channel_options or DEFAULT_CHANNEL_OPTIONS)

    def _retrier(self, method: str, retry: bool, timeout: float | None) -> Retrier:
        budget = timeout if timeout is not None else self.options.timeout
        return Retrier(method, self.options.retry, retry, time.monotonic() + budget, self.options.on_retry)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"

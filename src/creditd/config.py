"""Settings from CREDITD_* environment variables (command-line flags override them)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from creditd.domain.rates import (
    PLATFORM_FREE_SMS_MICROS,
    PLATFORM_FREE_VOICE_MICROS,
    PLATFORM_RATES,
    RateCard,
)

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "creditd"


def default_database_url() -> str:
    return f"sqlite+aiosqlite:///{DEFAULT_DATA_DIR / 'creditd.db'}"


@dataclass
class Settings:
    listen: str = DEFAULT_LISTEN
    database_url: str = field(default_factory=default_database_url)
    redis_url: str = ""  # empty: the embedded hot store
    redis_prefix: str = "creditd:"  # of every key; replicas sharing balances share it
    redis_mode: str = "auto"  # auto (ask the node), standalone or cluster
    admin_token: str = ""  # empty: a new random one each start, printed
    # Sessions
    slice_seconds: int = 60
    renewal_lead_seconds: float = 15.0
    warning_seconds: float = 10.0
    grace_seconds: float = 30.0
    authorize_ttl_seconds: float = 60.0
    # Shutdown: how long live calls may go on after SIGTERM before they are cut and settled
    drain_seconds: float = 30.0
    # Transport
    tls_cert: str = ""  # PEM files; a certificate and key turn TLS on
    tls_key: str = ""
    tls_client_ca: str = ""  # also require client certificates signed by this CA (mutual TLS)
    max_message_bytes: int = 1024 * 1024
    max_concurrent_streams: int = 256  # per connection
    keepalive_min_seconds: int = 10  # clients pinging more often are disconnected
    keepalive_time_seconds: float = 30.0  # ping an idle connection this often to find dead peers
    keepalive_timeout_seconds: float = 10.0  # ... and close it when the ping is not answered in time
    # Telemetry and logs
    metrics_listen: str = ""  # host:port of the Prometheus scrape endpoint; empty: none
    otlp_endpoint: str = ""  # OTEL_EXPORTER_OTLP_ENDPOINT: export traces and metrics over OTLP/gRPC
    log_level: str = "info"
    log_format: str = "json"  # or "text"
    # Write-behind of usage to the database
    flush_interval_seconds: float = 0.2
    flush_batch: int = 500
    # What the platform gives and charges agencies unless an agency is created with overrides
    platform_free_voice_micros: int = PLATFORM_FREE_VOICE_MICROS
    platform_free_sms_micros: int = PLATFORM_FREE_SMS_MICROS
    platform_rates: RateCard = PLATFORM_RATES

    def validate(self) -> None:
        if self.slice_seconds < 1:
            raise ValueError("CREDITD_SLICE_SECONDS must be at least 1")
        if not self.warning_seconds > 0:
            raise ValueError("CREDITD_WARNING_SECONDS must be positive")
        if not self.renewal_lead_seconds > 0:
            raise ValueError("CREDITD_RENEWAL_LEAD_SECONDS must be positive")
        if self.grace_seconds < 0 or self.authorize_ttl_seconds <= 0:
            raise ValueError("grace and authorization time-to-live must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("CREDITD_TLS_CERT and CREDITD_TLS_KEY go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("CREDITD_TLS_CLIENT_CA needs CREDITD_TLS_CERT and CREDITD_TLS_KEY")
        if self.max_message_bytes < 1024:
            raise ValueError("CREDITD_MAX_MESSAGE_BYTES must be at least 1024")
        if self.max_concurrent_streams < 1:
            raise ValueError("CREDITD_MAX_CONCURRENT_STREAMS must be at least 1")
        if self.keepalive_min_seconds < 0 or min(self.keepalive_time_seconds, self.keepalive_timeout_seconds) <= 0:
            raise ValueError("keepalive times must be positive")
        if self.metrics_listen:
            host_port(self.metrics_listen, "CREDITD_METRICS_LISTEN")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError("CREDITD_LOG_LEVEL must be debug, info, warning, error or critical")
        if self.redis_mode not in ("auto", "standalone", "cluster"):
            raise ValueError("CREDITD_REDIS_MODE must be auto, standalone or cluster")
        if self.log_format not in ("json", "text"):
            raise ValueError("CREDITD_LOG_FORMAT must be json or text")


def host_port(address: str, variable: str) -> tuple[str, int]:
    """Split "host:port" ("[::1]:9464" for IPv6); raises ValueError naming `variable`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{variable} must be host:port, e.g. 127.0.0.1:9464")
    return host.strip("[]") or "0.0.0.0", int(port)


_ENV = {
    "listen": ("CREDITD_LISTEN", str),
    "database_url": ("CREDITD_DATABASE_URL", str),
    "redis_url": ("CREDITD_REDIS_URL", str),
    "redis_prefix": ("CREDITD_REDIS_PREFIX", str),
    "redis_mode": ("CREDITD_REDIS_MODE", str),
    "admin_token": ("CREDITD_ADMIN_TOKEN", str),
    "slice_seconds": ("CREDITD_SLICE_SECONDS", int),
    "renewal_lead_seconds": ("CREDITD_RENEWAL_LEAD_SECONDS", float),
    "warning_seconds": ("CREDITD_WARNING_SECONDS", float),
    "grace_seconds": ("CREDITD_GRACE_SECONDS", float),
    "authorize_ttl_seconds": ("CREDITD_AUTHORIZE_TTL_SECONDS", float),
    "flush_interval_seconds": ("CREDITD_FLUSH_INTERVAL_SECONDS", float),
    "drain_seconds": ("CREDITD_DRAIN_SECONDS", float),
    "tls_cert": ("CREDITD_TLS_CERT", str),
    "tls_key": ("CREDITD_TLS_KEY", str),
    "tls_client_ca": ("CREDITD_TLS_CLIENT_CA", str),
    "max_message_bytes": ("CREDITD_MAX_MESSAGE_BYTES", int),
    "max_concurrent_streams": ("CREDITD_MAX_CONCURRENT_STREAMS", int),
    "keepalive_min_seconds": ("CREDITD_KEEPALIVE_MIN_SECONDS", int),
    "keepalive_time_seconds": ("CREDITD_KEEPALIVE_TIME_SECONDS", float),
    "keepalive_timeout_seconds": ("CREDITD_KEEPALIVE_TIMEOUT_SECONDS", float),
    "metrics_listen": ("CREDITD_METRICS_LISTEN", str),
    "otlp_endpoint": ("OTEL_EXPORTER_OTLP_ENDPOINT", str),
    "log_level": ("CREDITD_LOG_LEVEL", str),
    "log_format": ("CREDITD_LOG_FORMAT", str),
    "platform_free_voice_micros": ("CREDITD_PLATFORM_FREE_VOICE_MICROS", int),
    "platform_free_sms_micros": ("CREDITD_PLATFORM_FREE_SMS_MICROS", int),
}


def rate_card_from_json(text: str) -> RateCard:
    """{"voice": {...}, "default_voice": n, "sms": {...}, "default_sms": n}, micro-credits."""
    data = json.loads(text)
    return RateCard(
        voice={k.lower(): int(v) for k, v in data.get("voice", {}).items()},
        default_voice=int(data.get("default_voice", PLATFORM_RATES.default_voice)),
        sms={k.upper(): int(v) for k, v in data.get("sms", PLATFORM_RATES.sms).items()},
        default_sms=int(data.get("default_sms", PLATFORM_RATES.default_sms)),
    )


def from_env(environ: dict[str, str] | None = None, **overrides: object) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name, (variable, parse) in _ENV.items():
        if env.get(variable):
            values[name] = parse(env[variable])
    if env.get("CREDITD_PLATFORM_RATES"):
        values["platform_rates"] = rate_card_from_json(env["CREDITD_PLATFORM_RATES"])
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.validate()
    return settings

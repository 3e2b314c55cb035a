"""Settings: one model, read from CREDITD_* environment variables; `creditd` flags override them.

A setting is one field of `Settings`. Its environment variable is CREDITD_<NAME> (unless the
field names another with `validation_alias`), its flag --<name> with dashes, and its help
text the field's description: `creditd serve --help` and every error message are made from
the field, so adding a setting is adding a field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.functional_validators import PlainValidator
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from creditd.domain.rates import (
    PLATFORM_FREE_SMS_MICROS,
    PLATFORM_FREE_VOICE_MICROS,
    PLATFORM_RATES,
    RateCard,
)

ENV_PREFIX = "CREDITD_"
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "creditd"
# The database drivers creditd runs on (the server needs an asyncio driver).
DATABASE_DRIVERS = ("postgresql+psycopg", "postgresql+asyncpg", "sqlite+aiosqlite")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def default_database_url() -> str:
    return f"sqlite+aiosqlite:///{DEFAULT_DATA_DIR / 'creditd.db'}"


def _is_host_port(address: str) -> bool:
    _, sep, port = address.rpartition(":")
    return bool(sep) and port.isdigit() and int(port) <= 65535


def host_port(address: str, variable: str) -> tuple[str, int]:
    """Split "host:port" ("[::1]:9464" for IPv6); raises ValueError naming `variable`."""
    if not _is_host_port(address):
        raise ValueError(f"{variable} must be host:port, e.g. 127.0.0.1:9464")
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


# -- CREDITD_PLATFORM_RATES ----------------------------------------------------------------

Micros = Annotated[int, Field(ge=0)]


class _RateCardJson(BaseModel):
    """The JSON form of a rate card. Strict: micro-credits are whole numbers, never 1.5."""

    model_config = ConfigDict(extra="forbid", strict=True)

    voice: dict[str, Micros] = {}
    default_voice: Micros = PLATFORM_RATES.default_voice
    sms: dict[str, Micros] = dict(PLATFORM_RATES.sms)
    default_sms: Micros = PLATFORM_RATES.default_sms


RATE_CARD_EXAMPLE = (
    '{"voice": {"elevenlabs": 1200000}, "default_voice": 1000000, "sms": {"GB": 400000}, "default_sms": 166000}'
)


def _rate_card(value: object) -> RateCard:
    if isinstance(value, RateCard):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"is not JSON ({exc.msg} at character {exc.pos}); e.g. {RATE_CARD_EXAMPLE}") from None
    try:
        card = _RateCardJson.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            known = ", ".join(_RateCardJson.model_fields)
            raise ValueError(f"has an unknown key {where!r} (the keys are {known})") from None
        if error["type"] == "model_type":
            raise ValueError(f"must be a JSON object, e.g. {RATE_CARD_EXAMPLE}") from None
        if error["type"] == "dict_type":
            raise ValueError(f"{where} must be an object of names to micro-credits, e.g. {RATE_CARD_EXAMPLE}") from None
        raise ValueError(f"{where} {_problem(error)} (rates are micro-credits, 1 credit = 1000000)") from None
    return RateCard(
        voice={name.lower(): micros for name, micros in card.voice.items()},
        default_voice=card.default_voice,
        sms={country.upper(): micros for country, micros in card.sms.items()},
        default_sms=card.default_sms,
    )


# -- the settings --------------------------------------------------------------------------

Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_ignore_empty=True,  # VAR= is the same as unset
        extra="forbid",
        populate_by_name=True,
        validate_default=True,
    )

    # Server and stores
    listen: str = Field(DEFAULT_LISTEN, description="gRPC address, host:port (port 0: any free port)")
    workers: int = Field(
        1, ge=1, le=64, description="server processes sharing the port (SO_REUSEPORT), each a full replica"
    )
    reuse_port: bool = Field(False, description="listen with SO_REUSEPORT, beside other processes (set by --workers)")
    database_url: str = Field(
        default_factory=default_database_url,
        description="SQLAlchemy URL of the durable store: postgresql+psycopg://user@host/db in production; "
        "unset: SQLite in ~/.local/share/creditd",
    )
    redis_url: str = Field("", description="Redis shared by the replicas (redis://host:6379/0); unset: in-process")
    redis_prefix: str = Field("creditd:", description="prefix of every Redis key; replicas sharing balances share it")
    redis_mode: Literal["auto", "standalone", "cluster"] = Field(
        "auto", description="auto: ask the node --redis-url names; standalone; or cluster (Redis Cluster)"
    )
    admin_token: str = Field("", description="bootstrap platform-admin key; unset: a new random one each start")
    # Sessions
    slice_seconds: int = Field(60, ge=1, description="seconds of talk reserved per slice")
    renewal_lead_seconds: Seconds = Field(15.0, description="renew a grant this long before it ends")
    warning_seconds: Seconds = Field(10.0, description="warn this long before a final grant ends")
    grace_seconds: float = Field(30.0, ge=0, allow_inf_nan=False, description="how long a dropped stream may resume")
    authorize_ttl_seconds: Seconds = Field(60.0, description="how long an authorization waits for its stream")
    drain_seconds: float = Field(
        30.0, ge=0, allow_inf_nan=False, description="on SIGTERM, how long live calls may go on before they are cut"
    )
    # Transport
    tls_cert: str = Field("", description="PEM certificate chain; with --tls-key it turns TLS on")
    tls_key: str = Field("", description="PEM private key of --tls-cert")
    tls_client_ca: str = Field("", description="PEM CA bundle: also require client certificates it signed (mTLS)")
    max_message_bytes: int = Field(1024 * 1024, ge=1024, description="largest gRPC message, either way")
    max_concurrent_streams: int = Field(256, ge=1, description="concurrent streams per connection")
    keepalive_min_seconds: int = Field(10, ge=0, description="clients pinging more often are disconnected")
    keepalive_time_seconds: Seconds = Field(30.0, description="ping an idle connection this often to find dead peers")
    keepalive_timeout_seconds: Seconds = Field(
        10.0, description="close a connection whose ping is not answered in time"
    )
    # Telemetry and logs
    metrics_listen: str = Field("", description="host:port of a Prometheus /metrics endpoint; unset: none")
    otlp_endpoint: str = Field(
        "",
        validation_alias=AliasChoices("otlp_endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="export traces and metrics over OTLP/gRPC to this collector (http://collector:4317)",
    )
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="log level")
    log_format: Literal["json", "text"] = Field("json", description="json lines, or text for a terminal")
    # Write-behind of usage to the database
    flush_interval_seconds: Seconds = Field(0.2, description="write usage to the database this often")
    flush_batch: int = Field(200, ge=1, description="records per database write")
    # What the platform gives and charges agencies unless an agency is created with overrides
    platform_free_voice_micros: Micros = Field(
        PLATFORM_FREE_VOICE_MICROS, description="monthly free voice allowance of a new agency, micro-credits"
    )
    platform_free_sms_micros: Micros = Field(
        PLATFORM_FREE_SMS_MICROS, description="monthly free SMS allowance of a new agency, micro-credits"
    )
    platform_rates: Annotated[RateCard, NoDecode, PlainValidator(_rate_card)] = Field(
        PLATFORM_RATES,
        description=f"what agencies pay the platform, JSON in micro-credits: {RATE_CARD_EXAMPLE}",
    )

    @field_validator("log_level", "log_format", "redis_mode", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("listen", "metrics_listen")
    @classmethod
    def _address(cls, value: str) -> str:
        if value and not _is_host_port(value):
            raise ValueError("must be host:port, e.g. 127.0.0.1:50051 (port 0: any free port)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("is not a database URL; e.g. postgresql+psycopg://user@host:5432/creditd") from None
        if url.drivername not in DATABASE_DRIVERS:
            raise ValueError(
                f"uses {url.drivername}://, which creditd does not run on; use one of "
                + ", ".join(f"{driver}://" for driver in DATABASE_DRIVERS)
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if value and not value.startswith(REDIS_SCHEMES):
            raise ValueError(f"must start with redis://, rediss:// or unix://, e.g. redis://{value}")
        return value

    @field_validator("tls_cert", "tls_key", "tls_client_ca")
    @classmethod
    def _readable_file(cls, value: str) -> str:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(f"names no file: {value}")
        return value

    @model_validator(mode="after")
    def _together(self) -> Settings:
        if self.workers > 1 and not self.redis_url:
            raise ValueError(
                f"{variable('workers')} > 1 needs {variable('redis_url')} and a database the processes share: "
                "the embedded hot store lives in one process"
            )
        if self.workers > 1 and self.listen.endswith(":0"):
            raise ValueError(f"{variable('workers')} > 1 needs a fixed port in {variable('listen')}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError(f"{variable('tls_cert')} and {variable('tls_key')} go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError(f"{variable('tls_client_ca')} needs {variable('tls_cert')} and {variable('tls_key')}")
        return self


# -- names, help and errors ----------------------------------------------------------------


def variable(name: str) -> str:
    """The environment variable of a setting."""
    alias = Settings.model_fields[name].validation_alias
    if isinstance(alias, AliasChoices):
        return next(str(choice) for choice in alias.choices if str(choice).isupper())
    return f"{ENV_PREFIX}{name.upper()}"


def flag(name: str) -> str:
    """The command-line flag of a setting."""
    return "--" + name.replace("_", "-")


def default_text(name: str) -> str:
    """A setting's default as its help shows it ("" when its description says it)."""
    info = Settings.model_fields[name]
    value: Any = info.get_default(call_default_factory=False)
    if value in ("", None) or isinstance(value, RateCard):
        return ""
    return f"{value:g}" if isinstance(value, float) else str(value)


_WITH_INPUT = ("int_parsing", "int_from_float", "int_type", "float_parsing", "float_type", "finite_number")


def _problem(error: ErrorDetails) -> str:
    """What is wrong with a value, briefly."""
    ctx = error.get("ctx", {})
    kind = error["type"]
    if kind.startswith("int_"):
        text = "must be a whole number"
    elif kind.startswith("float_") or kind == "finite_number":
        text = "must be a finite number"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        words = {"greater_than_equal": "at least", "greater_than": "more than"}
        words |= {"less_than_equal": "at most", "less_than": "less than"}
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, float) else bound
        text = f"must be {words[kind]} {bound} (got {error['input']!r})"
    elif kind == "literal_error":
        text = f"must be one of {ctx['expected']} (got {error['input']!r})"
    elif kind == "value_error":
        text = str(ctx.get("error", error["msg"]))
    elif kind == "extra_forbidden":
        text = "is not a setting"
    else:
        text = error["msg"][0].lower() + error["msg"][1:]
    if kind in _WITH_INPUT:
        text += f" (got {error['input']!r})"
    return text


def describe(exc: ValidationError) -> str:
    """One line per invalid setting, naming its variable and its flag."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        if name in Settings.model_fields:
            lines.append(f"{variable(name)} ({flag(name)}) {_problem(error)}")
        elif name:
            lines.append(f"{name} {_problem(error)}")
        else:
            lines.append(_problem(error))
    return "\n".join(lines)


class InvalidSettings(ValueError):
    """Settings that cannot be used; the message has one line per problem."""


def from_env(**flags: Any) -> Settings:
    """The settings from the environment, with the flags given (None: not given) on top."""
    given: dict[str, Any] = {name: value for name, value in flags.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        raise InvalidSettings(describe(exc)) from None

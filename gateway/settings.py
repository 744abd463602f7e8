"""The gateway's configuration: one typed object, read once at start and passed in."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mcp_server.settings import CommaList, LogFormat, LogLevel, http_url


class GatewaySettings(BaseSettings):
    """Every setting is an environment variable: `LLM_HUB_` + the field name in capitals."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_HUB_",
        extra="ignore",
        # `X=` in an .env file means "not set", not an empty token or URL.
        env_ignore_empty=True,
        frozen=True,
    )

    bridges: CommaList = Field(
        default_factory=list, description="Bridge base URLs, e.g. http://127.0.0.1:3000 (the gateway uses /mcp and /health)."
    )
    bridge_token: SecretStr | None = Field(None, description="Bearer token the gateway sends to bridges.")
    api_keys: CommaList = Field(
        default_factory=list,
        description="Accepted API keys, comma-separated, each `NAME:KEY` (the name shows in logs and metrics) or a bare KEY.",
    )
    auth_disabled: bool = Field(False, description="Run without API keys: development only, warned at start.")
    rate_limit: str = Field("60/minute", description="Default tool calls per key, in `limits` notation.")
    key_limits: CommaList = Field(
        default_factory=list, description="Per-key tool-call limits, comma-separated `NAME=LIMIT` (e.g. ci=600/minute)."
    )
    request_limit: str = Field("600/minute", description="Other requests per key: only stops floods.")
    token_limit: str | None = Field(
        None, description="Default token budget per key (prompt + completion), e.g. 100000/minute;2000000/day; "
        "none by default.",
    )
    key_token_limits: CommaList = Field(
        default_factory=list, description="Per-key token budgets, comma-separated `NAME=BUDGET` (e.g. ci=1000/minute)."
    )
    key_models: CommaList = Field(
        default_factory=list,
        description="Models a key may use, comma-separated `NAME=GLOB|GLOB` on model ids (e.g. "
        "ci=google/gemma-*|qwen/*); a key not named may use every model.",
    )
    redis_url: str | None = Field(None, description="Redis URL: several gateways then share one budget.")
    rate_limit_fail_open: bool = Field(
        True, description="When Redis is unreachable: let requests through (true) or refuse them with 503 (false)."
    )
    redis_timeout: float = Field(
        0.5, gt=0, le=5, description="Seconds a Redis answer may take; slower counts as down, and Redis is skipped "
        "until a probe finds it answering again.",
    )
    cors_origins: CommaList = Field(default_factory=list, description="Origins allowed by CORS (none by default).")
    health_interval: float = Field(30.0, gt=0, description="Seconds between bridge health checks.")
    health_timeout: float = Field(5.0, gt=0, description="Seconds a bridge health check may take.")
    call_timeout: float = Field(600.0, gt=0, description="Seconds a tool call through the gateway may take.")
    heartbeat_interval: float = Field(
        5.0, gt=0, le=5, description="Seconds between keep-alive progress updates while a call waits for its bridge "
        "to begin answering (a free connection, a free slot).",
    )
    bridge_connections: int = Field(
        256, ge=2, description="Connections to each bridge (a quarter kept alive when idle; one is its change "
        "stream); calls beyond wait for one, with heartbeats.",
    )
    max_sessions_per_key: int = Field(
        100, ge=1, description="Handshake-era MCP sessions one key may hold open; more are refused (429) until "
        "some end or expire.",
    )
    session_idle_timeout: float = Field(
        600.0, gt=0, description="Seconds a handshake-era MCP session may go without a request (or an open "
        "stream) before it is closed.",
    )
    routing: Literal["loaded", "round-robin"] = Field(
        "loaded", description="`loaded`: to a bridge that has the model loaded, fewest calls per slot; or `round-robin`."
    )
    spill_ratio: float = Field(
        2.0, gt=0, description="Calls in flight per slot on every bridge with the model loaded before one that must "
        "load it is chosen.",
    )
    affinity: bool = Field(False, description="Keep a conversation (same leading messages) on one bridge.")
    grace_period: float = Field(
        300.0, ge=0, description="Seconds a bridge that is down keeps its tools listed (marked unavailable)."
    )
    max_body_bytes: int = Field(1_048_576, gt=0, description="Largest request body accepted (413 above).")
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "json"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)

    @field_validator("bridges")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        urls = [http_url(url, example="http://127.0.0.1:3000") for url in value]
        for url in urls:
            if url.endswith("/mcp"):  # the MCP endpoint, given where the bridge's base URL goes
                raise ValueError(f"{url!r} ends in /mcp, which the gateway adds itself: use {url.removesuffix('/mcp')}")
        return urls

    @field_validator("api_keys")
    @classmethod
    def _named_keys(cls, value: list[str]) -> list[str]:
        # Messages name keys, never show them: they reach the terminal and the logs.
        names: set[str] = set()
        for entry in value:
            name, key = split_key(entry)
            if not name:
                raise ValueError("an entry has no name before its ':': give each key as NAME:KEY")
            if not key:
                raise ValueError(f"the key named {name!r} is empty (an unset variable?): give it as NAME:KEY")
            if name in names:
                raise ValueError(f"two keys are named {name!r}: give each its own name")
            names.add(name)
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from redis.connection import parse_url  # Redis is only needed when a URL is given

        try:
            parse_url(value.removeprefix("async+"))
        except ValueError as exc:  # the URL itself is left out: it may hold a password
            raise ValueError(f"not a Redis URL ({exc}), e.g. redis://localhost:6379/0") from None
        return value

    @field_validator("rate_limit", "request_limit", "token_limit")
    @classmethod
    def _limit(cls, value: str | None) -> str | None:
        from limits import parse_many

        if value is None:  # no token budget
            return None
        try:
            items = parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit such as '60/minute' or '10/second'") from None
        if any(item.amount < 1 or item.multiples < 1 for item in items):
            raise ValueError(f"{value!r} would refuse everything: allow at least 1, e.g. '60/minute'")
        return value

    @field_validator("key_limits", "key_token_limits")
    @classmethod
    def _key_limits(cls, value: list[str], info: ValidationInfo) -> list[str]:
        example = "ci=600/minute" if info.field_name == "key_limits" else "ci=1000/minute"
        for entry in value:
            _, limit = _per_key(entry, info, "limits", f"NAME=LIMIT, e.g. {example}")
            cls._limit(limit)
        return value

    @field_validator("key_models")
    @classmethod
    def _key_models(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for entry in value:
            _, globs = _per_key(entry, info, "gives models to", "NAME=GLOB|GLOB, e.g. ci=google/gemma-*|qwen/*")
            if any(not glob.strip() for glob in globs.split("|")):
                raise ValueError(f"{entry!r} has an empty model glob: separate globs with a single '|', "
                                 "e.g. ci=google/gemma-*|qwen/*")
        return value

    def keys(self) -> dict[str, str]:
        """Key name -> key. A bare key is named by a hash prefix, so logs never show it."""
        return dict(split_key(entry) for entry in self.api_keys)

    def limit_for(self, key_name: str) -> str:
        """The tool-call limit of one key, falling back to the default."""
        return _value_for(self.key_limits, key_name) or self.rate_limit

    def token_limit_for(self, key_name: str) -> str | None:
        """The token budget of one key, falling back to the default; None: no budget."""
        return _value_for(self.key_token_limits, key_name) or self.token_limit

    def models_for(self, key_name: str) -> list[str] | None:
        """The model-id globs one key may use; None: every model."""
        globs = _value_for(self.key_models, key_name)
        return None if globs is None else [glob.strip() for glob in globs.split("|")]


def _per_key(entry: str, info: ValidationInfo, verb: str, shape: str) -> tuple[str, str]:
    """A `NAME=VALUE` entry of a per-key setting as (name, value), its name checked against the keys."""
    name, sep, value = (part.strip() for part in entry.partition("="))
    if not sep or not name:
        raise ValueError(f"{entry!r} must look like {shape}")
    # api_keys is validated first (it is declared first), and is missing here only if it was refused.
    if "api_keys" in info.data:
        names = {split_key(key)[0] for key in info.data["api_keys"]}
        if name not in names:
            known = ", ".join(sorted(names)) or "none"
            raise ValueError(f"{entry!r} {verb} a key named {name!r}, which LLM_HUB_API_KEYS does not have "
                             f"(its names: {known})")
    return name, value


def _value_for(entries: list[str], key_name: str) -> str | None:
    for entry in entries:
        name, _, value = entry.partition("=")
        if name.strip() == key_name:
            return value.strip()
    return None


def split_key(entry: str) -> tuple[str, str]:
    """One LLM_HUB_API_KEYS entry as (name, key). A bare key is named by a hash prefix, so logs never show it."""
    name, sep, key = entry.partition(":")
    if not sep:
        return "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
    return name.strip(), key.strip()

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
    redis_url: str | None = Field(None, description="Redis URL: several gateways then share one budget.")
    rate_limit_fail_open: bool = Field(
        True, description="When Redis is unreachable: let requests through (true) or refuse them with 503 (false)."
    )
    cors_origins: CommaList = Field(default_factory=list, description="Origins allowed by CORS (none by default).")
    health_interval: float = Field(30.0, gt=0, description="Seconds between bridge health checks.")
    health_timeout: float = Field(5.0, gt=0, description="Seconds a bridge health check may take.")
    call_timeout: float = Field(600.0, gt=0, description="Seconds a tool call through the gateway may take.")
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

    @field_validator("rate_limit", "request_limit")
    @classmethod
    def _limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            items = parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit such as '60/minute' or '10/second'") from None
        if any(item.amount < 1 or item.multiples < 1 for item in items):
            raise ValueError(f"{value!r} would refuse everything: allow at least 1, e.g. '60/minute'")
        return value

    @field_validator("key_limits")
    @classmethod
    def _key_limits(cls, value: list[str], info: ValidationInfo) -> list[str]:
        # api_keys is validated first (it is declared first), and is missing here only if it was refused.
        names = {split_key(entry)[0] for entry in info.data.get("api_keys", [])}
        for entry in value:
            name, sep, limit = entry.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"{entry!r} must look like NAME=LIMIT, e.g. ci=600/minute")
            cls._limit(limit.strip())
            if "api_keys" in info.data and name.strip() not in names:
                known = ", ".join(sorted(names)) or "none"
                raise ValueError(f"{entry!r} limits a key named {name.strip()!r}, which LLM_HUB_API_KEYS does not "
                                 f"have (its names: {known})")
        return value

    def keys(self) -> dict[str, str]:
        """Key name -> key. A bare key is named by a hash prefix, so logs never show it."""
        return dict(split_key(entry) for entry in self.api_keys)

    def limit_for(self, key_name: str) -> str:
        """The tool-call limit of one key, falling back to the default."""
        for entry in self.key_limits:
            name, _, limit = entry.partition("=")
            if name.strip() == key_name:
                return limit.strip()
        return self.rate_limit


def split_key(entry: str) -> tuple[str, str]:
    """One LLM_HUB_API_KEYS entry as (name, key). A bare key is named by a hash prefix, so logs never show it."""
    name, sep, key = entry.partition(":")
    if not sep:
        return "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
    return name.strip(), key.strip()

"""The gateway's configuration: one typed object, read once at start and passed in."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mcp_server.settings import CommaList, LogFormat, LogLevel


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
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} must start with http:// or https://")
        return [url.rstrip("/") for url in value]

    @field_validator("rate_limit", "request_limit")
    @classmethod
    def _limit(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a rate limit such as '60/minute' or '10/second'") from None
        return value

    @field_validator("key_limits")
    @classmethod
    def _key_limits(cls, value: list[str]) -> list[str]:
        for entry in value:
            name, sep, limit = entry.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"{entry!r} must look like NAME=LIMIT, e.g. ci=600/minute")
            cls._limit(limit.strip())
        return value

    def keys(self) -> dict[str, str]:
        """Key name -> key. A bare key is named by a hash prefix, so logs never show it."""
        named: dict[str, str] = {}
        for entry in self.api_keys:
            name, sep, key = entry.partition(":")
            if not sep:
                name, key = "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8], entry
            named[name.strip()] = key.strip()
        return named

    def limit_for(self, key_name: str) -> str:
        """The tool-call limit of one key, falling back to the default."""
        for entry in self.key_limits:
            name, _, limit = entry.partition("=")
            if name.strip() == key_name:
                return limit.strip()
        return self.rate_limit

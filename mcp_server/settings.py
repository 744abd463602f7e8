"""The bridge's configuration: one typed object, read once at start and passed in."""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, BeforeValidator, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ToolKind = Literal["chat", "embed", "complete"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _env(name: str, *aliases: str) -> AliasChoices:
    # An explicit alias switches off env_prefix for that field, so the prefixed name is listed too.
    return AliasChoices(name, f"LLM_HUB_{name.upper()}", *aliases)


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


def http_url(value: str, example: str) -> str:
    """`value` without a trailing slash, if a client can connect to it: http(s), a host, a port that exists.
    Shared with the gateway's settings."""
    try:
        parts = urlsplit(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a URL ({exc}), e.g. {example}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} must start with http:// or https://, e.g. {example}")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host name, e.g. {example}")
    try:
        port = parts.port  # raises for a port that is not a number, or above 65535
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"{value!r} has no usable port (1 to 65535), e.g. {example}")
    return value.rstrip("/")


# Shared with the gateway's settings: lists are comma-separated in the environment, not JSON.
CommaList = Annotated[list[str], NoDecode, BeforeValidator(_split_commas)]
LogLevel = Annotated[Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"], BeforeValidator(_upper)]
LogFormat = Literal["json", "text"]


class BridgeSettings(BaseSettings):
    """Every setting is an environment variable (`LLM_HUB_` + the name) and most are CLI flags."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_HUB_",
        populate_by_name=True,
        extra="ignore",
        # `X=` in an .env file means "not set", not an empty token or URL.
        env_ignore_empty=True,
        frozen=True,
    )

    lmstudio_url: str = Field(
        "http://localhost:1234",
        validation_alias=_env("lmstudio_url", "LMSTUDIO_URL"),
        description="Base URL of LM Studio's server (or any OpenAI-compatible server).",
    )
    lmstudio_api_token: SecretStr | None = Field(
        None,
        validation_alias=_env("lmstudio_api_token", "LMSTUDIO_API_TOKEN", "LM_API_TOKEN"),
        description="Bearer token, when LM Studio's server requires authentication.",
    )
    poll_interval: float = Field(30.0, gt=0, description="Seconds between model-list polls.")
    request_timeout: float = Field(
        300.0, gt=0, description="Seconds a single LM Studio request may take (model loading included)."
    )
    heartbeat_interval: float = Field(
        5.0, gt=0, le=5, description="Seconds between keep-alive progress updates while no text arrives."
    )
    first_list_wait: float = Field(
        5.0, ge=0, description="Seconds the first tools/list may wait for the first model discovery to end."
    )
    parallel_slots: int = Field(
        4, ge=1, description="Calls a model serves at once, when LM Studio does not say (published in /health)."
    )
    lmstudio_connections: int = Field(
        64, ge=1, description="Connections to LM Studio (kept for reuse, an idle one closed after 3 s); calls "
        "beyond wait for one, with heartbeats.",
    )
    include_models: CommaList = Field(["*"], description="Globs on the model id: only these become tools.")
    exclude_models: CommaList = Field([], description="Globs on the model id: these never become tools.")
    tools: Annotated[list[ToolKind], NoDecode, BeforeValidator(_split_commas)] = Field(
        ["chat", "embed"], description="Tool kinds to offer: chat, embed, complete."
    )
    log_level: LogLevel = "INFO"
    log_format: LogFormat = "json"

    transport: Literal["stdio", "http"] = "stdio"
    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    allowed_hosts: CommaList = Field(
        [], description="Extra Host header values accepted over HTTP (e.g. 'bridge:3000' in Compose)."
    )
    allowed_origins: CommaList = Field([], description="Extra Origin values accepted over HTTP.")
    bridge_token: SecretStr | None = Field(
        None, description="When set, HTTP clients of /mcp must send 'Authorization: Bearer <token>'."
    )

    @field_validator("lmstudio_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = http_url(value, example="http://localhost:1234")
        if url.endswith("/v1"):  # what OpenAI guides give as the base URL; the client adds /v1 itself
            raise ValueError(f"{value!r} ends in /v1, which llm-hub adds itself: use {url.removesuffix('/v1')}")
        return url

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


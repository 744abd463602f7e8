"""The connection pool of the hops that every call crosses: the bridge to LM Studio, the gateway to a bridge.

Before httpx2's pool hands out a request it checks every idle connection for a close by the server
(`is_readable`). Its stock streams answer by asking anyio for the socket, and anyio builds all of a
socket's attributes to answer, a `getpeername()` system call among them, each time: with 32 calls in
flight that was a tenth of each hop's CPU (py-spy). The streams here keep their socket from the start,
so the check is the one `poll()` it needs.

They also send a request's head with its body: httpcore writes them one after the other, two system calls
and two wake-ups of the server where one does, and those writes were a fifth of the bridge's CPU at 32
calls in flight. Everything else is the stock backend's.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from contextlib import suppress
from typing import Any

import httpcore2
import httpx2
from httpcore2._utils import is_socket_readable


def async_transport(limits: httpx2.Limits) -> httpx2.AsyncHTTPTransport:
    """httpx2's transport with `limits`, its connections checked as said above."""
    transport = httpx2.AsyncHTTPTransport(limits=limits)
    # httpx2 takes no network backend of its own; its pool does. Should a later httpx2 lay this out
    # otherwise, its stock streams serve: correct, only a little slower.
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if isinstance(pool, httpcore2.AsyncConnectionPool) and isinstance(backend, httpcore2.AsyncNetworkBackend):
        pool._network_backend = _Backend(backend)
    return transport


class _Stream(httpcore2.AsyncNetworkStream):
    def __init__(self, stream: httpcore2.AsyncNetworkStream) -> None:
        self._stream = stream
        self._socket = stream.get_extra_info("socket")
        self.aclose = stream.aclose  # type: ignore[method-assign]
        # The first write after a read (or on a new connection) is a request's head: it waits for the
        # write that follows it (the body, or the empty end of a bodiless request) or, failing that, the read.
        self._head: bytes | None = None
        self._starts_request = True

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if self._starts_request:
            self._starts_request = False
            self._head = buffer
            return
        if self._head is not None:
            buffer, self._head = self._head + buffer, None
        await self._stream.write(buffer, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._head is not None:
            head, self._head = self._head, None
            # As httpcore does with a failed write of a request: the server may have answered before closing.
            with suppress(httpcore2.WriteError):
                await self._stream.write(head, timeout)
        self._starts_request = True
        return await self._stream.read(max_bytes, timeout)

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._stream.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return is_socket_readable(self._socket)
        return self._stream.get_extra_info(info)


class _Backend(httpcore2.AsyncNetworkBackend):
    def __init__(self, backend: httpcore2.AsyncNetworkBackend) -> None:
        self._backend = backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._backend.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._backend.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._backend.sleep(seconds)

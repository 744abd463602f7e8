"""The shared Redis store behind a circuit breaker: a Redis that hangs costs one timeout, not one per request.

Every count the gateway keeps in Redis (rate limits, token budgets) goes through `GuardedStorage`, a `limits`
storage wrapping the real one, so any strategy built on it is covered. Each call may take
`LLM_HUB_REDIS_TIMEOUT`; one that takes longer, or fails, opens the breaker: from then on calls fail at once
with `StorageError` (which the callers already treat as "store unreachable": fail open or closed as
`LLM_HUB_RATE_LIMIT_FAIL_OPEN` says) while a background probe pings Redis every second, and the first answer
in time closes the breaker again. Requests therefore never wait on a Redis known to be down: only those
already waiting when it stopped answering lose one timeout.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.errors import StorageError
from loguru import logger

T = TypeVar("T")
PROBE_EVERY_SECONDS = 1.0


class StoreUnavailable(Exception):
    """Why the store was skipped; carried inside the `StorageError` callers catch."""


class GuardedStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport):
    """`inner` (a Redis storage of `limits`), each call bounded by `timeout`, skipped while the breaker is open."""

    STORAGE_SCHEME = None

    def __init__(self, inner: Storage, timeout: float) -> None:
        super().__init__()
        self.inner = inner
        self.timeout = timeout
        self.open = False
        self._opened = anyio.Event()

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        return ()  # `inner` wraps its own errors in StorageError already

    async def guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` on the inner storage, or `StorageError` at once while the breaker is open."""
        if self.open:
            raise StorageError(StoreUnavailable("skipped while it does not answer; a probe checks every second"))
        try:
            with anyio.fail_after(self.timeout):
                return await call()
        except (TimeoutError, StorageError) as exc:
            self._trip(exc)
            if isinstance(exc, StorageError):
                raise
            raise StorageError(StoreUnavailable(f"no answer within {self.timeout:g} s")) from exc

    def _trip(self, exc: Exception) -> None:
        if self.open:
            return
        self.open = True
        self._opened.set()
        reason = "it took longer than LLM_HUB_REDIS_TIMEOUT" if isinstance(exc, TimeoutError) else type(exc).__name__
        logger.warning(
            "Redis (the shared rate-limit store) skipped until it answers again ({}); probing every {:g} s",
            reason,
            PROBE_EVERY_SECONDS,
        )

    async def run(self) -> None:
        """The probe: while the breaker is open, ping Redis every second; close it at the first timely answer."""
        while True:
            await self._opened.wait()
            await anyio.sleep(PROBE_EVERY_SECONDS)
            answered = False
            with anyio.move_on_after(self.timeout):
                answered = await self.inner.check()
            if answered:
                self.open = False
                self._opened = anyio.Event()
                logger.warning("Redis (the shared rate-limit store) is back: counting there again")

    # -- the storage interface, each call guarded ------------------------------------------

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return await self.guarded(lambda: self.inner.incr(key, expiry, amount))

    async def get(self, key: str) -> int:
        return await self.guarded(lambda: self.inner.get(key))

    async def get_expiry(self, key: str) -> float:
        return await self.guarded(lambda: self.inner.get_expiry(key))

    async def check(self) -> bool:
        return await self.guarded(self.inner.check)

    async def reset(self) -> int | None:
        return await self.guarded(self.inner.reset)

    async def clear(self, key: str) -> None:
        return await self.guarded(lambda: self.inner.clear(key))

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return await self.guarded(lambda: _moving(self.inner).acquire_entry(key, limit, expiry, amount))

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return await self.guarded(lambda: _moving(self.inner).get_moving_window(key, limit, expiry))

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        return await self.guarded(lambda: _sliding(self.inner).acquire_sliding_window_entry(key, limit, expiry, amount))

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return await self.guarded(lambda: _sliding(self.inner).get_sliding_window(key, expiry))

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        return await self.guarded(lambda: _sliding(self.inner).clear_sliding_window(key, expiry))


def _moving(storage: Any) -> MovingWindowSupport:
    assert isinstance(storage, MovingWindowSupport)
    return storage


def _sliding(storage: Any) -> SlidingWindowCounterSupport:
    assert isinstance(storage, SlidingWindowCounterSupport)
    return storage

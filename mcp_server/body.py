"""Reading an HTTP request's body ahead of the app, then handing the app a `receive` that replays it.

For the checks that must see a body before the SDK parses it (tool calls whose input cannot be sent
on, rate limits counting tool calls), in the bridge and in the gateway alike.
"""

from __future__ import annotations

from collections import deque

from starlette.types import Message, Receive


async def buffer_body(receive: Receive, limit: int) -> tuple[bytes, bool, Receive]:
    """Reads the body, stopping once past `limit` bytes.

    Returns what was read, whether it stopped before the end (the body is larger than `limit`),
    and a `receive` that yields the same messages again, then the rest of the real stream.
    """
    body = bytearray()
    received_request = complete = False
    trailing: Message | None = None
    while len(body) <= limit:
        message = await receive()
        if message["type"] != "http.request":
            trailing = message
            break
        received_request = True
        body.extend(message.get("body", b""))
        if not message.get("more_body", False):
            complete = True
            break

    cached: deque[Message] = deque()
    if received_request:
        cached.append({"type": "http.request", "body": bytes(body), "more_body": not complete})
    if trailing is not None:
        cached.append(trailing)

    async def replay() -> Message:
        if cached:
            return cached.popleft()
        return await receive()

    return bytes(body), not complete and trailing is None, replay

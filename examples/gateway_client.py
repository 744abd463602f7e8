"""Call a model through the gateway with the official MCP Python SDK, streaming the answer.

    LLM_HUB_API_KEY=... python examples/gateway_client.py [tool] [prompt]

LLM_HUB_URL defaults to http://127.0.0.1:8080 (what `llm-hub up` serves); the MCP endpoint is
its /mcp. Without a tool name the first chat_ tool the gateway lists is used. Needs `mcp` (2.x).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import httpx2  # the HTTP library the MCP SDK 2.x is built on
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client


async def on_progress(progress: float, total: float | None, message: str | None) -> None:
    """Called for every progress notification: `message` is the text generated since the last one.

    Without a message it is a keep-alive: the model is loading or reading the prompt.
    """
    if message is None:
        print("[waiting for LM Studio]", file=sys.stderr, flush=True)
    else:
        print(message, end="", flush=True)


async def main(url: str, key: str, tool: str | None, prompt: str) -> int:
    # The key goes in a header on every request. Streamed answers can take minutes to finish,
    # hence the long read timeout (the SDK's own default).
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(30, read=300))
    async with http, Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
        tools = (await client.list_tools()).tools
        print("tools:", ", ".join(t.name for t in tools))

        tool = tool or next((t.name for t in tools if t.name.startswith("chat_")), None)
        if tool is None:
            print("The gateway lists no chat_ tool: is a language model available in LM Studio?", file=sys.stderr)
            return 1

        print(f"\n{tool}> ", end="", flush=True)
        result = await client.call_tool(tool, {"prompt": prompt}, progress_callback=on_progress)
        print()

        if result.is_error:  # LM Studio down, a bad argument...: the reason is in the content
            print("error:", " ".join(getattr(c, "text", "") for c in result.content), file=sys.stderr)
            return 1
        # The structured result: model, text, finish_reason, usage (tokens) and timings.
        details = {k: v for k, v in (result.structured_content or {}).items() if k != "text"}
        print(json.dumps(details, indent=2))
        return 0


def first_error(exc: BaseException) -> BaseException:
    """The SDK raises from inside task groups: the first error the group holds."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":
    api_key = os.environ.get("LLM_HUB_API_KEY")
    if not api_key:
        sys.exit("LLM_HUB_API_KEY is not set: export one of the keys the gateway accepts (its LLM_HUB_API_KEYS).")
    gateway = os.environ.get("LLM_HUB_URL", "http://127.0.0.1:8080").rstrip("/")
    args = sys.argv[1:]
    chosen = args[0] if args else None
    text = args[1] if len(args) > 1 else "Say hello in five words."
    try:
        sys.exit(asyncio.run(main(gateway, api_key, chosen, text)))
    except (ExceptionGroup, httpx2.HTTPError, MCPError) as exc:  # gateway down, key refused: no traceback
        sys.exit(
            f"Could not use the gateway at {gateway}/mcp: {first_error(exc)}\n"
            "Is it running, and is LLM_HUB_API_KEY one of its keys?"
        )

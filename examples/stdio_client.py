"""Launch the bridge over stdio, as a desktop host does, and call a model with the MCP Python SDK.

    python examples/stdio_client.py [tool] [prompt]

The bridge (`llm-hub`) is started as a subprocess and spoken to over its stdin/stdout. It talks to
LM Studio at LMSTUDIO_URL (default http://localhost:1234). Without a tool name the first chat_
tool is used. Needs `llm-hub` installed: run this with the .venv's python, made in this repository by
`python3 -m venv .venv && .venv/bin/pip install .`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

from mcp import Client, StdioServerParameters


def find_llm_hub() -> str:
    """`llm-hub` beside this Python (its virtualenv, even unactivated), else on PATH."""
    beside = Path(sys.executable).with_name("llm-hub")
    found = str(beside) if beside.exists() else shutil.which("llm-hub")
    if found is None:
        sys.exit("llm-hub is not installed: in this repository, python3 -m venv .venv && .venv/bin/pip install . "
                 "and run this with .venv/bin/python.")
    return found


async def on_progress(progress: float, total: float | None, message: str | None) -> None:
    """Called for every progress notification: `message` is the text generated since the last one.

    Without a message it is a keep-alive: the model is loading or reading the prompt.
    """
    if message is None:
        print("[waiting for LM Studio]", file=sys.stderr, flush=True)
    else:
        print(message, end="", flush=True)


async def wait_for_tool(client: Client, wanted: str | None, timeout: float = 10) -> str | None:
    """`wanted`, or the first chat_ tool, once the bridge lists it. The bridge answers at once and
    asks LM Studio for its models in the background, so model tools appear a moment after start-up."""
    for _ in range(int(timeout / 0.25)):
        names = [t.name for t in (await client.list_tools(cache_mode="refresh")).tools]
        found = wanted or next((n for n in names if n.startswith("chat_")), None)
        if found in names:
            print("tools:", ", ".join(names))
            return found
        await asyncio.sleep(0.25)
    return None


async def main(lmstudio_url: str, tool: str | None, prompt: str) -> int:
    bridge = StdioServerParameters(
        command=find_llm_hub(),
        # The subprocess gets a minimal environment (PATH, HOME...) plus this: where LM Studio is,
        # and short logs (the bridge logs to stderr, which shows in this terminal).
        env={
            "LMSTUDIO_URL": lmstudio_url,
            "LLM_HUB_LOG_LEVEL": os.environ.get("LLM_HUB_LOG_LEVEL", "WARNING"),
            "LLM_HUB_LOG_FORMAT": "text",
        },
    )
    async with Client(bridge) as client:
        found = await wait_for_tool(client, tool)
        if found is None:
            wanted = f"tool {tool}" if tool else "chat_ tool (a language model)"
            print(f"No {wanted}: is LM Studio running at {lmstudio_url}, serving it?", file=sys.stderr)
            return 1
        tool = found

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


if __name__ == "__main__":
    url = os.environ.get("LMSTUDIO_URL", "http://localhost:1234")
    args = sys.argv[1:]
    chosen = args[0] if args else None
    text = args[1] if len(args) > 1 else "Say hello in five words."
    sys.exit(asyncio.run(main(url, chosen, text)))

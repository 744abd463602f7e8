"""What a tool call does: one LM Studio request, streamed back as progress when the caller asks."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
from loguru import logger

from mcp_server.errors import BadUpstreamResponse, LMStudioError, UpstreamTimeout
from mcp_server.lmstudio import LMStudioClient
from mcp_server.tools import ChatArgs, CompleteArgs, EmbedArgs, ModelTool

Report = Callable[[float, str | None], Awaitable[None]]
"""`report(progress, message)`: one progress notification to the caller.

`message` is always exactly the text generated since the last one, so a client can concatenate
messages into the answer; a heartbeat (nothing arrived yet: model loading, prompt processing)
carries no message.
"""

# Heartbeats nudge progress by a sliver so it always increases while staying "tokens so far".
_BEAT_STEP = 0.001


@dataclass
class Generation:
    """The state of one generation as chunks arrive."""

    model: str
    started: float = field(default_factory=time.monotonic)
    pieces: list[str] = field(default_factory=list)
    tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def add(self, piece: str) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.pieces.append(piece)
        self.tokens += 1

    def structured(self) -> dict[str, Any]:
        ended = time.monotonic()
        completion = self.usage.get("completion_tokens", self.tokens)
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        generating = None if self.first_token_at is None else ended - self.first_token_at
        tps = completion / generating if generating and completion else None
        return {
            "model": self.model,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage
            or {"prompt_tokens": 0, "completion_tokens": self.tokens, "total_tokens": self.tokens},
            "timings": {
                "time_to_first_token_s": None if ttft is None else round(ttft, 4),
                "tokens_per_second": None if tps is None else round(tps, 2),
                "total_s": round(ended - self.started, 4),
            },
        }


def _piece(choice: dict[str, Any]) -> str | None:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content")
    return choice.get("text")  # /v1/completions chunks


async def _stream(client: LMStudioClient, path: str, body: dict[str, Any], gen: Generation, report: Report,
                  heartbeat: float) -> None:
    """Relay the stream as progress; a sender coalesces text that arrives while a notification is in flight.

    The first text goes out at once; under a fast stream each notification carries whatever piled
    up during the previous send, so the caller is never more than one send behind.
    """
    pending: list[str] = []
    wake = anyio.Event()
    done = False
    failure: BaseException | None = None

    async def send() -> None:
        nonlocal wake
        beats = 0
        while True:
            with anyio.move_on_after(heartbeat) as waited:
                await wake.wait()
            wake = anyio.Event()
            if pending:
                message = "".join(pending)
                pending.clear()
            elif done:
                return
            elif waited.cancelled_caught:
                beats += 1
                message = None
            else:
                continue  # woken for text an earlier notification already carried
            try:
                await report(gen.tokens + beats * _BEAT_STEP, message)
            except Exception as exc:
                # A caller that cannot take progress any more still gets its result.
                logger.debug("progress not delivered, no more will be sent: {!r}", exc)
                return
            if done and not pending:
                return

    async def read() -> None:
        body_with_usage = {**body, "stream_options": {"include_usage": True}}
        async with client.stream(path, body_with_usage) as chunks:
            async for chunk in chunks:
                if usage := chunk.get("usage"):
                    gen.usage = usage
                for choice in chunk.get("choices") or ():
                    if piece := _piece(choice):
                        gen.add(piece)
                        pending.append(piece)
                        wake.set()
                    if reason := choice.get("finish_reason"):
                        gen.finish_reason = reason

    async with anyio.create_task_group() as tg:
        tg.start_soon(send)
        try:
            await read()
        except LMStudioError as exc:
            # Kept aside so it leaves as itself rather than inside an ExceptionGroup.
            failure = exc
        finally:
            done = True
            wake.set()
    if failure is not None:
        raise failure
    if gen.finish_reason is None:
        raise BadUpstreamResponse("LM Studio ended the stream before the answer was finished.")


async def generate(client: LMStudioClient, tool: ModelTool, args: ChatArgs | CompleteArgs,
                   report: Report, *, timeout: float, heartbeat: float) -> Generation:
    """Run a chat or completion, streamed from LM Studio and reported as it arrives.

    Always streamed: the SDK gives a handler no portable way to know whether the caller sent a
    progress token (`report` is then a no-op), and one code path keeps timings and
    cancellation the same either way.
    """
    path = "/v1/chat/completions" if tool.kind == "chat" else "/v1/completions"
    body = args.request_body(tool.model.id)
    gen = Generation(model=tool.model.id)
    try:
        with anyio.fail_after(timeout):
            await _stream(client, path, body, gen, report, heartbeat)
    except TimeoutError:
        raise UpstreamTimeout(
            f"{tool.model.id} did not finish within {timeout:g} s (LLM_HUB_REQUEST_TIMEOUT); "
            f"{gen.tokens} tokens had arrived. Ask for fewer tokens or raise the timeout."
        ) from None
    except LMStudioError as exc:
        exc.partial = gen.text
        raise
    return gen


async def embed(client: LMStudioClient, tool: ModelTool, args: EmbedArgs, *, timeout: float) -> dict[str, Any]:
    try:
        with anyio.fail_after(timeout):
            payload = await client.post_json("/v1/embeddings", args.request_body(tool.model.id))
    except TimeoutError:
        raise UpstreamTimeout(f"{tool.model.id} did not answer within {timeout:g} s (LLM_HUB_REQUEST_TIMEOUT).") from None
    try:
        rows = sorted(payload["data"], key=lambda row: row.get("index", 0))
        vectors = [list(map(float, row["embedding"])) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise BadUpstreamResponse("LM Studio's embeddings answer has no readable `data[].embedding`.") from None
    return {
        "model": tool.model.id,
        "embeddings": vectors,
        "dimensions": len(vectors[0]) if vectors else 0,
        "usage": payload.get("usage") or {},
    }


def generation_result(gen: Generation, wants_json: bool) -> types.CallToolResult:
    structured = gen.structured()
    content = [types.TextContent(type="text", text=gen.text)]
    if wants_json:
        try:
            json.loads(gen.text)
        except ValueError:
            content.append(types.TextContent(type="text", text="(note: the model's answer is not valid JSON)"))
    return types.CallToolResult(content=content, structured_content=structured)


def embed_result(data: dict[str, Any]) -> types.CallToolResult:
    summary = f"{len(data['embeddings'])} embedding(s) of {data['dimensions']} dimensions from {data['model']}."
    return types.CallToolResult(content=[types.TextContent(type="text", text=summary)], structured_content=data)


def error_result(message: str, partial: str = "") -> types.CallToolResult:
    content = [types.TextContent(type="text", text=message)]
    if partial:
        content.append(types.TextContent(type="text", text=f"Partial answer before the failure:\n{partial}"))
    return types.CallToolResult(content=content, is_error=True)

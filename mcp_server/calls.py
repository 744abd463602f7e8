"""What a tool call does: one LM Studio request, streamed back as progress when the caller asks."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
from loguru import logger

from mcp_server.errors import BadUpstreamResponse, LMStudioError, UpstreamTimeout
from mcp_server.jsonsafe import sendable_text
from mcp_server.lmstudio import LMStudioClient, Unreadable, unreadable_answer
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


def _kind(value: Any) -> str:
    return "null" if value is None else {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number"
    )


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def read_usage(usage: Any) -> dict[str, int]:
    """The token counts of a `usage` object (other keys dropped: they are not in the output schema)."""
    if not isinstance(usage, dict):
        raise Unreadable(f"`usage` is {_kind(usage)}, not an object")
    counts = {}
    for key in _USAGE_KEYS:
        if (value := usage.get(key)) is not None:
            # Beyond 2**53 a count is no count, and JavaScript clients could not hold it exactly.
            if type(value) is not int or not 0 <= value < 2**53:
                raise Unreadable(f"`usage.{key}` is not a token count")
            counts[key] = value
    return counts


def read_chunk(chunk: Any, gen: Generation) -> str:
    """Record one streamed chunk's finish reason and usage on `gen`; return the text it adds.

    Every shape is checked, since whatever gets through ends up in a result the client validates
    against the output schema, or in a crash.
    """
    if type(chunk) is not dict:
        raise Unreadable(f"a streamed chunk is {_kind(chunk)}, not an object")
    if (usage := chunk.get("usage")) is not None:
        gen.usage = read_usage(usage)
    choices = chunk.get("choices")
    if choices is None:
        return ""
    if type(choices) is not list:
        raise Unreadable(f"`choices` is {_kind(choices)}, not a list")
    text = ""
    for choice in choices:
        if type(choice) is not dict:
            raise Unreadable(f"a choice is {_kind(choice)}, not an object")
        delta = choice.get("delta")
        if delta is None:
            piece, where = choice.get("text"), "text"  # /v1/completions chunks
        elif type(delta) is dict:
            piece, where = delta.get("content"), "delta.content"
        else:
            raise Unreadable(f"`delta` is {_kind(delta)}, not an object")
        if piece is not None:
            if type(piece) is not str:
                raise Unreadable(f"`{where}` is {_kind(piece)}, not text")
            text += piece
        reason = choice.get("finish_reason")
        if reason is not None and type(reason) is not str:
            raise Unreadable(f"`finish_reason` is {_kind(reason)}, not text")
        if reason:
            gen.finish_reason = sendable_text(reason)
    return sendable_text(text)


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
                try:
                    piece = read_chunk(chunk, gen)
                except Unreadable as exc:
                    raise unreadable_answer(path, exc) from None
                if piece:
                    gen.add(piece)
                    pending.append(piece)
                    wake.set()

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
        timed_out = UpstreamTimeout(
            f"{tool.model.id} did not finish within {timeout:g} s (LLM_HUB_REQUEST_TIMEOUT); "
            f"{gen.tokens} tokens had arrived. Ask for fewer tokens or raise the timeout."
        )
        timed_out.partial = gen.text
        raise timed_out from None
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
    texts = 1 if isinstance(args.input, str) else len(args.input)
    try:
        vectors = read_embeddings(payload, texts)
        usage = read_usage(payload["usage"]) if payload.get("usage") is not None else {}
    except Unreadable as exc:
        raise unreadable_answer("/v1/embeddings", exc) from None
    return {"model": tool.model.id, "embeddings": vectors, "dimensions": len(vectors[0]), "usage": usage}


def read_embeddings(payload: dict[str, Any], texts: int) -> list[list[float]]:
    """One vector per input text, in input order, from an embeddings answer."""
    rows = payload.get("data")
    if type(rows) is not list:
        raise Unreadable(f"`data` is {_kind(rows)}, not a list")
    if len(rows) != texts:
        raise Unreadable(f"it holds {len(rows)} embeddings for {texts} input text(s)")
    indexed = []
    for position, row in enumerate(rows):
        if type(row) is not dict:
            raise Unreadable(f"`data[{position}]` is {_kind(row)}, not an object")
        index = row.get("index", position)
        if type(index) is not int:
            raise Unreadable(f"`data[{position}].index` is {_kind(index)}, not a whole number")
        raw = row.get("embedding")
        if type(raw) is not list or not all(type(x) in (float, int) for x in raw):
            raise Unreadable(f"`data[{position}].embedding` is not a list of numbers")
        try:
            vector = [float(x) for x in raw]
        except OverflowError:
            vector = [math.inf]
        if not all(map(math.isfinite, vector)):
            raise Unreadable(f"`data[{position}].embedding` holds a number JSON cannot carry")
        indexed.append((index, vector))
    indexed.sort(key=lambda item: item[0])
    if [index for index, _ in indexed] != list(range(texts)):
        raise Unreadable("its `index` values are not one per input text")
    vectors = [vector for _, vector in indexed]
    if len({len(v) for v in vectors}) != 1 or not vectors[0]:
        raise Unreadable("its embeddings are empty or of different lengths")
    return vectors


def generation_result(gen: Generation, wants_json: bool) -> types.CallToolResult:
    structured = gen.structured()
    content = [types.TextContent(type="text", text=gen.text)]
    if wants_json:
        try:
            json.loads(gen.text)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply for Python's parser
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

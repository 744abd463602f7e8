"""The hops' connection pool (mcp_server/httpclient.py) against a real server: a request's head and body
travel together, whatever the body, and a connection the server closed while idle is not reused."""

from __future__ import annotations

import hashlib

import anyio
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from mcp_server.httpclient import async_transport
from tests.fake_lmstudio import serve

pytestmark = pytest.mark.anyio


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"method": request.method, "size": len(body), "sha256": hashlib.sha256(body).hexdigest()})


APP = Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"])])


def client(url: str, keepalive_expiry: float = 30.0) -> httpx2.AsyncClient:
    limits = httpx2.Limits(max_connections=8, max_keepalive_connections=8, keepalive_expiry=keepalive_expiry)
    return httpx2.AsyncClient(base_url=url, transport=async_transport(limits), timeout=10)


@pytest.mark.parametrize("size", [0, 1, 200_000, 3_000_000])
async def test_every_body_arrives_whole(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    async with serve(APP) as url, client(url) as http:
        for _ in range(3):  # on a fresh connection, then on the kept-alive one
            answer = (await http.post("/echo", content=body)).json()
            assert answer == {"method": "POST", "size": size, "sha256": hashlib.sha256(body).hexdigest()}
        assert (await http.get("/echo")).json()["size"] == 0


async def test_concurrent_requests_each_get_their_own_answer() -> None:
    async with serve(APP) as url, client(url) as http:
        answers: dict[int, int] = {}

        async def one(i: int) -> None:
            answers[i] = (await http.post("/echo", content=b"y" * i)).json()["size"]

        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(one, i)
        assert answers == {i: i for i in range(40)}


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    # uvicorn closes idle connections after timeout_keep_alive (5 s by default); the pool keeps them 30 s.
    async with serve(APP) as url, client(url) as http:
        assert (await http.get("/echo")).status_code == 200
        await anyio.sleep(6)
        for _ in range(3):
            assert (await http.post("/echo", content=b"after")).json()["size"] == 5

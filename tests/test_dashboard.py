"""The web dashboard: its endpoints over HTTP, and the page itself in headless Chromium (Debian's,
driven by Playwright) against a real gateway, real bridge processes and fake LM Studios.

Screenshots go to tests/artifacts/ (git-ignored). With LLM_HUB_UPDATE_SCREENSHOT=1 the laptop
screenshot also replaces docs/dashboard.png, the one the README shows.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import httpx2
import pytest
from openapi_spec_validator import validate
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from tests.conftest import CHAT_MODEL, CHAT_TOOL, EMBED_MODEL, bridge_process, free_port, gateway_process
from tests.fake_lmstudio import FakeLMStudio, FakeModel, serve

pytestmark = pytest.mark.anyio

KEY = "dashboard-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHROMIUM = "/usr/bin/chromium"
# No GPU, no sandbox (containers), and none of Chromium's own calls home: the machine may be offline.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ARTIFACTS = Path(__file__).with_name("artifacts")
README_SCREENSHOT = Path(__file__).parents[1] / "docs" / "dashboard.png"
LAPTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}
EXPECTED_REFUSAL = re.compile(r"status of (401|503)\b")

QWEN = "qwen/qwen3-4b"
MINISTRAL = "mistralai/ministral-3b"
QUESTION = "What does an MCP gateway do, in two sentences?"
ANSWER = (
    "A gateway puts one authenticated, rate-limited endpoint in front of many bridges, so a team can "
    "share the models running on a few GPU boxes. Each call goes to a healthy bridge that has the tool, "
    "and the answer streams back as it is generated."
)


def models_a() -> list[FakeModel]:
    return [
        FakeModel(CHAT_MODEL, display_name="Gemma 3 270M", capabilities=["tool_use"]),
        FakeModel(EMBED_MODEL, type="embeddings", publisher="nomic-ai", arch="nomic-bert", context_length=2048,
                  display_name="Nomic Embed Text v1.5"),
        FakeModel(QWEN, loaded=False, context_length=32768, publisher="qwen", display_name="Qwen3 4B"),
    ]


def models_b() -> list[FakeModel]:
    return [
        FakeModel(CHAT_MODEL, display_name="Gemma 3 270M", capabilities=["tool_use"]),
        FakeModel(MINISTRAL, context_length=8192, publisher="mistralai", display_name="Ministral 3B"),
        # Loaded here and not on bridge a, with two prediction slots.
        FakeModel(QWEN, loaded=True, parallel=2, context_length=32768, publisher="qwen", display_name="Qwen3 4B"),
    ]


def where(row: Locator) -> Locator:
    """The lines of a model row's Where cell, one per bridge."""
    return row.locator('td[data-label="Where"] .where')


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: the dashboard test needs Debian's Chromium (apt-get install -y chromium)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Browser, gateway: str, errors: list[str], **context: object) -> Page:
    """A fresh tab (own session storage) on the dashboard, recording script errors into `errors`."""
    page = await (await browser.new_context(**context)).new_page()  # type: ignore[arg-type]
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    # Chromium logs every 401 (a wrong key) and 503 (/health with no bridge): expected; anything else counts.
    page.on("console", lambda msg: msg.type == "error" and not EXPECTED_REFUSAL.search(msg.text)
            and errors.append(f"console: {msg.text}"))
    await page.goto(gateway)
    return page


async def sign_in(page: Page, key: str) -> None:
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Connect").click()


async def screenshot(page: Page, name: str, *, full_page: bool = True) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=full_page)
    return path


async def test_dashboard_endpoints(tmp_path: Path) -> None:
    """The page and its files are open; the models and stats endpoints need a key and merge bridges."""
    fake = FakeLMStudio(models_a())
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(fake.app))
        port, dead = free_port(), free_port()  # nothing listens on `dead`: a bridge that is down
        await stack.enter_async_context(bridge_process(url, port, tmp_path / "bridge.log"))
        gateway_port = free_port()
        await stack.enter_async_context(gateway_process(
            [f"http://127.0.0.1:{port}", f"http://127.0.0.1:{dead}"], gateway_port, tmp_path / "gateway.log",
            LLM_HUB_API_KEYS=f"tester:{KEY}",
        ))
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}") as http:
            page = await http.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "script-src 'self'" in page.headers["content-security-policy"]
            for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
                response = await http.get(path)
                assert response.status_code == 200 and kind in response.headers["content-type"], path
            assert (await http.get("/static/missing.js")).status_code == 404
            for path in ("/v1/dashboard/models", "/v1/stats"):
                assert (await http.get(path)).status_code == 401
                assert (await http.get(path, headers={"Authorization": "Bearer wrong"})).status_code == 401

            body = (await http.get("/v1/dashboard/models", headers=AUTH)).json()
            models = {m["id"]: m for m in body["models"]}
            assert set(models) == {CHAT_MODEL, EMBED_MODEL, QWEN}
            assert models[CHAT_MODEL]["bridges"] == [f"127.0.0.1:{port}"]
            assert models[CHAT_MODEL]["tools"] == [CHAT_TOOL] and models[CHAT_MODEL]["loaded"] is True
            assert models[QWEN]["loaded"] is False and models[QWEN]["context_length"] == 32768
            assert models[EMBED_MODEL]["type"] == "embedding"
            assert all(m["available"] and "unavailable_reason" not in m for m in models.values())
            assert body["lmstudio"] == [{"bridge": f"127.0.0.1:{port}", "reachable": True, "last_error": None}]
            assert [s["bridge"] for s in body["skipped"]] == [f"127.0.0.1:{dead}"]

            stats = (await http.get("/v1/stats", headers=AUTH)).json()
            assert stats["requests_total"] >= 1 and set(stats["latency_ms"]) == {"p50", "p95", "p99"}

            bridge = (await http.get("/v1/bridges", headers=AUTH)).json()["bridges"][0]
            serving = {m["model"]: m for m in bridge["models"]}
            assert serving[CHAT_MODEL] == {"model": CHAT_MODEL, "tools": [CHAT_TOOL], "loaded": True, "slots": 4,
                                           "in_flight": 0}
            assert serving[QWEN]["loaded"] is False

            document = (await http.get("/openapi.json", headers=AUTH)).json()
            validate(document)
            assert {"/v1/dashboard/models", "/v1/stats", "/"} <= set(document["paths"])
            call = document["paths"]["/v1/tools/{name}"]["post"]["responses"]
            assert {"400", "404", "502", "503"} <= set(call) and "Retry-After" in call["503"]["headers"]
            assert "models" in document["components"]["schemas"]["Bridge"]["properties"]


async def test_dashboard_in_chromium(tmp_path: Path) -> None:
    fake_a, fake_b = FakeLMStudio(models_a()), FakeLMStudio(models_b())
    lmstudio_b = free_port()  # bridge b's LM Studio starts later: first it is down
    errors: list[str] = []
    async with AsyncExitStack() as stack:
        url_a = await stack.enter_async_context(serve(fake_a.app))
        port_a, port_b = free_port(), free_port()
        bridge_a = await stack.enter_async_context(bridge_process(url_a, port_a, tmp_path / "bridge-a.log"))
        await stack.enter_async_context(
            bridge_process(f"http://127.0.0.1:{lmstudio_b}", port_b, tmp_path / "bridge-b.log"))
        gateway_port = free_port()
        await stack.enter_async_context(gateway_process(
            [f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"], gateway_port, tmp_path / "gateway.log",
            LLM_HUB_API_KEYS=f"tester:{KEY}",
        ))
        gateway = f"http://127.0.0.1:{gateway_port}"
        browser = await stack.enter_async_context(chromium())
        page = await open_page(browser, gateway, errors, viewport=LAPTOP)

        # A wrong key is refused and the data stays hidden.
        await sign_in(page, "not-the-key")
        await expect(page.locator("#key-error")).to_contain_text("Wrong API key")
        await expect(page.locator("#dashboard")).to_be_hidden()
        assert await page.evaluate("sessionStorage.getItem('llm-hub-key')") is None

        # The right key shows the bridges (b's LM Studio is down) and the models.
        await sign_in(page, KEY)
        await expect(page.locator("#dashboard")).to_be_visible()
        bridges = page.locator("#bridges tr")
        await expect(bridges).to_have_count(2)
        await expect(bridges.nth(0)).to_contain_text("healthy")
        await expect(bridges.nth(1)).to_contain_text("down")
        await expect(bridges.nth(1)).to_contain_text("LM Studio is not reachable")
        await expect(page.locator("#notices")).to_contain_text(f"LM Studio is down behind bridge 127.0.0.1:{port_b}")
        gemma = page.locator("#models tr", has_text=CHAT_MODEL)
        await expect(gemma).to_contain_text("llm")
        await expect(gemma).to_contain_text("loaded")
        await expect(gemma).to_contain_text("4,096 tokens")
        await expect(gemma).to_contain_text(CHAT_TOOL)
        qwen = page.locator("#models tr", has_text=QWEN)
        await expect(qwen).to_contain_text("not loaded")
        await expect(qwen).to_contain_text("32,768 tokens")
        # Where each model is, with its calls in flight and slots (bridge b is down; it never listed any).
        await expect(where(gemma)).to_have_count(1)
        await expect(where(gemma)).to_have_text(re.compile(rf"127\.0\.0\.1:{port_a}\s*loaded\s*0 in flight · 4 slots"))
        await expect(bridges.nth(0)).to_contain_text("0 in flight")
        await expect(page.locator("#models tr", has_text=EMBED_MODEL)).to_contain_text("embedding")
        await expect(page.locator("#stats")).to_contain_text("Latency p50")
        await expect(page.locator("#usage")).to_contain_text("No call has reached a model")
        assert await page.locator("#usage-chart path").count() == 0

        async with serve(fake_b.app, port=lmstudio_b):
            # LM Studio comes up behind bridge b: the page follows without a reload.
            await expect(bridges.nth(1)).to_contain_text("healthy", timeout=15_000)
            await expect(page.locator("#notices")).to_be_empty()
            await expect(where(gemma)).to_have_count(2, timeout=15_000)
            await expect(where(gemma).nth(1)).to_contain_text(f"127.0.0.1:{port_b}")
            ministral = page.locator("#models tr", has_text=MINISTRAL)
            await expect(ministral).to_contain_text("8,192 tokens")
            # Qwen is loaded on b (2 slots) and not on a: each line says so.
            await expect(qwen.locator("td[data-label=Loaded]")).to_have_text("loaded")
            await expect(where(qwen).nth(0)).to_contain_text(f"127.0.0.1:{port_a}")
            await expect(where(qwen).nth(0)).to_contain_text("not loaded")
            await expect(where(qwen).nth(0)).to_contain_text("4 slots")
            await expect(where(qwen).nth(1)).to_have_text(
                re.compile(rf"127\.0\.0\.1:{port_b}\s*loaded\s*0 in flight · 2 slots"))

            # A chat tool's answer streams in piece by piece.
            words = [word + " " for word in ANSWER.split(" ")]
            for fake in (fake_a, fake_b):
                fake.chunk_text, fake.chunk_delay = words, 0.05
            await page.get_by_label("Chat tool").select_option(CHAT_TOOL)
            await page.get_by_label("Prompt").fill(QUESTION)
            await page.get_by_role("button", name="Run").click()
            answer = page.locator("#answer")
            await expect(answer).to_contain_text("A gateway puts one")
            partial = await answer.text_content() or ""
            assert 0 < len(partial) < len(ANSWER) and "generated." not in partial
            assert await page.locator("#play-title").evaluate("n => n.closest('section').dataset.state") == "running"
            await expect(page.locator("#play-status")).to_have_text("Done.", timeout=20_000)
            assert (await answer.text_content() or "").strip() == ANSWER
            await expect(page.locator("#answer-meta")).to_contain_text("finished: stop")
            # The call shows in the usage table, by key name and model, and as this minute's bar.
            usage = page.locator("#usage tr", has_text=CHAT_MODEL)
            await expect(usage).to_have_count(1, timeout=10_000)
            prompt_words = len(QUESTION.split())
            for label, value in (("Key", "tester"), ("Calls", "1"), ("Prompt tokens", str(prompt_words)),
                                 ("Completion tokens", str(len(words)))):
                await expect(usage.locator(f'td[data-label="{label}"]')).to_have_text(value)
            for series in ("prompt", "completion"):
                bar = page.locator(f"#usage-chart path.{series}")
                await expect(bar).to_have_attribute("d", re.compile(r"^M[\d.]+,[\d.]+V[\d.]+h[\d.]+V[\d.]+Z$"))
                box = await bar.bounding_box()
                assert box is not None and box["height"] > 0 and box["width"] > 0, series
            await expect(page.locator("#usage-peak")).to_contain_text(f"{prompt_words + len(words)} in the hour")
            await page.wait_for_timeout(3_500)  # one refresh, so the traffic numbers include the call
            laptop = await screenshot(page, "dashboard-laptop.png")
            if os.environ.get("LLM_HUB_UPDATE_SCREENSHOT") == "1":
                README_SCREENSHOT.parent.mkdir(exist_ok=True)
                shutil.copyfile(laptop, README_SCREENSHOT)

            # On a phone (here in dark mode) the page fits the width, its tables laid out as labelled rows.
            phone = await open_page(browser, gateway, errors, viewport=PHONE, is_mobile=True, has_touch=True,
                                    device_scale_factor=2, color_scheme="dark")
            await sign_in(phone, KEY)
            await expect(phone.locator("#models tr", has_text=CHAT_MODEL)).to_contain_text("4,096 tokens")
            assert await phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            await screenshot(phone, "dashboard-phone.png", full_page=False)
            await screenshot(phone, "dashboard-phone-full.png")

            # Stop mid-stream: the page says so, and LM Studio sees its request abandoned.
            for fake in (fake_a, fake_b):
                fake.chunk_text = [f"w{i} " for i in range(400)]
            await page.get_by_role("button", name="Run").click()
            await expect(answer).to_contain_text("w5 ")
            # While it streams, the bridge serving it counts it against gemma's slots there.
            await expect(gemma.locator('td[data-label="Where"]')).to_contain_text("1 in flight · 4 slots", timeout=10_000)
            await expect(page.locator("#bridges")).to_contain_text("1 in flight")
            await page.get_by_role("button", name="Stop").click()
            await expect(page.locator("#play-status")).to_contain_text("Stopped")
            with anyio.fail_after(10):
                while fake_a.disconnects + fake_b.disconnects == 0:
                    await anyio.sleep(0.05)
            stopped_at = await answer.text_content() or ""
            await page.wait_for_timeout(500)
            assert await answer.text_content() == stopped_at and "w399" not in stopped_at
            await expect(page.get_by_role("button", name="Run")).to_be_enabled()
            async with httpx2.AsyncClient(headers=AUTH) as http:
                with anyio.fail_after(10):
                    while (await http.get(f"{gateway}/v1/stats")).json()["tool_calls"]["cancelled"] < 1:
                        await anyio.sleep(0.1)
            await screenshot(page, "dashboard-stopped.png")

        # LM Studio b went away: Ministral, served only there, stays listed, marked unavailable with why.
        await expect(ministral.locator("td[data-label=Loaded]")).to_have_text("unavailable", timeout=15_000)
        reason = ministral.locator(".reason p")
        await expect(reason).to_be_hidden()  # one click away: it names every bridge's last error
        await ministral.get_by_text("Why unavailable?").click()
        await expect(reason).to_be_visible()
        await page.wait_for_timeout(3_500)
        await expect(reason).to_be_visible()  # it stays open across a refresh
        await expect(reason).to_contain_text(f"127.0.0.1:{port_b}: health check answered 503")
        await expect(reason).to_contain_text("LM Studio is not reachable")
        await expect(ministral.locator(".chip.off")).to_contain_text("(unavailable)")
        await expect(where(ministral)).to_have_text(re.compile(rf"127\.0\.0\.1:{port_b}\s*down"))
        await expect(where(gemma).nth(1)).to_contain_text("down")
        await expect(gemma.locator("td[data-label=Loaded]")).to_have_text("loaded")  # a still serves it

        # Then bridge a dies: no bridge is healthy, and the page says so.
        bridge_a.kill()
        await bridge_a.wait()
        await expect(page.locator("#notices")).to_contain_text("No bridge is healthy", timeout=15_000)
        await expect(page.locator("#health")).to_contain_text("unavailable")
        # The embedding model's tool, whose only bridge was a, is still listed: unavailable, and why.
        embed = page.locator("#models tr", has_text=EMBED_MODEL)
        await expect(embed.locator("td[data-label=Loaded]")).to_have_text("unavailable", timeout=15_000)
        await embed.get_by_text("Why unavailable?").click()
        await expect(embed.locator(".reason p")).to_contain_text(
            f"Bridges that have it: 127.0.0.1:{port_a}: health check failed")
        await expect(embed.locator(".chip.off")).to_contain_text("(unavailable)")
        await expect(where(embed)).to_have_text(re.compile(rf"127\.0\.0\.1:{port_a}\s*down"))
        await expect(page.get_by_label("Chat tool")).to_contain_text(f"{CHAT_TOOL} (unavailable)")
        await expect(page.get_by_role("button", name="Run")).to_be_disabled()
        async with httpx2.AsyncClient(headers=AUTH) as http:
            listed = {m["id"]: m for m in (await http.get(f"{gateway}/v1/dashboard/models")).json()["models"]}
        assert listed[EMBED_MODEL]["available"] is False and listed[EMBED_MODEL]["type"] == "embedding"
        assert f"127.0.0.1:{port_a}" in listed[EMBED_MODEL]["unavailable_reason"]
        await screenshot(page, "dashboard-no-bridges.png")

    assert not errors, errors

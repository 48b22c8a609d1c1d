"""The status page in a real headless Chromium (Debian's `chromium`, driven by Playwright with
the system browser; scripts/test installs it): every model shows with its state, Sleep puts the
engine to sleep and the row changes without a reload, the admin token is asked for on a 401 and
kept in the tab's session storage only. Each test saves a screenshot and prints its path."""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.kvsleep_harness import FAST_RETRY, config_doc, sim_model, start_kvsleep
from tests.test_engine_faults import arm, calls, post

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000  # a bound on waiting for the page, not an expected duration


@pytest.fixture
async def browser() -> AsyncIterator[object]:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} missing: scripts/test installs Debian's chromium")
        pytest.skip("no system Chromium (apt-get install chromium)")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


def row(name: str) -> str:
    return f'#models tr[data-model="{name}"]'


async def test_page_shows_every_model_and_sleep_changes_the_row_without_reload(
    browser, sim_factory, tmp_path
):
    llama = await sim_factory("vllm", "meta-llama/Llama-3.2-1B")
    qwen = await sim_factory("sglang", "Qwen/Qwen3-0.6B")
    kv = await start_kvsleep(
        config_doc(
            [sim_model(llama, memory_gb=30, gpus=[0]), sim_model(qwen, memory_gb=20, gpus=[0])],
            tmp_path,
            gpus=[{"id": 0, "memory_gb": 80}],
        )
    )
    try:
        page = await browser.new_page(viewport={"width": 1280, "height": 560})
        errors: list[str] = []  # script errors and CSP refusals show up here
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{kv.url}/")
        # The script has redrawn the table from /sleep/status at least once.
        await expect(page.locator("#updated")).not_to_have_text("at load", timeout=WAIT_MS)
        for name, engine in (("meta-llama/Llama-3.2-1B", "vllm"), ("Qwen/Qwen3-0.6B", "sglang")):
            assert await page.inner_text(f"{row(name)} td.model") == name
            assert await page.inner_text(f"{row(name)} .state") == "awake"
            assert await page.inner_text(f"{row(name)} td:nth-child(3)") == engine
        assert await page.inner_text(".gpu-text") == "50 / 80 GB committed"
        assert await page.get_attribute("nav a[href='metrics']", "href") == "metrics"

        await page.evaluate("window.notReloaded = true")
        await page.click(f"{row('meta-llama/Llama-3.2-1B')} button[data-action=sleep]")
        await page.wait_for_selector(
            f"{row('meta-llama/Llama-3.2-1B')}[data-state=asleep]", timeout=WAIT_MS
        )
        assert await page.evaluate("window.notReloaded") is True
        assert await page.inner_text(f"{row('meta-llama/Llama-3.2-1B')} .state") == "asleep"
        assert await page.inner_text(f"{row('Qwen/Qwen3-0.6B')} .state") == "awake"
        assert await page.inner_text(".gpu-text") == "20 / 80 GB committed"
        shot = tmp_path / "status-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        assert errors == []
    finally:
        await kv.close()
    stats = llama.sim.stats()
    assert stats["state"] == "asleep"
    assert stats["calls"]["/sleep"] == 1
    assert not stats["hazards"]
    assert qwen.sim.stats()["calls"].get("/release_memory_occupation", 0) == 0


async def test_page_asks_for_the_admin_token_and_keeps_it_in_session_storage(
    browser, sim_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("KVSLEEP_PAGE_TOKEN", "page-s3cret")
    sim = await sim_factory("sglang", "org/m")
    kv = await start_kvsleep(
        config_doc([sim_model(sim)], tmp_path, router={"admin_token_env": "KVSLEEP_PAGE_TOKEN"})
    )
    prompts: list[str] = []

    async def answer(dialog) -> None:
        prompts.append(dialog.message)
        await dialog.accept("page-s3cret")

    try:
        assert await kv.manager.put_model_to_sleep("org/m", manual=True)
        page = await browser.new_page(viewport={"width": 1280, "height": 400})
        page.on("dialog", answer)
        await page.goto(f"{kv.url}/")
        assert await page.inner_text(f"{row('org/m')} .state") == "asleep"
        await page.click(f"{row('org/m')} button[data-action=wake]")
        await page.wait_for_selector(f"{row('org/m')}[data-state=awake]", timeout=WAIT_MS)
        assert len(prompts) == 1 and "token" in prompts[0]
        assert await page.evaluate("sessionStorage.getItem('kvsleep.adminToken')") == (
            "page-s3cret"
        )
        assert await page.evaluate("localStorage.length") == 0
        # The next action uses the kept token without asking again.
        await page.click(f"{row('org/m')} button[data-action=sleep]")
        await page.wait_for_selector(f"{row('org/m')}[data-state=asleep]", timeout=WAIT_MS)
        assert len(prompts) == 1
        shot = tmp_path / "status-page-token.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
    finally:
        await kv.close()
    calls = sim.sim.stats()["calls"]
    assert calls["/resume_memory_occupation"] == 1
    assert calls["/release_memory_occupation"] == 2


async def test_logs_link_shows_and_follows_a_launched_engines_log(browser, tmp_path, monkeypatch):
    from kvsleep.web import operator_routes
    from tests.test_operator_routes import launch, launched_doc

    monkeypatch.setattr(operator_routes, "FOLLOW_POLL_SECONDS", 0.05)
    doc = launched_doc(tmp_path)
    kv = await start_kvsleep(doc)
    launcher = await launch(kv.server, doc)
    try:
        page = await browser.new_page(viewport={"width": 1280, "height": 600})
        await page.goto(f"{kv.url}/")
        assert await page.locator(f"{row('org/attached')} a.logs").count() == 0
        await page.click(f"{row('org/launched')} a.logs")
        await expect(page.locator("#log-text")).to_contain_text("kvsleep starting", timeout=WAIT_MS)
        assert await page.evaluate("location.pathname") == "/"  # a dialog, not a navigation
        await page.check("#log-follow")
        await expect(page.locator("#log-text")).to_contain_text("kvsleep starting", timeout=WAIT_MS)
        with launcher.engines["org/launched"].log_file.open("ab") as out:
            out.write(b"a line written <b>while</b> following\n")
        await expect(page.locator("#log-text")).to_contain_text(
            "a line written <b>while</b> following", timeout=WAIT_MS
        )
        assert await page.locator("#log-text b").count() == 0  # shown as text, never as HTML
        shot = tmp_path / "status-page-logs.png"
        await page.screenshot(path=str(shot), full_page=True)
        print(f"screenshot: {shot}")
        await page.click("#log-close")
    finally:
        await launcher.stop()
        await kv.close()


async def test_a_model_in_state_unknown_is_adopted_from_the_page_and_then_serves(
    browser, sim_factory, tmp_path, monkeypatch
):
    """An SGLang resume that hangs past the wake timeout leaves the model `unknown` (the resume
    may have happened). The page shows that state apart from the others, with the reason, and
    offers only there the operator's two answers; "Engine is asleep" (confirmed, token asked for)
    makes it asleep, and the next request wakes it and is served."""
    monkeypatch.setenv("KVSLEEP_PAGE_TOKEN", "adopt-s3cret")
    sim = await sim_factory("sglang", "org/m")
    other = await sim_factory("vllm", "org/other")
    retry = dataclasses.replace(FAST_RETRY, wake_timeout_seconds=0.3)
    kv = await start_kvsleep(
        config_doc(
            [sim_model(sim), sim_model(other)],
            tmp_path,
            router={"admin_token_env": "KVSLEEP_PAGE_TOKEN"},
        ),
        retry=retry,
    )
    dialogs: list[tuple[str, str]] = []

    async def answer(dialog) -> None:
        dialogs.append((dialog.type, dialog.message))
        await (dialog.accept("adopt-s3cret") if dialog.type == "prompt" else dialog.accept())

    try:
        assert await kv.manager.put_model_to_sleep("org/m", manual=True)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            await arm(session, sim.url, hang={"wake": 1})
            status, _, _ = await post(
                session, kv.url + "/v1/completions", {"model": "org/m", "prompt": "x"}
            )
            assert status == 503
            assert kv.state("org/m") == "unknown"

            page = await browser.new_page(viewport={"width": 1280, "height": 400})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("dialog", answer)
            await page.goto(f"{kv.url}/")
            await expect(page.locator("#updated")).not_to_have_text("at load", timeout=WAIT_MS)
            m, o = row("org/m"), row("org/other")
            assert await page.get_attribute(m, "data-state") == "unknown"
            assert await page.inner_text(f"{m} .state") == "unknown"
            # Apart from every other state: a filled badge on a tinted row.
            badge = await page.eval_on_selector(
                f"{m} .state", "e => getComputedStyle(e).backgroundColor"
            )
            assert badge not in ("rgba(0, 0, 0, 0)", "transparent")
            cell = await page.eval_on_selector(
                f"{m} td.model", "e => getComputedStyle(e).backgroundColor"
            )
            plain = await page.eval_on_selector(
                f"{o} td.model", "e => getComputedStyle(e).backgroundColor"
            )
            assert cell != plain
            assert "resume" in await page.inner_text(f"{m} td.error")
            assert await page.is_disabled(f"{m} button[data-action=sleep]")
            assert await page.is_disabled(f"{m} button[data-action=wake]")
            assert await page.locator(f"{m} button[data-action=adopt]").all_inner_texts() == [
                "Engine is asleep",
                "Engine is awake",
            ]
            assert await page.locator(f"{o} button[data-action=adopt]").count() == 0
            shot = tmp_path / "status-page-unknown.png"
            await page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot: {shot}")

            await page.evaluate("window.notReloaded = true")
            await page.click(f"{m} button[data-adopt=asleep]")
            await page.wait_for_selector(f"{m}[data-state=asleep]", timeout=WAIT_MS)
            assert await page.evaluate("window.notReloaded") is True
            assert [kind for kind, _ in dialogs] == ["confirm", "prompt"]
            assert "org/m" in dialogs[0][1] and "asleep" in dialogs[0][1]
            assert await page.locator(f"{m} button[data-action=adopt]").count() == 0
            assert calls(sim, "/resume_memory_occupation") == 1  # adopting calls nothing

            status, _, _ = await post(
                session, kv.url + "/v1/completions", {"model": "org/m", "prompt": "x"}
            )
            assert status == 200
            await page.wait_for_selector(f"{m}[data-state=awake]", timeout=WAIT_MS)
            assert await page.inner_text(f"{m} td.error") == ""
            # The browser logs the 401 that asked for the token; nothing else went wrong.
            assert [e for e in errors if "401 (Unauthorized)" not in e] == []
    finally:
        await kv.close()
    stats = sim.sim.stats()
    assert stats["calls"]["/resume_memory_occupation"] == 2
    assert stats["hazards"] == {} and stats["requests"]["served_while_not_awake"] == 0

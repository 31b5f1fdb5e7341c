"""Debian's headless Chromium, driven by Playwright, looking at the chat page as a person would."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from playwright.async_api import ConsoleMessage, Error, Locator, Page, Request, async_playwright, expect

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = Path(os.environ.get("FLUSHGATE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CHAT_PATH = "/v1/chat/completions"
WAIT_MS = 30_000  # Playwright's default of 5 s is short for a loaded 2-core machine; a pass is still immediate

expect.set_options(timeout=WAIT_MS)


@dataclass
class ChatPage:
    """The page plus what it did: script errors, console errors and the chat requests it sent."""

    page: Page
    errors: list[str] = field(default_factory=list)
    chat_requests: list[dict[str, Any]] = field(default_factory=list)

    async def open(self, base_url: str) -> None:
        """Load the page and wait until the model picker has the engine's models."""
        await self.page.goto(base_url + "/")
        await expect(self.page.locator("#model option").first).to_be_attached()

    async def ask(self, text: str) -> Locator:
        """Send ``text``; returns the new answer's element."""
        before = await self.page.locator(".message.assistant").count()
        await self.page.fill("#prompt", text)
        await self.page.click("#send")
        answer = self.page.locator(".message.assistant").nth(before)
        await expect(answer).to_be_attached()
        return answer

    async def wait_finished(self, answer: Locator, state: str = "done", timeout_s: float = 120) -> None:
        await expect(answer).to_have_attribute("data-state", state, timeout=timeout_s * 1000)

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path

    def _on_request(self, request: Request) -> None:
        if request.method == "POST" and request.url.endswith(CHAT_PATH) and request.post_data is not None:
            self.chat_requests.append(orjson.loads(request.post_data))

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def _on_page_error(self, error: Error) -> None:
        self.errors.append(f"page error: {error}")


def chromium() -> Path:
    if not CHROMIUM.is_file():
        raise AssertionError(f"{CHROMIUM} is missing; `make browser-deps` installs Debian's chromium")
    return CHROMIUM


@asynccontextmanager
async def chat_page(user_data_dir: Path) -> AsyncIterator[ChatPage]:
    """A fresh Chromium profile in ``user_data_dir`` with one page, closed afterwards."""
    executable = chromium()
    async with async_playwright() as playwright:
        context = await playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=str(executable),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1100, "height": 760},
        )
        try:
            context.set_default_timeout(WAIT_MS)
            page = context.pages[0] if context.pages else await context.new_page()
            chat = ChatPage(page)
            page.on("request", chat._on_request)
            page.on("console", chat._on_console)
            page.on("pageerror", chat._on_page_error)
            yield chat
        finally:
            await context.close()

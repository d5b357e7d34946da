"""The dashboard in a real headless browser (Debian's chromium, driven by Playwright; no browser download) over the
real stack: gateway, trainer and sampler workers, the faust metrics part, Tansu and moto S3, a tiny model trained
through the tinker SDK. A loss curve must gain points while the model trains, and a key sees only its tenant.

Set TINKER_BUS_DASHBOARD_SCREENSHOT=PATH to keep the screenshot (docs/img/dashboard.png comes from this test).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import tinker
from gateway_stack import STACK_CONFIG, in_thread, running_stack
from playwright.async_api import Page, async_playwright
from test_gateway_sdk_e2e import SENTENCES, datum
from test_metrics_stream import metrics_part
from tinker import types

from bus_runtime.settings import BusSettings

pytest_plugins = ["gateway_support", "gateway_stack"]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEYS = {"tml-alice": "alice", "tml-bob": "bob"}
LOSS_CHART = '.chart[data-series="loss:sum"]'


class Trainer:
    """A LoRA training client of alice's, stepped on demand from the test (the SDK blocks: run it in a thread)."""

    def __init__(self, url: str, base_model: str):
        service = tinker.ServiceClient(base_url=url, api_key="tml-alice")
        self.training = service.create_lora_training_client(base_model=base_model, rank=8).result()
        tokenizer = self.training.get_tokenizer()
        self.batch = [datum(tokenizer(s)["input_ids"]) for s in SENTENCES]

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.training.forward_backward(self.batch, "cross_entropy").result()
            self.training.optim_step(types.AdamParams(learning_rate=1e-2)).result()


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[Page]:
    assert shutil.which(CHROMIUM), f"{CHROMIUM} missing: apt-get install chromium (.ci/run does)"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 860})
            yield page
        finally:
            await browser.close()


async def points_of(page: Page, selector: str) -> int:
    handle = await page.query_selector(selector)
    return int(await handle.get_attribute("data-points")) if handle is not None else 0


async def wait_points(page: Page, selector: str, at_least: int, timeout_s: float = 90) -> int:
    for _ in range(int(timeout_s * 4)):
        count = await points_of(page, selector)
        if count >= at_least:
            return count
        await asyncio.sleep(0.25)
    raise AssertionError(f"{selector} has {await points_of(page, selector)} points, never {at_least}:\n"
                         f"{await page.inner_text('body')}")


async def test_dashboard_curve_grows_live_in_chromium(stack_settings: BusSettings, tiny_model: str,
                                                      tmp_path: Path) -> None:
    async with running_stack(stack_settings, STACK_CONFIG, KEYS) as url, metrics_part(stack_settings), \
            browser_page() as page, httpx.AsyncClient(base_url=url, timeout=30) as http:
        trainer = await in_thread(Trainer, url, tiny_model)
        await in_thread(trainer.steps, 2)

        await page.goto(f"{url}/dashboard")
        await page.fill("#api-key", "tml-alice")
        await page.click("#key-form button")
        before = await wait_points(page, LOSS_CHART, 2)
        await in_thread(trainer.steps, 3)
        after = await wait_points(page, LOSS_CHART, before + 3)  # the same page, no reload: live updates
        assert after >= before + 3
        body = await page.inner_text("body")
        assert trainer.training.model_id in body
        assert re.search(r"trainer\s+healthy", body) and re.search(r"metrics\s+healthy", body), body
        shot = Path(os.environ.get("TINKER_BUS_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        await page.screenshot(path=str(shot))  # the viewport: services, queues, models, the first curves
        assert shot.stat().st_size > 10_000

        # tenant scope: bob's key sees neither alice's model nor its curves
        bob = {"X-API-Key": "tml-bob"}
        assert (await http.get("/dashboard/api/overview", headers=bob)).json()["models"] == []
        model_id = trainer.training.model_id
        assert (await http.get(f"/dashboard/api/models/{model_id}", headers=bob)).status_code == 404
        assert (await http.get("/dashboard/api/overview", headers={"X-API-Key": "tml-nobody"})).status_code == 401
        alice = (await http.get(f"/dashboard/api/models/{model_id}", headers={"X-API-Key": "tml-alice"})).json()
        assert len(alice["series"]["loss:sum"]) == after and alice["counts"]["tokens"] > 0

        # Prometheus: the gateway's own port, and the trainer's port as its heartbeat lists it
        gateway_metrics = (await http.get("/metrics")).text
        assert re.search(r'tinker_bus_gateway_http_requests_total\{method="POST",route="/api/v1/forward_backward",'
                         r'status="200"\} [1-9]', gateway_metrics), gateway_metrics
        assert re.search(r"tinker_bus_gateway_auth_failures_total [1-9]", gateway_metrics)
        assert re.search(r'tinker_bus_gateway_produce_seconds_count\{topic="train"\} [1-9]', gateway_metrics)
        health = (await http.get("/healthz")).json()
        trainer_url = health["components"]["trainer"]["detail"][0]["metrics_url"]
        trainer_metrics = (await http.get(trainer_url)).text
        assert re.search(r'tinker_bus_trainer_events_applied_total\{outcome="ok",type="forward_backward"\} '
                         r'([5-9]|\d\d)', trainer_metrics), trainer_metrics
        assert re.search(r"tinker_bus_trainer_tokens_total [1-9]", trainer_metrics)
        assert 'tinker_bus_trainer_queue_depth_events{partition="' in trainer_metrics

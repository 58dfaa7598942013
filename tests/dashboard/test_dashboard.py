"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright;
no browser download) against the real stack: API, beat and a worker on Postgres, Redis and S3.

One scenario, as a user goes through it: sign in, upload a dataset and a bad file, start a job
on the tiny model from the form, watch it succeed live, download the adapter, cancel a second
job, then every page at phone width. Screenshots of each page go to tests/artifacts/."""

from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests import services
from tests.harness import ROOT, addition_rows, jsonl
from tests.jobs.conftest import ServiceStack, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
VENDOR = ROOT / "api" / "static" / "vendor" / "uPlot.esm.js"
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
STEPS = 16  # the watched job: long enough to see the chart grow, short on 2 busy cores
# Each page at phone width, and what shows once it has loaded.
PAGES = {
    "jobs": "table.jobs",
    "new": '#estimate[data-state="ok"]',
    "datasets": "table.files",
    "adapters": "table.adapters",
}
# What Chromium itself logs for a 4xx answer: expected only where the test provokes one.
HTTP_ERROR = re.compile(r"^console\.error: Failed to load resource: .* status of (400|401) ")


def _browser_or_skip() -> str:
    browser = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        browser = None
    if browser is None:
        if services.REQUIRE_SERVICES:
            pytest.fail("REQUIRE_SERVICES=1 but chromium or playwright is missing (.ci/run, make)")
        pytest.skip("chromium or the playwright package is not installed; browser test skipped")
    if not VENDOR.exists():
        pytest.fail(f"{VENDOR.relative_to(ROOT)} is missing: run `make assets`")
    return browser


@pytest.fixture(scope="module")
def worker(stack: ServiceStack) -> Iterator[None]:
    proc = stack.start_worker()
    yield
    stop(proc)


class Watch:
    """What the page did: console errors, uncaught exceptions, and every URL it asked for.

    Chromium logs every 4xx answer as a console error; `provoking(n)` is where the test asks
    for `n` of them on purpose (a wrong key, a bad file, a bad rank)."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.urls: list[str] = []
        self.provoked: list[str] = []
        self.expecting = False

    def attach(self, page: Any) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("request", lambda r: self.urls.append(r.url))
        # Hash changes too (a request's URL has no fragment): the key must not be there either.
        page.on("framenavigated", lambda frame: self.urls.append(frame.url))

    def _console(self, message: Any) -> None:
        if message.type not in ("error", "assert"):
            return
        text = f"console.{message.type}: {message.text}"
        if self.expecting and HTTP_ERROR.match(text):
            self.provoked.append(text)
        else:
            self.errors.append(text)

    @contextmanager
    def provoking(self, page: Any, count: int) -> Iterator[None]:
        before = len(self.provoked)
        self.expecting = True
        try:
            yield
            deadline = time.monotonic() + 10
            while len(self.provoked) - before < count and time.monotonic() < deadline:
                page.wait_for_timeout(50)
        finally:
            self.expecting = False
        assert len(self.provoked) - before == count, self.provoked[before:]


# Feeds `JobCharts` step events as the worker writes them: an SFT run's (token accuracy, no
# preference figures) and a DPO run's; answers the DPO and loss charts' point counts.
DPO_CHARTS = """async () => {
  const { JobCharts } = await import("/static/js/charts.js");
  const out = {};
  for (const [name, extra] of [
    ["sft", { mean_token_accuracy: 0.4 }],
    ["dpo", { reward_margin: 0.2, preference_accuracy: 0.75, chosen_reward: 0.1 }],
  ]) {
    const box = document.createElement("div");
    document.body.append(box);
    const charts = new JobCharts(box);
    for (const step of [1, 2]) {
      charts.add({ step, loss: 0.7 / step, lr: 1e-4, tokens_per_second: 50, ...extra });
    }
    charts.add({ step: 2, eval_loss: 0.6, mean_token_accuracy: 0.5 });
    charts.draw();
    const dpo = box.querySelector("#chart-dpo");
    out[name] = [dpo ? dpo.dataset.points : null, box.querySelector("#chart-loss").dataset.points];
    charts.destroy();
    box.remove();
  }
  return out;
}"""


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def no_horizontal_overflow(page: Any) -> None:
    width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide in a {width[1]} px window"


def fast_knobs(page: Any, *, max_steps: int) -> None:
    """The form's fields for a short run on the tiny model (FAST_SPEC's values)."""
    page.get_by_label("LoRA rank (r)").fill("8")
    page.get_by_label("Learning rate").fill("0.002")
    page.get_by_label("Max sequence length (tokens)").fill("64")
    page.locator("details summary").click()
    page.get_by_label("Max steps (overrides epochs)").fill(str(max_steps))
    page.get_by_label("Gradient accumulation steps").fill("1")
    page.get_by_label("Checkpoint every N steps").fill(str(STEPS // 2))
    page.get_by_label("Compute dtype").select_option("float32")


def test_a_user_drives_a_job_from_the_dashboard(
    stack: ServiceStack, worker: None, tmp_path: Path
) -> None:
    browser_path = _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    headers = stack.new_tenant("dashboard")
    key = headers["Authorization"][7:]
    origin = stack.url
    watch = Watch()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=["--disable-gpu"])
        context = browser.new_context(viewport=DESKTOP, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        expect.set_options(timeout=20_000)  # two busy cores: patience, not sleeps
        watch.attach(page)
        page.on("dialog", lambda d: d.accept())
        try:
            # ---- the page's headers: a strict CSP, no sniffing, no framing
            response = page.goto(f"{origin}/")
            assert response is not None and response.ok
            csp = response.headers["content-security-policy"]
            for directive in ("script-src 'self'", "frame-ancestors 'none'", "connect-src 'self'"):
                assert directive in csp
            assert "unsafe-inline" not in csp and "http" not in csp
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["x-frame-options"] == "DENY"

            # ---- sign in: the key goes to session storage, never into the URL
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            shot(page, "sign-in-1280")
            page.get_by_label("API key").fill("qlsk-not-a-key")
            with watch.provoking(page, 1):
                page.get_by_role("button", name="Sign in").click()
                expect(page.locator(".form-error")).to_contain_text("not accepted")
            page.get_by_label("API key").fill(key)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("heading", name="Jobs", exact=True)).to_be_visible()
            assert page.evaluate("() => sessionStorage.getItem('qlora.apiKey')") == key
            expect(page.locator("table.jobs tr.empty")).to_be_visible()

            # ---- datasets: an upload with its progress bar and stats, then a bad file
            page.get_by_role("link", name="Datasets").click()
            good = jsonl(addition_rows(160, seed=7))
            page.get_by_label("JSONL file").set_input_files(
                {"name": "addition.jsonl", "mimeType": "application/jsonl", "buffer": good}
            )
            page.get_by_role("button", name="Upload").click()
            expect(page.locator("#upload-result .ok-box")).to_contain_text("160 rows")
            bar = page.get_by_role("progressbar", name="Upload progress")
            assert bar.get_attribute("aria-valuenow") == bar.get_attribute("aria-valuemax")
            row = page.locator("table.files tbody tr", has_text="addition.jsonl")
            expect(row).to_contain_text("prompt_completion")
            expect(row).to_contain_text("160")
            bad = b'{"prompt": "1+1=", "completion": "2"}\n{"prompt": "oops"\n{"text": 3}\n'
            page.get_by_label("JSONL file").set_input_files(
                {"name": "broken.jsonl", "mimeType": "application/jsonl", "buffer": bad}
            )
            with watch.provoking(page, 1):
                page.get_by_role("button", name="Upload").click()
                problems = page.locator("#upload-errors")
                expect(problems).to_be_visible()
            first = problems.locator("tbody tr").first
            expect(first.locator("td").first).to_have_text("2")
            expect(problems).to_contain_text("not valid JSONL")
            expect(problems.locator("tbody tr").nth(1)).to_contain_text("'text' must be a string")
            expect(page.locator("table.files tbody tr")).to_have_count(1)  # nothing recorded
            shot(page, "datasets-1280")
            no_horizontal_overflow(page)

            # ---- new job: the estimate follows the form
            page.get_by_role("link", name="New job", exact=True).first.click()
            expect(page.get_by_label("Base model")).to_have_value("tiny-llama")
            estimate = page.locator("#estimate")
            expect(estimate).to_have_attribute("data-state", "ok")
            expect(estimate).to_contain_text("Fits a")
            expect(estimate).to_contain_text("optimizer")  # the parts, not just the total
            fast_knobs(page, max_steps=STEPS)
            page.wait_for_timeout(600)  # past the form's debounce
            expect(estimate).to_have_attribute("data-state", "ok")
            before = estimate.inner_text()
            page.get_by_label("LoRA rank (r)").fill("64")
            page.wait_for_function(
                "(before) => { const e = document.getElementById('estimate');"
                " return e.dataset.state === 'ok' && e.innerText !== before; }",
                arg=before,
            )
            with watch.provoking(page, 1):
                page.get_by_label("LoRA rank (r)").fill("0")
                expect(estimate).to_have_attribute("data-state", "error")
            expect(page.get_by_label("LoRA rank (r)")).to_have_attribute("aria-invalid", "true")
            page.get_by_label("LoRA rank (r)").fill("8")
            expect(estimate).to_have_attribute("data-state", "ok")
            page.get_by_label("Name suffix (optional)").fill("dash")
            shot(page, "new-job-1280")
            no_horizontal_overflow(page)
            page.get_by_role("button", name="Start fine-tuning").click()
            page.wait_for_url("**/#/jobs/ftjob-*")
            job_id = page.url.rsplit("/", 1)[1]

            # ---- the job page follows the run live: no reload, the chart gains points
            page.evaluate("() => { window.__sameDocument = true; }")
            chart = page.locator("#chart-loss")
            seen: set[int] = set()
            deadline = time.monotonic() + 180
            while page.locator("#job-status .badge").inner_text() != "succeeded":
                assert time.monotonic() < deadline, stack.tail_logs()
                seen.add(int(chart.get_attribute("data-points") or "0"))
                page.wait_for_timeout(100)
            expect(page.locator("#job-status .badge")).to_have_text("succeeded")
            final = int(chart.get_attribute("data-points") or "0")
            seen.add(final)
            assert page.evaluate("() => window.__sameDocument === true")
            assert final >= 2 and len(seen) >= 3, f"points seen while training: {sorted(seen)}"
            job = stack.job(headers, job_id)
            assert job["status"] == "succeeded" and job["qlora"]["rank"] == 8
            assert job["qlora"]["max_steps"] == STEPS and job["user_provided_suffix"] == "dash"
            metric_events = [
                e for e in stack.events(headers, job_id) if (e["data"] or {}).get("loss")
            ]
            assert final == len(metric_events)  # every recorded step, each once
            expect(page.locator("#job-progress")).to_contain_text(f"Step {STEPS} of {STEPS}")
            expect(page.locator("#chart-throughput")).to_have_attribute("data-points", str(final))
            expect(page.locator("#event-log")).to_contain_text("succeeded")
            expect(page.get_by_role("heading", name="Hyperparameters")).to_be_visible()
            expect(page.locator("#job-estimate")).to_contain_text("GPU class")
            checkpoints = page.get_by_role("button", name=re.compile(r"Download checkpoint at"))
            expect(checkpoints.first).to_be_visible()
            shot(page, "job-1280")
            no_horizontal_overflow(page)

            # ---- download the adapter: a gzip'd PEFT folder
            with page.expect_download() as info:
                page.get_by_role("button", name="Download adapter").click()
            archive = Path(info.value.path()).read_bytes()
            with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
                names = tar.getnames()
            assert any(n.endswith("adapter_config.json") for n in names), names
            assert any(n.endswith("adapter_model.safetensors") for n in names), names

            # ---- a second job: paused, resumed, then cancelled from its page
            page.get_by_role("link", name="New job", exact=True).first.click()
            expect(estimate).to_have_attribute("data-state", "ok")
            fast_knobs(page, max_steps=5000)
            page.get_by_role("button", name="Start fine-tuning").click()
            page.wait_for_url("**/#/jobs/ftjob-*")
            second = page.url.rsplit("/", 1)[1]
            assert second != job_id
            # the list moves a running job's bar on its own (its SSE stream)
            page.get_by_role("link", name="Jobs", exact=True).click()
            steps = page.locator(f'tr[data-id="{second}"] .steps')
            expect(steps).to_contain_text("/ 5000", timeout=60_000)
            shown = {steps.inner_text()}
            deadline = time.monotonic() + 60
            while len(shown) < 3:
                assert time.monotonic() < deadline, f"the bar did not move: {shown}"
                page.wait_for_timeout(100)
                shown.add(steps.inner_text())
            expect(page.locator(f'tr[data-id="{second}"][data-streamed-step]')).to_have_count(1)
            expect(page.locator(".live-note")).to_contain_text("following 1 active job")
            page.get_by_role("link", name=second).click()
            badge = page.locator("#job-status .badge")
            page.get_by_role("button", name="Pause").click()
            expect(badge).to_have_text("paused", timeout=60_000)
            page.get_by_role("button", name="Resume").click()
            expect(badge).to_have_text(re.compile("queued|running"))
            page.get_by_role("button", name="Cancel job").click()
            expect(page.locator("#job-status .badge")).to_have_text("cancelled", timeout=60_000)
            assert stack.job(headers, second)["status"] == "cancelled"

            # ---- a job that cannot train: its page says why, in plain words
            long_rows = [{"prompt": "x" * 60 + str(i), "completion": "y"} for i in range(20)]
            failing = stack.submit(headers, stack.upload(headers, long_rows), max_seq_length=8)
            page.goto(f"{origin}/#/jobs/{failing['id']}")
            expect(page.locator("#job-status .badge")).to_have_text("failed", timeout=120_000)
            failure = page.locator("#job-error [role=alert]")
            expect(failure).to_contain_text("This job failed. The training data cannot be")
            expect(failure).to_contain_text("max_seq_length")
            expect(page.get_by_role("button", name="Cancel job")).to_have_count(0)
            shot(page, "job-failed-1280")
            no_horizontal_overflow(page)

            # ---- the jobs list: both jobs, a status filter
            page.get_by_role("link", name="Jobs", exact=True).click()
            rows = page.locator("table.jobs tbody tr")
            expect(rows).to_have_count(3)
            done_row = page.locator(f'tr[data-id="{job_id}"]')
            expect(done_row.locator(".badge")).to_have_text("succeeded")
            expect(done_row).to_contain_text(f"{STEPS} / {STEPS}")
            page.get_by_label("Status").select_option("cancelled")
            expect(rows).to_have_count(1)
            expect(rows.first).to_have_attribute("data-id", second)
            page.get_by_label("Status").select_option("")
            expect(rows).to_have_count(3)
            shot(page, "jobs-1280")
            no_horizontal_overflow(page)

            # ---- adapters
            page.get_by_role("link", name="Adapters").click()
            adapter = page.locator(f'tr[data-id="{job["adapter_id"]}"]')
            expect(adapter).to_contain_text(job["fine_tuned_model"])
            # merge it into the base (a worker task); the merged model downloads when done
            merge_button = f"Merge adapter {job['fine_tuned_model']} into its base"
            page.get_by_role("button", name=merge_button).click()
            merged = adapter.locator(".merge")
            expect(merged).to_have_attribute("data-status", "succeeded", timeout=120_000)
            with page.expect_download() as info:
                page.get_by_role("button", name=re.compile("Download merged model")).click()
            with tarfile.open(info.value.path(), mode="r:gz") as tar:
                names = tar.getnames()
            assert any(n.endswith("config.json") for n in names), names
            assert any(n.endswith(".safetensors") for n in names), names
            shot(page, "adapters-1280")
            no_horizontal_overflow(page)

            # ---- phone width: every page fits, no sideways scrolling
            page.set_viewport_size(PHONE)
            for name, loaded in PAGES.items():
                page.goto(f"{origin}/#/{name}")
                expect(page.locator(f'main[data-page="{name}"] {loaded}')).to_be_visible()
                shot(page, f"{name}-phone")
                no_horizontal_overflow(page)
            page.goto(f"{origin}/#/jobs/{job_id}")
            expect(page.locator("#job-status .badge")).to_have_text("succeeded")
            expect(page.locator("#chart-loss")).to_have_attribute("data-points", str(final))
            shot(page, "job-phone")
            no_horizontal_overflow(page)

            # ---- the charts module on DPO figures (the form's jobs here are supervised)
            points = page.evaluate(DPO_CHARTS)
            assert points == {"sft": [None, "2"], "dpo": ["2", "2"]}, points

            # ---- delete the adapter, then sign out
            page.set_viewport_size(DESKTOP)
            page.goto(f"{origin}/#/adapters")
            page.get_by_role("button", name=f"Delete adapter {job['fine_tuned_model']}").click()
            expect(page.locator("table.adapters tr.empty")).to_be_visible()
            page.get_by_role("button", name="Sign out").click()
            expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
            assert page.evaluate("() => sessionStorage.getItem('qlora.apiKey')") is None
            page.set_viewport_size(PHONE)
            shot(page, "sign-in-phone")
            no_horizontal_overflow(page)
        finally:
            context.close()
            browser.close()

    assert watch.errors == [], "\n".join(watch.errors)
    assert all(key not in url for url in watch.urls), "the key went into a URL"
    elsewhere = {
        url
        for url in watch.urls
        if not url.startswith(("data:", "blob:")) and _origin(url) != _origin(origin)
    }
    assert elsewhere == set(), f"requests to other origins: {sorted(elsewhere)}"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def test_static_files_carry_the_security_headers_and_stay_inside_the_folder(
    stack: ServiceStack,
) -> None:
    with httpx.Client(base_url=stack.url) as c:
        for path in ("/", "/static/js/main.js", "/static/css/app.css"):
            resp = c.get(path)
            assert resp.status_code == 200, path
            assert "script-src 'self'" in resp.headers["content-security-policy"]
            assert resp.headers["x-content-type-options"] == "nosniff"
            assert resp.headers["x-frame-options"] == "DENY"
        assert c.get("/static/js/main.js").headers["content-type"].startswith("text/javascript")
        page = c.get("/").text
        assert "<script>" not in page and "style=" not in page  # nothing inline
        for path in (
            "/static/../routes/ops.py",
            "/static/%2e%2e/routes/ops.py",
            "/static/js/../../app.py",
            "/static/vendor/.copied",
            "/static/index.html",  # only scripts, styles and images under /static
            "/static/nothing.js",
        ):
            resp = c.get(path)
            assert resp.status_code == 404, path
            assert json.loads(resp.text)["error"]["code"]

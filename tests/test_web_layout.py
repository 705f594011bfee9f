"""The web page on a phone (390x844) and a laptop (1280x800), in a real headless Chromium, as `make run` runs it.

The stack is the Procfile's: `mlxk serve` with MLXK_INFERENCE_EXTERNAL=1, the inference worker and the job worker
started beside it as honcho does (so the header must find a worker it did not start). Each test checks what a
person sees: the page is exactly as wide as the screen, every button is on screen and is the element a tap at its
centre reaches, and the actions do what the CLI does (rm is the rm job, Unload is `mlxk stop`). Screenshots of every
view are kept (tests/fixtures/browser.py says where).
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests import factory
from tests.fixtures import browser as web
from tests.fixtures.browser import find, find_all, screenshot, wait_until
from tests.fixtures.jobs import MiB, hub_env
from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import API_KEY, SCRIPTED_ID, SCRIPTED_REPLY, free_port, server_env, spawn_server

LONG_ID = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-DWQ-4bit-tiny-stand-in"   # a realistic long name
BROKEN_ID = "mlx-community/tiny-broken"     # tokenizer_config.json without a tokenizer file: unhealthy
DOOMED_ID = "mlx-community/tiny-doomed"     # removed from the page
PROMPT_LIMIT = 120                          # MLXK_MAX_PROMPT_TOKENS: a few turns of the chat fit, not more
VIEWPORTS = {"phone": (390, 844), "laptop": (1280, 800)}


def _procs(root, env):
    """The Procfile's `inference` and `worker` lines (honcho starts them beside the api)."""
    logs = open(root / "procs.log", "ab")
    inference = subprocess.Popen([sys.executable, "-m", "mlxk.workers.inference"], env=env, cwd=root,
                                 stdout=logs, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-c", "from mlxk.cli import main; main()", "worker"], env=env,
                              cwd=root, stdout=logs, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return logs, [inference, worker]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hub_server):
    root = tmp_path_factory.mktemp("web-layout")
    cache = root / "hf" / "hub"
    cache.mkdir(parents=True)
    factory.write_repo(cache, BROKEN_ID, {k: v for k, v in factory.tiny_model_files().items()
                                          if k != "tokenizer.json"})
    extra = {**hub_env(hub_server), "MLXK_INFERENCE_EXTERNAL": "1", "MLXK_MAX_PROMPT_TOKENS": str(PROMPT_LIMIT)}
    logs, procs = _procs(root, server_env(root, free_port(), **extra))   # workers read MLXK_PORT too: a real one
    srv = spawn_server(root, models={SCRIPTED_ID: {"reply": SCRIPTED_REPLY}, LONG_ID: {"reply": SCRIPTED_REPLY},
                                     DOOMED_ID: {}}, api_key=API_KEY, env=extra)
    yield srv
    srv.stop()
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    logs.close()
    reap_background_workers(root / "mlxk")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = web.start_browser(tmp_path_factory.mktemp("chromium-layout"), *VIEWPORTS["laptop"])
    yield driver
    driver.quit()


@pytest.fixture(params=list(VIEWPORTS), ids=list(VIEWPORTS))
def page(request, browser, stack):
    """The dashboard at one viewport size, key given, models listed."""
    width, height = VIEWPORTS[request.param]
    web.set_viewport(browser, width, height)
    web.open_dashboard(browser, stack, API_KEY)
    wait_until(browser, lambda d: SCRIPTED_ID in model_names(d), "the models table")
    browser.viewport = request.param
    return browser


# ---------------------------------------------------------------- what the person sees


def model_names(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#models tbody tr')].map(r => r.dataset.name)")


def widths(driver) -> dict:
    return driver.execute_script("""return {inner: window.innerWidth, doc: document.documentElement.scrollWidth,
        body: document.body.scrollWidth, innerHeight: window.innerHeight,
        docHeight: document.documentElement.scrollHeight}""")


def assert_no_overflow(driver, what: str) -> None:
    """Nothing is wider than the viewport: no element sticks out to the right, none has content wider than itself,
    scrolled or clipped (form controls clip their own text, and a header pill ends in an ellipsis, by design)."""
    w = widths(driver)
    assert w["doc"] == w["body"] == w["inner"], (what, w)
    wider = driver.execute_script("""
        const out = [];
        for (const node of document.querySelectorAll('body *')) {
            const r = node.getBoundingClientRect();
            if (r.width && (r.right > window.innerWidth + 0.5 || r.left < -0.5)) out.push(node.tagName + '#' + node.id
                + '.' + node.className + ' ' + Math.round(r.left) + '..' + Math.round(r.right));
            if (node.scrollWidth > node.clientWidth + 1 && node.clientWidth && !node.classList.contains('pill')
                && !['SELECT', 'INPUT', 'TEXTAREA'].includes(node.tagName)) {
                out.push('scrolls sideways: ' + node.tagName + '#' + node.id);
            }
        }
        return out;""")
    assert not wider, (what, wider)


def reachable(driver, element) -> str | None:
    """None when the element is displayed, inside the viewport, and a tap at its centre lands on it; else why not."""
    return driver.execute_script("""
        const el = arguments[0];
        const r = el.getBoundingClientRect();
        if (!r.width || !r.height) return 'not displayed';
        if (r.left < 0 || r.top < 0 || r.right > window.innerWidth || r.bottom > window.innerHeight)
            return 'off screen: ' + [r.left, r.top, r.right, r.bottom].map(Math.round).join(',');
        const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
        return hit === el || el.contains(hit) ? null : `covered by ${hit && hit.outerHTML.slice(0, 80)}`;
    """, element)


def tap(driver, element, what: str) -> None:
    """Bring it into view as a person would (scroll its panel), check it can be tapped, tap it."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    why = reachable(driver, element)
    assert why is None, f"{what} at {driver.viewport}: {why}"
    element.click()


def show_tab(driver, name: str) -> None:
    """Tap the tab when the layout has it (the laptop shows the chat beside the others, without a Chat tab)."""
    tab = find(driver, f"#tab-{name}")
    if tab.is_displayed():
        tap(driver, tab, f"the {name} tab")
    panel = find(driver, f"#{name}-panel")
    wait_until(driver, lambda d: panel.is_displayed(), f"the {name} panel")


def lines(driver, element) -> int:
    """How many lines the element's text takes on screen."""
    return driver.execute_script("""
        const range = document.createRange();
        range.selectNodeContents(arguments[0]);
        return new Set([...range.getClientRects()].map(r => Math.round(r.top))).size;""", element)


def model_row(driver, name: str):
    return find(driver, f'#models tbody tr[data-name="{name}"]')


def health(stack) -> dict:
    return stack.health()


# ---------------------------------------------------------------- tests


def test_health_finds_the_procfile_workers_before_any_request(stack):
    """Before any chat and with no page open, /health (what the header shows) finds honcho's inference worker
    (it used to say `stopped` until the api first needed the worker) and the job worker."""
    import time

    deadline = time.monotonic() + 60   # the inference worker imports mlx before it answers
    while (now := health(stack))["worker"]["state"] != "ready" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert now["worker"] == {"state": "ready", "pid": None, "managed": False, "restarts": 0}, now
    assert now["job_workers"]["state"] == "running" and now["job_workers"]["count"] >= 1, now


def test_every_view_fits_the_screen(page, screenshots):
    for tab in ("chat", "models", "jobs"):
        show_tab(page, tab)
        assert_no_overflow(page, tab)
        screenshot(page, screenshots, f"{page.viewport}-{tab}")
    if page.viewport == "laptop":
        # chat and models side by side, the page itself never scrolls: each panel scrolls inside
        show_tab(page, "models")
        assert find(page, "#chat-panel").is_displayed() and find(page, "#models-panel").is_displayed()
        w = widths(page)
        assert w["docHeight"] <= w["innerHeight"], w
        assert reachable(page, find(page, "#chat-send")) is None and reachable(page, find(page, "#chat-input")) is None


def test_long_model_names_take_at_most_two_lines(page):
    show_tab(page, "models")
    name = model_row(page, LONG_ID).find_element("css selector", "td.name")
    assert lines(page, name) <= (2 if page.viewport == "phone" else 1), name.text


def test_unhealthy_model_says_why_and_the_total_size_is_shown(page, stack):
    show_tab(page, "models")
    wait_until(page, lambda d: BROKEN_ID in model_names(d), f"{BROKEN_ID} listed")
    with stack.http() as http:
        listed = http.get("/api/models").json()
    broken = next(m for m in listed["models"] if m["name"] == BROKEN_ID)
    cell = model_row(page, BROKEN_ID).find_element("css selector", "td.health")
    assert broken["health"] == "unhealthy" and broken["reason"]
    assert cell.text.splitlines() == ["unhealthy", broken["reason"]], cell.text
    summary = find(page, "#models-summary").text
    total = page.execute_script("return humanSize(arguments[0])", listed["size_bytes"])
    assert listed["size_bytes"] == sum(m["size_bytes"] or 0 for m in listed["models"]) > 0
    assert f"{total} on disk" in summary, summary


def test_header_shows_the_workers_as_they_are(page, stack):
    """Under the Procfile the inference worker is honcho's: ready before any chat, not "stopped"."""
    wait_until(page, lambda d: find(d, "#status-inference").get_attribute("data-state"), "the header")
    now = health(stack)
    assert now["worker"]["state"] == "ready" and now["worker"]["managed"] is False, now
    assert now["job_workers"]["state"] == "running" and now["job_workers"]["count"] >= 1, now
    wait_until(page, lambda d: find(d, "#status-inference").get_attribute("data-state") == "ready"
               and find(d, "#status-jobs").get_attribute("data-state") == "running", "the header to match /health")
    assert find(page, "#status-inference").text.startswith("inference worker ready")
    assert find(page, "#status-jobs").text == "job worker running"


def test_cancel_and_retry_are_on_screen_and_work(page, stack, hub, screenshots):
    slow = hub.unique_repo("mlx-community/web-slow")
    hub.add_repo(slow, {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"w" * (3 * MiB)})
    hub.faults.rate_limit_bps = 64 * 1024   # ~45 s: still running while the test looks at it
    missing = hub.unique_repo("mlx-community/web-missing")
    with stack.http() as http:
        assert http.post("/api/jobs/pull", json={"model": missing}).status_code == 202
        assert http.post("/api/jobs/pull", json={"model": slow}).status_code == 202
    show_tab(page, "jobs")
    row = lambda d, repo: d.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#jobs tbody tr')].find(r => r.cells[2].textContent === arguments[0])"
        " || null", repo)
    wait_until(page, lambda d: row(d, slow) and row(d, slow).get_attribute("data-state") == "running", "running pull")
    wait_until(page, lambda d: row(d, missing) and row(d, missing).get_attribute("data-state") == "failed",
               "failed pull")
    assert_no_overflow(page, "jobs with a running and a failed pull")
    screenshot(page, screenshots, f"{page.viewport}-jobs-actions")
    for repo in (slow, missing):
        target = row(page, repo).find_element("css selector", "td.name")
        assert lines(page, target) <= (2 if page.viewport == "phone" else 1), target.text   # no mid-word breaks
    tap(page, row(page, slow).find_element("css selector", "button.cancel"), "Cancel")
    wait_until(page, lambda d: row(d, slow).get_attribute("data-state") == "cancelled", "the pull to be cancelled")
    before = len(page.execute_script("return document.querySelectorAll('#jobs tbody tr')"))
    tap(page, row(page, missing).find_element("css selector", "button.retry"), "Retry")
    wait_until(page, lambda d: len(d.execute_script("return document.querySelectorAll('#jobs tbody tr')")) > before,
               "the retried job")


def test_chat_send_and_unload_are_on_screen_and_work(page, stack, screenshots):
    show_tab(page, "chat")
    find(page, "#chat-clear").click()
    from selenium.webdriver.support.ui import Select

    wait_until(page, lambda d: SCRIPTED_ID in [o.get_attribute("value") for o in find_all(d, "#chat-model option")],
               "the model picker")
    Select(find(page, "#chat-model")).select_by_value(SCRIPTED_ID)
    find(page, "#chat-input").send_keys("hi")
    tap(page, find(page, "#chat-send"), "Send")
    wait_until(page, lambda d: [n.text for n in find_all(d, ".msg.assistant .note") if n.text], "the reply", 60)
    assert [c.text for c in find_all(page, ".msg.assistant .content")] == [SCRIPTED_REPLY]
    screenshot(page, screenshots, f"{page.viewport}-chat")

    show_tab(page, "models")
    loaded = lambda d: d.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#loaded tbody tr')].map(r => r.dataset.name)")
    wait_until(page, lambda d: SCRIPTED_ID in loaded(d), "the model in the loaded list")
    assert_no_overflow(page, "models with a loaded model")
    screenshot(page, screenshots, f"{page.viewport}-loaded")
    tap(page, find(page, f'#loaded tbody tr[data-name="{SCRIPTED_ID}"] button.unload'), "Unload")
    wait_until(page, lambda d: SCRIPTED_ID not in loaded(d), "the model to be unloaded")
    with stack.http() as http:
        assert SCRIPTED_ID not in [m["name"] for m in http.get("/api/ps").json()["models"]]


def test_remove_and_check_from_the_page_are_the_cli_jobs(browser, stack):
    """Once, at the phone size: Remove asks again, then runs the rm job; Check queues a health scan."""
    web.set_viewport(browser, *VIEWPORTS["phone"])
    browser.viewport = "phone"
    web.open_dashboard(browser, stack, API_KEY)
    show_tab(browser, "models")
    wait_until(browser, lambda d: DOOMED_ID in model_names(d), f"{DOOMED_ID} listed")
    remove = model_row(browser, DOOMED_ID).find_element("css selector", "button.remove")
    tap(browser, remove, "Remove")
    assert remove.text == "Remove?" and DOOMED_ID in model_names(browser)   # one tap removes nothing
    tap(browser, remove, "Remove?")
    wait_until(browser, lambda d: DOOMED_ID not in model_names(d), f"{DOOMED_ID} to leave the table")
    assert find(browser, "#models-note").text.startswith(f"Removed {DOOMED_ID} (rm job ")
    assert not (stack.root / "hf" / "hub" / f"models--{DOOMED_ID.replace('/', '--')}").exists()
    with stack.http() as http:
        jobs = http.get("/api/jobs", params={"all": "1"}).json()["jobs"]
    assert [(j["kind"], j["state"]) for j in jobs if j["target"] == DOOMED_ID] == [("rm", "succeeded")]

    tap(browser, model_row(browser, BROKEN_ID).find_element("css selector", "button.scan"), "Check")
    note = wait_until(browser, lambda d: "Health" in find(d, "#models-note").text and find(d, "#models-note"),
                      "the health check note")
    assert "Health check queued as job" in note.text and BROKEN_ID in note.text, note.text


def test_the_api_key_form_fits_a_phone(browser, stack, screenshots):
    web.set_viewport(browser, 360, 640)
    browser.viewport = "360x640"
    browser.get(stack.url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_until(browser, lambda d: find(d, "#auth").is_displayed(), "the API key form")
    assert_no_overflow(browser, "the API key form")
    screenshot(browser, screenshots, "360x640-api-key")
    find(browser, "#api-key").send_keys(API_KEY)
    tap(browser, find(browser, "#auth button[type=submit]"), "Use key")
    wait_until(browser, lambda d: SCRIPTED_ID in model_names(d), "the models after the key")


def test_no_sideways_overflow_from_360_to_1920_px(browser, stack, screenshots):
    """Every tab at common widths, with the jobs and models the tests above left (long names, long messages)."""
    web.open_dashboard(browser, stack, API_KEY)
    for width, height in ((360, 640), (412, 915), (768, 1024), (999, 800), (1000, 800), (1440, 900), (1920, 1080)):
        web.set_viewport(browser, width, height)
        browser.viewport = f"{width}x{height}"
        wait_until(browser, lambda d: d.execute_script("return window.innerWidth") == width, f"width {width}")
        for tab in ("chat", "models", "jobs"):
            show_tab(browser, tab)
            assert_no_overflow(browser, f"{tab} at {width}px")
            assert reachable(browser, find(browser, "#chat-send" if tab == "chat" else f"#{tab}-panel h2")) is None
        screenshot(browser, screenshots, f"{width}x{height}-jobs")


def test_a_chat_longer_than_the_context_drops_the_oldest_turns_once_said(browser, stack, screenshots):
    """MLXK_MAX_PROMPT_TOKENS is small: after a few turns the page leaves the oldest out instead of failing."""
    from selenium.webdriver.support.ui import Select

    web.set_viewport(browser, *VIEWPORTS["laptop"])
    browser.viewport = "laptop"
    web.open_dashboard(browser, stack, API_KEY)
    find(browser, "#chat-clear").click()
    wait_until(browser, lambda d: SCRIPTED_ID in [o.get_attribute("value") for o in find_all(d, "#chat-model option")],
               "the model picker")
    Select(find(browser, "#chat-model")).select_by_value(SCRIPTED_ID)
    turn = "please tell me more about the weather"
    for n in range(1, 7):
        find(browser, "#chat-input").send_keys(f"{turn} {n}")
        find(browser, "#chat-send").click()
        wait_until(browser, lambda d: len([x for x in find_all(d, ".msg.assistant .note") if x.text]) == n,
                   f"reply {n}", 60)
    replies = [c.text for c in find_all(browser, ".msg.assistant .content")]
    assert replies == [SCRIPTED_REPLY] * 6, replies   # no turn failed
    notices = [n.text for n in find_all(browser, "#chat-log .notice")]
    assert len(notices) == 1 and f"({PROMPT_LIMIT} tokens)" in notices[0], notices
    faded = find_all(browser, "#chat-log .msg.dropped")
    assert faded and faded[0] == find_all(browser, "#chat-log .msg")[0]   # the oldest are the ones left out
    screenshot(browser, screenshots, "laptop-chat-trimmed")

    # A message longer than the context by itself cannot be helped by leaving turns out: its error says so, and the
    # conversation before it is still sent with the next message.
    dropped = len(find_all(browser, "#chat-log .msg.dropped"))
    browser.execute_script("document.getElementById('chat-input').value = arguments[0]", "weather " * 300)
    find(browser, "#chat-send").click()
    error = wait_until(browser, lambda d: find_all(d, ".msg.assistant.error .content"), "the too-long error")[0]
    assert error.text.startswith("Error: your message alone is too long for this model: "), error.text
    assert len(find_all(browser, "#chat-log .msg.dropped")) == dropped   # the failed try left nothing more out
    browser.execute_script("document.getElementById('chat-input').value = ''")
    find(browser, "#chat-input").send_keys(f"{turn} 7")
    find(browser, "#chat-send").click()
    wait_until(browser, lambda d: len([x for x in find_all(d, ".msg.assistant .note") if x.text]) == 7, "reply 7", 60)
    assert len(find_all(browser, "#chat-log .notice")) == 1
    find(browser, "#chat-clear").click()
    assert not find_all(browser, "#chat-log .notice")

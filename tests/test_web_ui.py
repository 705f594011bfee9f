"""The dashboard at `/` in a real headless Chromium (selenium), against a real `mlxk serve`, job worker and test Hub.

The browser is Debian's chromium + chromium-driver (`make test` installs them); selenium is given both paths, so it
never downloads a driver. Missing, the test FAILS: a skipped browser test would hide a broken page.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests import factory
from tests.fixtures.jobs import hub_env
from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import API_KEY, RANDOM_ID, SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MISSING = ("the browser test needs Debian's chromium and chromedriver at /usr/bin/chromium and "
           "/usr/bin/chromedriver: run `make test` (it installs them) or `sudo apt-get install chromium "
           "chromium-driver`")
WAIT_S = 30
THINKING_ID = "mlx-community/tiny-thinking"   # reasons "Hello", then answers " world!"
MODELS = {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}, THINKING_ID: {"reasoning": True, "reply": "Hello</think> world!"},
          RANDOM_ID: {}}


def browser_missing() -> list[str]:
    return [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub_server):
    root = tmp_path_factory.mktemp("web-ui")
    srv = spawn_server(root, models=MODELS, api_key=API_KEY, env=hub_env(hub_server))
    yield srv
    srv.stop()
    reap_background_workers(root / "mlxk")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if browser_missing():
        pytest.fail(f"{MISSING} (missing: {', '.join(browser_missing())})", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-proxy-server", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


# ---------------------------------------------------------------- helpers


def find(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def find_all(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def page_report(driver) -> str:
    """What to show when a wait fails: the page's error lines and the browser console."""
    errors = [e.text for e in find_all(driver, ".error") if e.text]
    console = [entry.get("message") for entry in driver.get_log("browser")]
    return f"errors on the page: {errors}\nconsole: {console}"


def wait_until(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{page_report(driver)}") from None


def open_dashboard(driver, server, *, fresh: bool = False) -> None:
    """Load `/`; give the API key when the page asks for it."""
    driver.get(server.url + "/")
    if fresh:
        driver.execute_script("sessionStorage.clear()")
        driver.refresh()
    if fresh or not driver.execute_script("return sessionStorage.getItem('mlxk.apiKey')"):
        wait_until(driver, lambda d: find(d, "#auth").is_displayed(), "the API key form")
        find(driver, "#api-key").send_keys(API_KEY)
        find(driver, "#auth button[type=submit]").click()
    wait_until(driver, lambda d: not find(d, "#auth").is_displayed(), "the API key to be accepted")


def models_table(driver) -> dict[str, list[str]]:
    """name -> the texts of its cells (name, size, type, health, runtime)."""
    return driver.execute_script("""
        const rows = {};
        for (const tr of document.querySelectorAll('#models tbody tr')) {
            rows[tr.dataset.name] = [...tr.cells].map((td) => td.textContent);
        }
        return rows;""")


def jobs_table(driver) -> list[dict]:
    """The jobs table as the user sees it, read in one script: the page rebuilds its cells every second."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#jobs tbody tr')].map((tr) => ({
            id: tr.dataset.id, kind: tr.cells[1].textContent, target: tr.cells[2].textContent,
            state: tr.cells[3].textContent, buttons: [...tr.querySelectorAll('button')].map((b) => b.textContent),
        }));""")


def jobs_for(driver, target: str) -> list[dict]:
    return [job for job in jobs_table(driver) if job["target"] == target]


# ---------------------------------------------------------------- tests


def test_chromium_and_chromedriver_are_installed():
    assert not browser_missing(), MISSING


def test_page_asks_for_the_key_then_lists_the_cached_model(browser, server):
    open_dashboard(browser, server, fresh=True)

    wait_until(browser, lambda d: SCRIPTED_ID in models_table(d), f"{SCRIPTED_ID} in the models table")
    cells = models_table(browser)[SCRIPTED_ID]
    assert cells[0] == SCRIPTED_ID and cells[2].startswith("chat") and cells[3] == "healthy", cells
    assert cells[4] in ("yes", "pending"), cells
    assert browser.execute_script("return sessionStorage.getItem('mlxk.apiKey')") == API_KEY
    wait_until(browser, lambda d: SCRIPTED_ID in [o.get_attribute("value") for o in find_all(d, "#chat-model option")],
               "the chat model picker")


def chat_turns(driver) -> list[dict]:
    """Every message of the chat log: role, content, reasoning (collapsed or not), note; textContent, not layout."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#chat-log .msg')].map((m) => {
            const details = m.querySelector('details');
            return {role: m.classList.contains('user') ? 'user' : 'assistant',
                    content: m.querySelector('.content').textContent,
                    reasoning: details && !details.hidden ? details.querySelector('.reasoning').textContent : null,
                    open: details ? details.open : null,
                    note: m.querySelector('.note') ? m.querySelector('.note').textContent : null};
        });""")


def send_chat(driver, model: str, text: str) -> None:
    from selenium.webdriver.support.ui import Select

    wait_until(driver, lambda d: model in [o.get_attribute("value") for o in find_all(d, "#chat-model option")],
               f"{model} in the chat model picker")
    Select(find(driver, "#chat-model")).select_by_value(model)
    find(driver, "#chat-input").send_keys(text)
    find(driver, "#chat-send").click()


def test_chat_streams_the_reply_and_keeps_the_conversation(browser, server):
    open_dashboard(browser, server)
    find(browser, "#chat-clear").click()

    send_chat(browser, SCRIPTED_ID, "hi")

    done = lambda d: [n.text for n in find_all(d, ".msg.assistant .note") if n.text]  # noqa: E731
    wait_until(browser, done, "the streamed reply to finish", timeout=60)
    replies = find_all(browser, ".msg.assistant .content")
    assert [r.text for r in replies] == [SCRIPTED_REPLY]
    assert [u.text for u in find_all(browser, ".msg.user .content")] == ["hi"]
    # "N tokens, T s": the usage chunk of the stream (stream_options.include_usage) reached the page.
    count = done(browser)[0].split(" tokens")[0]
    assert count.isdigit() and int(count) >= 3, done(browser)
    assert find(browser, "#chat-stop").get_attribute("disabled") is not None

    # A second turn: markup in a message is shown as text, never parsed; the reply streams into a new bubble.
    markup = '<img src=x onerror="document.title=\'pwned\'"><b>bold</b>'
    find(browser, "#chat-input").send_keys(markup)
    find(browser, "#chat-send").click()
    wait_until(browser, lambda d: len(done(d)) == 2, "the second reply", timeout=60)
    assert [r.text for r in find_all(browser, ".msg.assistant .content")] == [SCRIPTED_REPLY, SCRIPTED_REPLY]
    assert find_all(browser, ".msg.user .content")[1].text == markup
    assert not find_all(browser, "#chat-log img") and not find_all(browser, "#chat-log b")
    assert browser.title == "mlxk"


def test_reasoning_is_shown_apart_and_collapsed(browser, server):
    open_dashboard(browser, server)
    find(browser, "#chat-clear").click()

    send_chat(browser, THINKING_ID, "hi")

    wait_until(browser, lambda d: (chat_turns(d) or [{}])[-1].get("note"), "the reply to finish", timeout=60)
    reply = chat_turns(browser)[-1]
    assert reply["reasoning"] == "Hello" and reply["content"] == " world!" and reply["open"] is False, reply


def test_stop_aborts_the_stream_and_keeps_the_partial_reply(browser, server):
    import httpx

    open_dashboard(browser, server)
    find(browser, "#chat-clear").click()
    send_chat(browser, RANDOM_ID, "count")   # random weights: runs to the token limit unless stopped
    wait_until(browser, lambda d: len((chat_turns(d) or [{}])[-1].get("content") or "") > 0, "the first tokens")

    find(browser, "#chat-stop").click()

    wait_until(browser, lambda d: chat_turns(d)[-1]["note"], "the stopped note")
    reply = chat_turns(browser)[-1]
    assert reply["note"] == "stopped" and reply["content"], reply
    assert find(browser, "#chat-stop").get_attribute("disabled") is not None
    assert find(browser, "#chat-send").get_attribute("disabled") is None
    # The server saw the hang-up and cancelled the generation: nothing keeps running in the inference worker
    # (a full 2048-token run of this model takes ~5 s on a 2-core CPU; the stop came well before).
    with server.http(timeout=10) as http:
        wait_until(browser, lambda d: http.get("/api/ps").json()["running"] == 0, "the generation to be cancelled",
                   timeout=3)


def test_pull_from_the_form_runs_to_succeeded_and_lists_the_model(browser, server, hub):
    repo = hub.unique_repo("mlx-community/web-pulled")
    hub.add_repo(repo, factory.tiny_model_files())
    open_dashboard(browser, server)

    find(browser, "#pull-model").send_keys("not a repo id")
    find(browser, "#pull-submit").click()
    error = wait_until(browser, lambda d: find(d, "#pull-error").is_displayed() and find(d, "#pull-error"),
                       "the inline pull error")
    assert "invalid model name" in error.text, error.text

    field = find(browser, "#pull-model")
    field.clear()
    field.send_keys(repo)
    find(browser, "#pull-submit").click()

    wait_until(browser, lambda d: jobs_for(d, repo), f"a job for {repo} in the jobs table")
    assert not find(browser, "#pull-error").is_displayed()
    wait_until(browser, lambda d: [j["state"] for j in jobs_for(d, repo)] == ["succeeded"],
               f"the pull of {repo} to succeed")
    [job] = jobs_for(browser, repo)
    assert job["kind"] == "pull" and job["buttons"] == []   # nothing to cancel or retry any more
    wait_until(browser, lambda d: repo in models_table(d), f"{repo} in the models table")
    assert models_table(browser)[repo][3] == "healthy"

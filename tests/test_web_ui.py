"""The dashboard at `/` in a real headless Chromium (selenium), against a real `mlxk serve`, job worker and test Hub.

The browser and its helpers are in tests/fixtures/browser.py; the layout at phone and laptop sizes is
tests/test_web_layout.py.
"""
from __future__ import annotations

import pytest

from tests import factory
from tests.fixtures import browser as web
from tests.fixtures.browser import MISSING, browser_missing, find, find_all, wait_until
from tests.fixtures.jobs import hub_env
from tests.fixtures.queue import reap_background_workers
from tests.fixtures.server import API_KEY, RANDOM_ID, SCRIPTED_ID, SCRIPTED_REPLY, spawn_server

THINKING_ID = "mlx-community/tiny-thinking"   # reasons "Hello", then answers " world!"
MODELS = {SCRIPTED_ID: {"reply": SCRIPTED_REPLY}, THINKING_ID: {"reasoning": True, "reply": "Hello</think> world!"},
          RANDOM_ID: {}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub_server):
    root = tmp_path_factory.mktemp("web-ui")
    srv = spawn_server(root, models=MODELS, api_key=API_KEY, env=hub_env(hub_server))
    yield srv
    srv.stop()
    reap_background_workers(root / "mlxk")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = web.start_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def open_dashboard(driver, server, *, fresh: bool = False) -> None:
    web.open_dashboard(driver, server, API_KEY, fresh=fresh)


def models_table(driver) -> dict[str, list[str]]:
    """name -> the texts of its cells (name, size, type, health, runtime, actions)."""
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


def test_header_shows_what_health_says_under_mlxk_serve(browser, server):
    """Under `mlxk serve` the api runs the inference worker itself (started by the chats above): ready, with its pid;
    the job worker is the one the api started for the background scan."""
    open_dashboard(browser, server)
    health = server.health()
    assert health["worker"]["state"] == "ready" and health["worker"]["managed"] is True, health
    pill = lambda d, which: (find(d, f"#status-{which}").get_attribute("data-state"),  # noqa: E731
                             find(d, f"#status-{which}").text)
    wait_until(browser, lambda d: pill(d, "inference")[0] == "ready", "the inference worker in the header")
    assert pill(browser, "inference")[1] == f"inference worker ready (pid {health['worker']['pid']})"
    workers = server.health()["job_workers"]
    wait_until(browser, lambda d: pill(d, "jobs")[0] == workers["state"], "the job worker in the header")
    assert pill(browser, "server") == ("ok", f"mlxk v{health['version']}")


def test_pull_from_the_form_runs_to_succeeded_and_lists_the_model(browser, server, hub):
    repo = hub.unique_repo("mlx-community/web-pulled")
    hub.add_repo(repo, factory.tiny_model_files())
    open_dashboard(browser, server)
    find(browser, "#tab-jobs").click()   # the pull form is on the Jobs tab

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

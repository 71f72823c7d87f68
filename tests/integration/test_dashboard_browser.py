"""The dashboard (``GET /ui``) in a real browser: headless Chromium driven by Selenium.

A real ``llamaproc serve`` (real llama-server children, real rpc workers for the
sharded model) serves the page; the browser loads it, shows the models and
workers, and shows the tokens of streams as they are generated, coloured by the
worker layout that produced them, with a marker where a stream resumed after a
reshard. With ``api_keys`` set the page asks for a key, logs in with it, and logs
out. Every wait is for something to show in the page (a safety timeout only).

Screenshots are saved to the directory ``$LLAMAPROC_ARTEFACTS`` names (made if
missing), else to the test's pytest tmp dir: ``dashboard.png``,
``dashboard-login.png`` and ``dashboard-logged-in.png``.

Needs Debian's ``chromium`` and ``chromium-driver`` and the ``selenium`` package
(the test extra): without them the tests skip with the reason, except under CI
(``CI`` set), where they fail (tests/support.py); .ci/run installs them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon_helpers import Daemon, chat_stream, running_daemon_checked, until, write_config
from support import require

from llamaproc.testing import write_tiny_model

pytestmark = pytest.mark.integration

SAFETY = 120.0
KEY = "browser-key-0123456789"
#: The token of the sharded model's stream at which one of its workers is killed.
KILL_AT = 20
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(autouse=True)
def no_leftover_servers() -> Iterator[None]:
    """The module's daemons keep their children between tests; their fixtures check that none outlives them."""
    yield


@pytest.fixture
def artefacts(tmp_path: Path) -> Path:
    given = os.environ.get("LLAMAPROC_ARTEFACTS")
    where = Path(given) if given else tmp_path
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture(scope="module")
def tools() -> tuple[str, str]:
    """Chromium and its driver (checked before any daemon starts)."""
    require("chromium", CHROMIUM is not None, "apt-get install chromium")
    require("chromedriver", CHROMEDRIVER is not None, "apt-get install chromium-driver")
    require("selenium", importlib.util.find_spec("selenium") is not None, "pip install selenium, in the test extra")
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    return CHROMIUM, CHROMEDRIVER


@pytest.fixture
def browser(tools: tuple[str, str], tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = tools[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(arg)
    service = Service(executable_path=tools[1], log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, what: str, condition: Callable[[Any], Any]) -> Any:
    """Wait for ``condition(driver)`` (a page that is being replaced, after a form's POST, is looked at again)."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, SAFETY, ignored_exceptions=(WebDriverException,))
    return wait.until(condition, f"still waiting for {what}")


def _shown(driver: Any, element_id: str) -> bool:
    return bool(driver.execute_script("const e = document.getElementById(arguments[0]); return !!e && !e.hidden",
                                      element_id))  # fmt: skip


def _text(driver: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return str(found[0].text) if found else ""


def _stream(base_url: str, model: str, max_tokens: int, *, headers: dict[str, str] | None = None,
            then: Callable[[], None] | None = None) -> str:  # fmt: skip
    """Stream a chat answer of ``max_tokens`` tokens; ``then()`` is called at its ``KILL_AT``-th token. Its text."""

    def on_token(count: int) -> None:
        if count == KILL_AT and then is not None:
            then()

    with httpx.Client(base_url=base_url, headers=headers, timeout=SAFETY) as client:
        return chat_stream(client, model, max_tokens, on_token=on_token)


def _in_thread(run: Callable[[], str]) -> Callable[[], str]:
    """Start ``run`` in a thread; the function returned waits for its result."""
    result: list[str] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            result.append(run())
        except BaseException as exc:  # noqa: BLE001 - reported by join()
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> str:
        thread.join(SAFETY)
        assert result, f"the stream failed: {errors!r}"
        return result[0]

    return join


def _stream_shown(driver: Any, model: str, tokens: int) -> Callable[[Any], Any]:
    """A condition: the newest stream of ``model`` shows ``tokens`` tokens and has ended."""
    script = """
        const [model, tokens] = arguments;
        const stream = document.querySelector(`.stream[data-model="${model}"]`);
        if (!stream || !stream.matches('.stream-done')) return null;
        const spans = [...stream.querySelectorAll('.token')];
        if (spans.length !== tokens) return null;
        return {
            text: spans.map((s) => s.textContent).join(''),
            layouts: spans.map((s) => s.dataset.layout || null),
            colours: spans.map((s) => s.style.color),
            markers: [...stream.querySelectorAll('.reshard')].map((m) => m.textContent),
            order: [...stream.querySelector('.tokens').children].map((c) => c.className),
        };
    """
    return lambda d: d.execute_script(script, model, tokens)


# --- without keys ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(
    tools: tuple[str, str], tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, backend: Any
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("browser")
    layers = write_tiny_model(tmp / "layers.gguf", n_layers=8, seed=5)
    config = write_config(
        tmp / "serve.toml",
        {
            "tiny": {"path": tiny_model, "ctx_size": 512},
            "split": {"path": layers, "local_workers": 2, "stall_timeout": "5s"},
        },
        preload=["tiny", "split"],
        max_loaded_models=2,
    )
    with running_daemon_checked(config, tmp / "state") as started:
        with httpx.Client(base_url=started.http, timeout=SAFETY) as client:
            until("both models serving", lambda: all(
                m["phase"] == "Serving" for m in client.get("/api/models").json()["models"]))  # fmt: skip
        yield started


def test_the_page_shows_the_models_and_the_tokens_of_streams_as_they_come(
    browser: Any, daemon: Daemon, artefacts: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(daemon.http + "/ui")
    _wait(browser, "the models", lambda d: "Serving" in _text(d, 'tr[data-model="tiny"]'))
    assert "Serving" in _text(browser, 'tr[data-model="split"]')
    assert "1 of 1" in _text(browser, 'tr[data-model="tiny"]')  # its replicas: serving of wanted
    assert len(browser.find_elements(By.CSS_SELECTOR, "#workers tbody tr[data-worker]")) == 2
    assert not _shown(browser, "login")
    _wait(browser, "the live feed", lambda d: d.execute_script('return document.getElementById("feed").dataset.state') == "live")

    # A stream of a model in one process: its tokens show as they come, in one colour.
    text = _in_thread(lambda: _stream(daemon.http, "tiny", 24))()
    shown = _wait(browser, "the tiny stream's tokens", _stream_shown(browser, "tiny", 24))
    assert shown["text"] == text and set(shown["layouts"]) == {None} and not shown["markers"]

    # A sharded model's stream loses a worker mid-stream: the tokens after the reshard are coloured by the new
    # layout, and the place where it resumed is marked.
    with httpx.Client(base_url=daemon.http, timeout=SAFETY) as client:
        workers = [w for w in client.get("/api/workers").json()["workers"] if w["model"] == "split"]
    killed = workers[0]
    text = _in_thread(lambda: _stream(daemon.http, "split", 80, then=lambda: os.kill(killed["pid"], signal.SIGKILL)))()
    shown = _wait(browser, "the split stream's tokens", _stream_shown(browser, "split", 80))
    assert shown["text"] == text
    assert len(shown["markers"]) == 1 and killed["address"] in shown["markers"][0]
    marker = shown["order"].index("reshard")
    before, after = set(shown["layouts"][:marker]), set(shown["layouts"][marker:])
    assert len(before) == 1 and len(after) == 1 and before != after
    assert killed["address"] in before.pop() and killed["address"] not in after.pop()
    assert shown["colours"][0] != shown["colours"][-1]
    _wait(browser, "the lost worker", lambda d: "lost" in _text(d, f'tr[data-worker="{killed["id"]}"]'))
    browser.save_screenshot(str(artefacts / "dashboard.png"))
    assert (artefacts / "dashboard.png").stat().st_size > 0


# --- with keys -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(
    tools: tuple[str, str], tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, backend: Any
) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("browser-guarded")
    config = write_config(
        tmp / "serve.toml", {"tiny": {"path": tiny_model, "ctx_size": 512}}, preload=["tiny"], api_keys=[KEY]
    )
    with running_daemon_checked(config, tmp / "state") as started:
        yield started


def test_with_keys_the_page_logs_in_and_out(browser: Any, guarded: Daemon, artefacts: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.get(guarded.http + "/ui")
    _wait(browser, "the login form", lambda d: _shown(d, "login"))
    assert not _shown(browser, "dashboard")
    browser.save_screenshot(str(artefacts / "dashboard-login.png"))

    browser.find_element(By.ID, "key").send_keys(KEY + "-wrong")
    browser.find_element(By.ID, "login-button").click()
    _wait(browser, "the refusal", lambda d: "not one of the daemon's API keys" in _text(d, "#login-error"))

    key = browser.find_element(By.ID, "key")
    key.clear()
    key.send_keys(KEY)
    browser.find_element(By.ID, "login-button").click()
    _wait(browser, "the models", lambda d: "Serving" in _text(d, 'tr[data-model="tiny"]'))
    _wait(browser, "the live feed", lambda d: d.execute_script('return document.getElementById("feed").dataset.state') == "live")
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: out of the page's reach
    cookie = browser.get_cookie("llamaproc_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and KEY not in cookie["value"]

    text = _in_thread(lambda: _stream(guarded.http, "tiny", 16, headers={"Authorization": f"Bearer {KEY}"}))()
    shown = _wait(browser, "the stream's tokens", _stream_shown(browser, "tiny", 16))
    assert shown["text"] == text
    browser.save_screenshot(str(artefacts / "dashboard-logged-in.png"))

    browser.find_element(By.CSS_SELECTOR, "#logout button").click()
    _wait(browser, "the login form again", lambda d: _shown(d, "login"))
    assert browser.get_cookie("llamaproc_session") is None

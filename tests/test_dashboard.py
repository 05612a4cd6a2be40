"""The dashboard (GET /) in real headless Chromium, driven over the DevTools protocol, against a real stack.

Chromium is a system package (`scripts/test.sh`, the README's test command, installs it with apt-get); without it
this test fails, not skips.
The screenshot goes to the test's tmp dir and to tests/artifacts/dashboard.png.
"""

from __future__ import annotations

import base64
import itertools
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import websocket
from conftest import HERE
from test_control_e2e import publish_paced, wait_until

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--remote-debugging-port=0", "--window-size=1280,720"]

STACK = """
brokers:
  local: {url: BROKER}
models:
  probe: {path: MODELS/probe, params: {tag: dash}}
rules:
  - name: slow
    sub: {broker: local, topic: "load/+/data", qos: 1}
    model: probe
    pub: {broker: local, topic: "done/{1}/slow", qos: 1}
  - name: fast
    sub: {broker: local, topic: "load/+/data", qos: 0}
    model: probe
    pub: {broker: local, topic: "done/{1}/fast", qos: 0}
    workers: 2
control: {listen: CONTROL}
"""

READ_BOXES = """JSON.stringify([...document.querySelectorAll('[data-stage]')].map(b => ({
  stage: b.dataset.stage, up: b.dataset.up,
  spark: b.querySelector('[data-field=sparkline] path:not(.base)').getAttribute('d') || '',
  fields: Object.fromEntries([...b.querySelectorAll('[data-field]')].map(f => [f.dataset.field, f.textContent]))
})))"""


class Browser:
    """One headless Chromium and a DevTools websocket to its first page."""

    def __init__(self, profile: Path) -> None:
        if not Path(CHROMIUM).exists():
            pytest.fail(f"{CHROMIUM} is not installed (bash scripts/test.sh installs the chromium package)")
        self.log = (profile.parent / "chromium.log").open("wb")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        port_file = profile / "DevToolsActivePort"
        wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 30, "DevTools up")
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in orjson.loads(r.read()) if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=30, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: object) -> dict:
        msg_id = next(self.ids)
        self.ws.send(orjson.dumps({"id": msg_id, "method": method, "params": params}).decode())
        while True:
            reply = orjson.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return reply["result"]

    def evaluate(self, expression: str) -> object:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def boxes(self) -> dict[str, dict]:
        return {b["stage"]: b for b in orjson.loads(self.evaluate(READ_BOXES))}

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def browser(tmp_path: Path):
    b = Browser(tmp_path / "chromium-profile")
    yield b
    b.close()


def number(text: str) -> float:
    return float(text.replace(",", ""))


NAMES = ["ingress", "rule:slow", "rule:fast", "egress"]


def four_live_boxes(browser: Browser) -> dict | None:
    b = browser.boxes()
    return b if list(b) == NAMES and all(x["up"] == "true" for x in b.values()) else None


def backlog_and_rate(browser: Browser) -> dict | None:
    b = browser.boxes()
    busy = number(b["rule:slow"]["fields"]["depth"]) > 0 and number(b["ingress"]["fields"]["rate_per_s"]) > 0
    return b if busy else None


def drained(browser: Browser, n: int) -> dict | None:
    b = browser.boxes()
    ok = all(b[r]["fields"]["counts"].startswith(f"processed {n:,}") for r in ("rule:slow", "rule:fast"))
    return b if ok and all(x["fields"]["depth"] == "0" for x in b.values()) else None


def save_screenshot(browser: Browser, tmp_path: Path) -> Path:
    """The page as PNG in the test's tmp dir, copied to tests/artifacts/dashboard.png."""
    shot = tmp_path / "dashboard.png"
    browser.screenshot(shot)
    (HERE / "artifacts").mkdir(exist_ok=True)
    shutil.copy(shot, HERE / "artifacts" / "dashboard.png")
    return shot


def test_dashboard_draws_the_flow_and_its_numbers_move_under_load(broker, probe_factory, stack_factory,
                                                                   browser, tmp_path):
    up = stack_factory(STACK.replace("BROKER", broker.url), "--workers", "slow=1")
    browser.call("Page.navigate", url=f"http://{up.control}/")
    boxes = wait_until(lambda: four_live_boxes(browser), 30, "four live boxes")
    assert boxes["rule:fast"]["fields"]["workers"] == "2/2 workers"
    assert boxes["rule:slow"]["fields"]["depth"] == "0"
    assert browser.evaluate("document.getElementById('state').dataset.state") == "ok"
    assert browser.evaluate("document.querySelectorAll('#wires path:not(marker path)').length") == 4
    n = 1500
    load = threading.Thread(target=publish_paced, args=(probe_factory(), n, 300.0, {"sleep": 0.005}))
    load.start()
    try:
        busy = wait_until(lambda: backlog_and_rate(browser), 20, "a backlog and a rate on the page")
        time.sleep(3)  # a few more refreshes, so the sparklines have a shape
        shot = save_screenshot(browser, tmp_path)
        later = browser.boxes()
    finally:
        load.join()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert later["rule:slow"]["fields"] != busy["rule:slow"]["fields"]  # the numbers move every second
    assert later["ingress"]["spark"].count("L") >= 3
    final = wait_until(lambda: drained(browser, n), 60, "the page showing the drained stack")
    assert final["egress"]["fields"]["counts"].startswith(f"published {2 * n:,}")


TOKEN = "tok-dashboard-0123456789abcdef"
LOGIN = """JSON.stringify({shown: !!document.getElementById('login') && !document.getElementById('login').hidden,
  error: document.getElementById('login-error') ? document.getElementById('login-error').textContent : '',
  stored: sessionStorage.getItem('pipeline-control-token')})"""


def enter_token(browser: Browser, token: str) -> None:
    browser.evaluate(f"document.getElementById('token').value = {orjson.dumps(token).decode()}; "
                     "document.getElementById('login').requestSubmit(); true")


def login(browser: Browser) -> dict:
    return orjson.loads(browser.evaluate(LOGIN))


def test_with_protect_reads_the_page_asks_for_the_token_once_and_then_shows_data(broker, stack_factory, browser):
    protected = STACK.replace("control: {listen: CONTROL}",
                              f"control: {{listen: CONTROL, token: {TOKEN}, protect_reads: true}}")
    up = stack_factory(protected.replace("BROKER", broker.url), "--workers", "slow=1")
    browser.call("Page.navigate", url=f"http://{up.control}/")
    first = wait_until(lambda: (x := login(browser))["shown"] and x, 30, "the token field")
    assert first["error"] == "" and first["stored"] is None
    assert browser.boxes() == {}
    assert browser.evaluate("document.getElementById('state').dataset.state") == "locked"
    enter_token(browser, "not-the-token-0123456789")
    refused = wait_until(lambda: (x := login(browser))["shown"] and x["error"] and x, 30, "the refusal")
    assert "refused" in refused["error"] and refused["stored"] is None
    enter_token(browser, TOKEN)
    boxes = wait_until(lambda: four_live_boxes(browser), 30, "four live boxes after the token")
    assert boxes["rule:fast"]["fields"]["workers"] == "2/2 workers"
    after = login(browser)
    assert after["shown"] is False and after["stored"] == TOKEN
    browser.call("Page.reload")  # the same tab: the token is kept for the session, not asked again
    wait_until(lambda: four_live_boxes(browser), 30, "four live boxes after a reload")
    assert login(browser)["shown"] is False

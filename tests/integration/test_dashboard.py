"""The dashboard in a real headless browser (Debian's chromium and chromedriver, Selenium)."""

import json
import shutil
from urllib.request import urlopen

import pytest

from fleetune.edge_sdk.transport.memory import MemoryBroker
from fleetune.edge_sdk.transport.topics import Topics
from fleetune.server.broker import free_port
from tests.conftest import started
from tests.integration.test_server_rounds import _server, _update

pytestmark = pytest.mark.integration


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "chromium and chromedriver are not installed (apt-get install -y chromium "
            "chromium-driver); .ci/run installs them"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def test_the_dashboard_shows_the_fleet_in_a_real_browser(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # Prepare: two rounds of two devices that report perplexities, and two refusals
    broker = MemoryBroker()
    port = free_port()
    server = _server(tmp_path, broker, rounds=2, metrics_port=port)
    device = broker.client("d")
    device.connect()
    topic = Topics("t").update
    thread = started(server.run, name="server")
    device.publish(topic("d9"), _update("<b>bold</b>", 1.0))  # a sender that is markup
    device.publish(topic("d0"), b"junk")
    for round_, (a, b) in enumerate(((80.0, 120.0), (60.0, 100.0)), start=1):
        for name, ppl in (("d1", a), ("d2", b)):
            body = _update(name, 0.1, round_, version=round_ - 1, metrics={"ppl_local": ppl})
            device.publish(topic(name), body)
    thread.join(30)
    try:
        with urlopen(f"http://127.0.0.1:{port}/api/fleet", timeout=10) as page:
            fleet = json.loads(page.read())
        # Execute: the page, in chromium
        browser.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(browser, 20).until(
            lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-loaded") == "1"
        )
        lines = {
            line.get_attribute("data-device"): line.get_attribute("points").split()
            for line in browser.find_elements(By.CSS_SELECTOR, "#plot polyline")
        }
        cards = {
            key: browser.find_element(By.ID, key).text
            for key in ("version", "rounds", "refused", "online")
        }
        cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#refusals td")]
        injected = browser.find_elements(By.CSS_SELECTOR, "#refusals b")
    finally:
        server.close()
    # Assert: what the registry holds, drawn: a line per device through its two rounds
    assert fleet["perplexity"] == {"d1": [[1, 80.0], [2, 60.0]], "d2": [[1, 120.0], [2, 100.0]]}
    assert [r["accepted"] for r in fleet["rounds"]] == [2, 2]
    assert sorted(lines) == ["d1", "d2"] and all(len(p) == 2 for p in lines.values())
    y = {d: [float(p.split(",")[1]) for p in pts] for d, pts in lines.items()}
    assert y["d1"][1] > y["d1"][0] and y["d2"][0] < y["d1"][0]  # lower perplexity sits lower
    assert cards == {"version": "2", "rounds": "2", "refused": "2", "online": "4"}  # d0, d9 too
    assert any("too short for an envelope" in c for c in cells)
    assert any("<b>bold</b>" in c for c in cells) and not injected  # text, never markup

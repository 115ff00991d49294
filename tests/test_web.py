"""The owner's web page in a real browser (Debian's headless Chromium): log in, watch a device
arrive live, approve it; a read-only account sees and is refused."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homenet.accounts import Accounts
from homenet.acl import Role
from homenet.brokers import Embedded
from homenet.configurator.bus import DeviceChanged
from homenet.netutil import free_port
from homenet.settings import GatewaySettings, HomeAssistantSettings, HttpSettings

from .browser import chromium
from .harness import Gateway, wait_until

SCREENSHOTS = os.environ.get("HOMENET_SCREENSHOTS")
"""A directory to keep the page's screenshots in (docs/ is made so), else they stay in tmp."""


class Home:
    def __init__(self, gateway: Gateway, url: str, accounts: Accounts) -> None:
        self.gateway, self.url = gateway, url
        self.owner = ("owner", accounts.set("owner", Role.OPERATOR))
        self.viewer = ("viewer", accounts.set("viewer", Role.READER))


def page_gateway(tmp_path: Path) -> Iterator[Home]:
    accounts = tmp_path / "gateway" / "broker-accounts.json"
    broker = Embedded(accounts_file=accounts)
    broker.start()
    port = free_port()
    settings = GatewaySettings(http=HttpSettings(listen=["127.0.0.1"], port=port),
                               homeassistant=HomeAssistantSettings(enabled=False))
    gateway = Gateway(broker, tmp_path, accounts_file=accounts, enrollment="approve", extensions=settings)
    try:
        gateway.start()
        yield Home(gateway, f"http://127.0.0.1:{port}", Accounts(accounts))
    finally:
        gateway.close()
        broker.stop()


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    yield from page_gateway(tmp_path)


def log_in(page: Any, home: Home, login: tuple[str, str]) -> None:
    page.goto(home.url)
    page.fill("input[name=name]", login[0])
    page.fill("input[name=password]", login[1])
    page.click("form#login button[type=submit]")
    page.wait_for_selector("#home", state="visible")
    page.wait_for_selector("#live.on")  # the event stream is open


def test_the_owner_sees_a_device_arrive_live_and_approves_it(home: Home, tmp_path: Path) -> None:
    committed: dict[str, float] = {}
    assert home.gateway.configurator is not None
    home.gateway.configurator.bus.subscribe(
        lambda n: isinstance(n, DeviceChanged) and committed.setdefault(n.record.device_id, time.monotonic()))
    with chromium(tmp_path / "profile", viewport={"width": 1100, "height": 640}) as browser:
        page = browser.new_page()
        log_in(page, home, home.owner)
        assert page.text_content("#who") == "owner"

        home.gateway.agent("nas", "nas-1")
        page.wait_for_selector("#device-nas-1[data-state=pending]", timeout=5000)
        seen = time.monotonic()
        assert seen - committed["nas-1"] < 1.0, f"shown {seen - committed['nas-1']:.2f} s after the commit"
        assert page.text_content("#device-nas-1 .address") == "–"

        page.click("#device-nas-1 button[data-action=approve]")
        page.wait_for_selector("#device-nas-1[data-state=configured]", timeout=10000)
        record = home.gateway.wait_configured("nas-1")
        assert page.text_content("#device-nas-1 .address") == record.address
        assert page.text_content("#device-nas-1 .online") == "yes"
        page.wait_for_selector("#events li:has-text('device.approved nas-1')")
        home.gateway.agent("iptv-stb", "living-room-stb")
        page.wait_for_selector("#device-living-room-stb[data-state=pending]")
        home.gateway.watcher.wait_event("device.pending", device_id="living-room-stb")
        shots = Path(SCREENSHOTS) if SCREENSHOTS else tmp_path
        page.screenshot(path=str(shots / "web-page.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 780})  # a phone
        page.screenshot(path=str(shots / "web-page-phone.png"), full_page=True)
        assert page.is_visible("#device-nas-1 button[data-action=forget]")


def test_a_read_only_account_sees_the_devices_and_is_refused_every_action(home: Home, tmp_path: Path) -> None:
    home.gateway.agent("nas", "nas-1")
    wait_until(lambda: (r := home.gateway.record("nas-1")) and r.state.value == "pending", what="pending")
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        log_in(page, home, home.viewer)
        assert page.text_content("#who") == "viewer (read-only)"
        page.wait_for_selector("#device-nas-1[data-state=pending]")
        assert not page.is_visible("#device-nas-1 button[data-action=approve]")
        answer = page.evaluate("""() => fetch('/api/devices/nas-1/approve', {method: 'POST',
            headers: {'Content-Type': 'application/json'}, body: '{}'}).then(async r => [r.status, await r.json()])""")
        assert answer[0] == 403 and "read-only" in answer[1]["error"]
    assert home.gateway.record("nas-1").state.value == "pending"


def test_a_wrong_password_is_refused_and_nothing_is_shown_without_a_login(home: Home, tmp_path: Path) -> None:
    with chromium(tmp_path / "profile") as browser:
        page = browser.new_page()
        page.goto(home.url)
        page.fill("input[name=name]", "owner")
        page.fill("input[name=password]", "not-it")
        page.click("form#login button[type=submit]")
        page.wait_for_selector("#login-error:has-text('wrong name or password')")
        assert not page.is_visible("#home")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(home.url + "/api/devices", timeout=5)
    assert refused.value.code == 401 and json.load(refused.value)["error"] == "log in first"

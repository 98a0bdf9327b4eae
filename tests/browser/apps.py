#!/usr/bin/env python3
"""The rider and driver pages in real headless Chromium, against a real
engine process: booking end to end, a decline, an expiry, the rider
cancelling, the driver page reconnecting after the engine dropped it, and
the ops map following a driver.

Run by .ci/run after `cargo test` (which builds target/debug/ridelock):
    python3 tests/browser/apps.py
Needs Debian's chromium (/usr/bin/chromium, or $CHROMIUM) and Playwright
from PyPI, which drives it; Playwright's own browser download is never
used. Any JavaScript error on a page fails the run. Screenshots of every
page land in target/screenshots/ (not committed) for a reviewer to look at.
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

from playwright.async_api import async_playwright, expect

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE = os.environ.get("RIDELOCK_BIN", os.path.join(ROOT, "target", "debug", "ridelock"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SHOTS = os.path.join(ROOT, "target", "screenshots")
WAIT_MS = 10_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = os.path.join(ROOT, "tests", "fixtures", "auth-secret")


def start_engine(*extra):
    port = free_port()
    engine = subprocess.Popen(
        [ENGINE, "--listen", f"127.0.0.1:{port}", "--offer-timeout-ms", "5000",
         "--search-timeout-ms", "10000", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return engine, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    engine.kill()
    sys.exit(f"the engine did not listen on {port}: {engine.stderr.read().decode()}")


class Pages:
    """Opens pages, each in its own browser context, and records every
    JavaScript error."""

    def __init__(self, browser, base):
        self.browser, self.base, self.errors = browser, base, []

    async def open(self, path, **context_options):
        context = await self.browser.new_context(
            viewport={"width": 1100, "height": 760}, **context_options)
        page = await context.new_page()
        page.on("pageerror", lambda e: self.errors.append(f"{path}: {e}"))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"{path}: {m.text}"))
        await page.goto(self.base + path)
        return page


def raw_websocket(base, path):
    """A WebSocket handshake by hand (the engine only needs the upgrade to
    take the connection); the open socket."""
    host = base.split("//", 1)[1]
    sock = socket.create_connection(tuple(host.split(":")[:1]) + (int(host.split(":")[1]),))
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1024)
        assert chunk, "the engine closed the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def place(found):
    """The driver's position in the ops page's `#found` text."""
    return found.split(" at ")[1].split(", pickup")[0]


async def click_map(page, fx, fy):
    box = await page.locator("#map").bounding_box()
    await page.mouse.click(box["x"] + box["width"] * fx, box["y"] + box["height"] * fy)


async def shot(page, name):
    os.makedirs(SHOTS, exist_ok=True)
    await page.screenshot(path=os.path.join(SHOTS, name + ".png"))


def token(role, who):
    return subprocess.check_output(
        [ENGINE, "token", "--role", role, "--id", who, "--ttl", "10m", "--auth-secret-file", SECRET],
        text=True).strip()


async def driver_ready(pages, driver_id, fragment=None, at=(0.5, 0.45)):
    driver = await pages.open(f"/driver#{fragment or 'id=' + driver_id}")
    await expect(driver.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)
    await click_map(driver, *at)
    await driver.locator("#available").click()
    await expect(driver.locator("#state")).to_have_text("available", timeout=WAIT_MS)
    return driver


async def rider_ready(pages, rider_id, fragment=None):
    rider = await pages.open(f"/rider#{fragment or 'id=' + rider_id}")
    await expect(rider.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)
    await click_map(rider, 0.5, 0.5)
    return rider


async def request(rider):
    await rider.locator("#request").click()
    await expect(rider.locator("#status")).to_have_text("searching", timeout=WAIT_MS)


async def book_end_to_end(pages):
    driver = await driver_ready(pages, "d-book")
    rider = await rider_ready(pages, "r-book")
    await request(rider)
    await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
    await expect(driver.locator("#countdown")).to_contain_text(" s")
    first = await driver.locator("#countdown").text_content()
    await driver.wait_for_timeout(400)
    second = await driver.locator("#countdown").text_content()
    assert float(second.split()[0]) < float(first.split()[0]), (first, second)
    await shot(driver, "driver-offer")
    await driver.locator("#accept").click()
    await expect(driver.locator("#trip")).to_be_visible(timeout=WAIT_MS)
    await expect(rider.locator("#status")).to_have_text("matched", timeout=WAIT_MS)
    await expect(rider.locator("#match")).to_contain_text("d-book")
    await shot(rider, "rider-matched")
    await shot(driver, "driver-trip")
    await driver.locator("#complete").click()
    await expect(driver.locator("#state")).to_have_text("available", timeout=WAIT_MS)
    return driver, rider


async def decline_expiry_and_cancel(pages, driver, rider):
    # A decline: the only driver, so the rider ends with no driver.
    await request(rider)
    await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
    await driver.locator("#decline").click()
    await expect(driver.locator("#offer")).to_be_hidden(timeout=WAIT_MS)
    await expect(rider.locator("#status")).to_have_text("no driver found", timeout=15_000)
    # An expiry: nobody answers for the offer's 5 s.
    await request(rider)
    await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
    await expect(driver.locator("#error")).to_contain_text("it expired", timeout=WAIT_MS)
    await expect(driver.locator("#offer")).to_be_hidden()
    await expect(rider.locator("#status")).to_have_text("no driver found", timeout=15_000)
    # The rider cancelling while the driver decides.
    await request(rider)
    await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
    await rider.locator("#cancel").click()
    await expect(rider.locator("#status")).to_have_text("cancelled", timeout=WAIT_MS)
    await expect(driver.locator("#error")).to_contain_text("the rider cancelled", timeout=WAIT_MS)
    await expect(driver.locator("#offer")).to_be_hidden()


async def reconnect_gets_the_offer_again(pages, base):
    driver = await driver_ready(pages, "d-drop")
    rider = await rider_ready(pages, "r-drop")
    await request(rider)
    await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
    offer_text = await driver.locator("#offer-text").text_content()
    # Another connection as the same driver makes the engine drop the
    # page's (1008); the page reconnects, replaces it in turn, and the
    # engine sends the offer it holds again.
    intruder = raw_websocket(base, "/ws/driver?id=d-drop")
    try:
        # The page counts its connections: a second one is the reconnect.
        await expect(driver.locator("body")).to_have_attribute("data-opens", "2", timeout=WAIT_MS)
        await expect(driver.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)
    finally:
        intruder.close()
    await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
    await expect(driver.locator("#offer-text")).to_have_text(offer_text)
    await driver.locator("#accept").click()
    await expect(rider.locator("#status")).to_have_text("matched", timeout=WAIT_MS)


async def group_of_two(pages):
    """Two vehicles: the first driver to accept waits for the group, then
    both get their trips and the rider one match listing both."""
    d1 = await driver_ready(pages, "d-g1", at=(0.45, 0.45))
    d2 = await driver_ready(pages, "d-g2", at=(0.55, 0.45))
    rider = await rider_ready(pages, "r-group")
    await rider.locator("#vehicles").select_option("2")
    await rider.locator("#request").click()
    await expect(rider.locator("#status")).to_have_text("searching for 2 vehicles", timeout=WAIT_MS)
    for driver in (d1, d2):
        await expect(driver.locator("#offer-text")).to_contain_text("one of 2 vehicles", timeout=WAIT_MS)
    await d1.locator("#accept").click()
    await expect(d1.locator("#state")).to_have_text("accepted: waiting for the group", timeout=WAIT_MS)
    await expect(rider.locator("#status")).to_have_text("searching: 1 of 2 drivers accepted", timeout=WAIT_MS)
    await shot(d1, "driver-waiting-for-group")
    await d2.locator("#accept").click()
    for driver in (d1, d2):
        await expect(driver.locator("#trip-text")).to_contain_text("one of 2 vehicles", timeout=WAIT_MS)
    await expect(rider.locator("#status")).to_have_text("matched", timeout=WAIT_MS)
    await expect(rider.locator("#match")).to_contain_text("d-g1")
    await expect(rider.locator("#match")).to_contain_text("d-g2")
    await shot(rider, "rider-group-matched")


async def ops_map_follows_a_driver(pages):
    """The ops page shows a driver appear, change state and move."""
    ops = await pages.open("/ops")
    await expect(ops.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)
    await ops.locator("#find").fill("d-ops")
    await expect(ops.locator("#found")).to_have_text("d-ops: not on this node")
    driver = await driver_ready(pages, "d-ops", at=(0.5, 0.45))
    await expect(ops.locator("#found")).to_contain_text("d-ops: available at", timeout=WAIT_MS)
    first_place = await ops.locator("#found").text_content()
    available = int(await ops.locator("#n-available").text_content())
    assert available >= 1, available
    rider = await rider_ready(pages, "r-ops")
    await request(rider)
    await expect(ops.locator("#found")).to_contain_text("d-ops: offered at", timeout=WAIT_MS)
    await expect(ops.locator("#found")).to_contain_text("pickup")
    await expect(ops.locator("#n-requests")).to_have_text("1", timeout=WAIT_MS)
    await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
    await driver.locator("#accept").click()
    await expect(ops.locator("#found")).to_contain_text("d-ops: on trip at", timeout=WAIT_MS)
    await expect(ops.locator("#n-requests")).to_have_text("0", timeout=WAIT_MS)
    await expect(ops.locator("#n-minute")).not_to_have_text("0", timeout=WAIT_MS)
    await shot(ops, "ops-trip")
    # The text while on trip, before the move: it must change with the move
    # alone (comparing with the text from before the trip would pass on the
    # state change).
    on_trip_place = await ops.locator("#found").text_content()
    await click_map(driver, 0.3, 0.3)
    await expect(ops.locator("#found")).not_to_have_text(on_trip_place, timeout=WAIT_MS)
    await expect(ops.locator("#found")).to_contain_text("d-ops: on trip at")
    moved_place = await ops.locator("#found").text_content()
    assert place(moved_place) != place(on_trip_place), (on_trip_place, moved_place)
    await driver.locator("#complete").click()
    await expect(ops.locator("#found")).to_contain_text("d-ops: available at", timeout=WAIT_MS)
    await driver.close()
    await expect(ops.locator("#found")).to_contain_text("d-ops: offline", timeout=WAIT_MS)
    await shot(ops, "ops")


async def pickup_from_the_browsers_location(pages):
    rider = await pages.open("/rider#id=r-located", permissions=["geolocation"],
                             geolocation={"latitude": 48.8566, "longitude": 2.3522})
    await expect(rider.locator("#conn")).to_have_text("connected", timeout=WAIT_MS)
    await rider.locator("#locate").click()
    await expect(rider.locator("#pickup")).to_have_text("48.85660, 2.35220", timeout=WAIT_MS)
    await expect(rider.locator("#request")).to_be_enabled()


def refused_feed(error):
    """Chromium logs a refused WebSocket handshake as a console error; the
    refusal is what that check expects."""
    return error.startswith("/ops:") and "/ws/ops" in error and "Authentication failed" in error


async def with_tokens(browser):
    """An engine that verifies tokens: the pages take theirs from the
    address's fragment."""
    engine, base = start_engine("--auth-secret-file", SECRET)
    try:
        pages = Pages(browser, base)
        driver = await driver_ready(pages, None, fragment="token=" + token("driver", "d-token"))
        rider = await rider_ready(pages, None, fragment="token=" + token("rider", "r-token"))
        await request(rider)
        await expect(driver.locator("#offer")).to_be_visible(timeout=WAIT_MS)
        await driver.locator("#accept").click()
        await expect(rider.locator("#match")).to_contain_text("d-token", timeout=WAIT_MS)
        # The ops page: refused without a token, fed with an ops token.
        refused = await pages.open("/ops")
        await expect(refused.locator("#error")).to_contain_text("ops token", timeout=WAIT_MS)
        ops = await pages.open("/ops#token=" + token("ops", "operator"))
        await ops.locator("#find").fill("d-token")
        await expect(ops.locator("#found")).to_contain_text("d-token: on trip", timeout=WAIT_MS)
        return [e for e in pages.errors if not refused_feed(e)]
    finally:
        engine.terminate()
        engine.wait(timeout=10)


async def main():
    engine, base = start_engine()
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
            pages = Pages(browser, base)
            home = await pages.open("/")
            await expect(home.locator("a[href='/rider']")).to_be_visible()
            await shot(home, "home")
            driver, rider = await book_end_to_end(pages)
            await decline_expiry_and_cancel(pages, driver, rider)
            # The first driver stops working: the next offers go to new ones.
            await driver.locator("#unavailable").click()
            await expect(driver.locator("#state")).to_have_text("offline", timeout=WAIT_MS)
            await reconnect_gets_the_offer_again(pages, base)
            await group_of_two(pages)
            await ops_map_follows_a_driver(pages)
            await pickup_from_the_browsers_location(pages)
            errors = pages.errors + await with_tokens(browser)
            await browser.close()
            assert not errors, "JavaScript errors:\n" + "\n".join(errors)
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    print(f"browser tests passed; screenshots in {SHOTS}")


if __name__ == "__main__":
    asyncio.run(main())

#!/usr/bin/env python3
"""Opens the /ops page in headless Chromium while bench/ops loads the
engine, waits for the drivers to be in, samples the page for 10 s (frame
gaps, the map's drawing time, the time to apply a message), takes the
README's screenshot, and writes the figures as JSON.

    python3 bench/ops_page.py URL DRIVERS OUT.json SCREENSHOT.png

Uses Debian's chromium (/usr/bin/chromium, or $CHROMIUM) through Playwright;
nothing downloads a browser.
"""
import asyncio
import json
import os
import sys
import time

from playwright.async_api import async_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
SAMPLE_MS = 10_000

SAMPLE = """async (ms) => {
  const gaps = [], draws = [], applies = [];
  let last = performance.now();
  const end = last + ms;
  await new Promise((done) => {
    function frame(t) {
      gaps.push(t - last);
      last = t;
      draws.push(Number(document.body.dataset.drawMs || 0));
      applies.push(Number(document.body.dataset.applyMs || 0));
      if (t < end) requestAnimationFrame(frame); else done();
    }
    requestAnimationFrame(frame);
  });
  return { gaps, draws, applies, drivers: Number(document.body.dataset.drivers || 0) };
}"""


# A second connection from the page: how big a snapshot of the whole city
# is, how long it takes to arrive, and to parse.
SNAPSHOT = """async () => {
  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  const started = performance.now();
  const ws = new WebSocket(`ws://${location.host}/ws/ops?token=${encodeURIComponent(token)}`);
  return await new Promise((done, fail) => {
    ws.onmessage = (e) => {
      const received = performance.now() - started;
      const before = performance.now();
      const drivers = JSON.parse(e.data).drivers.length;
      const parse = performance.now() - before;
      ws.close();
      done({ bytes: e.data.length, drivers, received_ms: received, parse_ms: parse });
    };
    ws.onerror = () => fail(new Error("no snapshot"));
  });
}"""


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


async def main(url, drivers, out, screenshot):
    errors = []
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        # The engine is up before this starts; the drivers come in over the
        # simulator's ramp.
        await page.goto(url)
        deadline = time.time() + 120
        shown = 0
        while time.time() < deadline:
            shown = await page.evaluate("Number(document.body.dataset.drivers || 0)")
            if shown >= 0.95 * drivers:
                break
            await asyncio.sleep(1)
        # Into the steady phase: requests and trips under way.
        await asyncio.sleep(15)
        sample = await page.evaluate(SAMPLE, SAMPLE_MS)
        snapshot = await page.evaluate(SNAPSHOT)
        os.makedirs(os.path.dirname(screenshot), exist_ok=True)
        await page.screenshot(path=screenshot)
        counts = await page.evaluate("""() => Object.fromEntries(
            [...document.querySelectorAll('[id^=n-]')].map((e) => [e.id, e.textContent]))""")
        await browser.close()
    gaps = sample["gaps"][1:]
    result = {
        "drivers_shown": sample["drivers"],
        "frames": len(gaps),
        "fps": len(gaps) / (SAMPLE_MS / 1000),
        "frame_gap_ms_p50": quantile(gaps, 0.5),
        "frame_gap_ms_p99": quantile(gaps, 0.99),
        "frame_gap_ms_max": max(gaps) if gaps else 0,
        "draw_ms_p50": quantile(sample["draws"], 0.5),
        "draw_ms_max": max(sample["draws"]) if sample["draws"] else 0,
        "apply_ms_p50": quantile(sample["applies"], 0.5),
        "apply_ms_max": max(sample["applies"]) if sample["applies"] else 0,
        "snapshot": snapshot,
        "counts": counts,
        "errors": errors,
    }
    json.dump(result, open(out, "w"), indent=1)
    print(json.dumps(result))
    if errors:
        sys.exit("JavaScript errors on /ops: " + "; ".join(errors))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))

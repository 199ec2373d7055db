"""Headless Chromium driven over the DevTools protocol on a pipe (no extra packages).

`open_page(path)` loads a local HTML file in a fresh profile and returns what the
browser saw: the console errors, a full-page screenshot and where each element with
an id was drawn. Chromium is Debian's package (`make browser` installs it).

    python tests/browser.py report.html docs/report.png [HEIGHT]   # the docs' screenshot
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--remote-debugging-pipe",
)  # fmt: skip
WIDTH = 1200
TIMEOUT_S = 60.0
# every element with an id: where it was drawn and, for an image, whether it decoded
RECTS_JS = """JSON.stringify(Array.from(document.querySelectorAll('[id]')).map(e => {
  const r = e.getBoundingClientRect();
  return {id: e.id, x: r.x + scrollX, y: r.y + scrollY, width: r.width, height: r.height,
          decoded: e.tagName !== 'IMG' || (e.complete && e.naturalWidth > 0)};
}))"""


@dataclass
class Page:
    console_errors: list[str]
    screenshot_png: bytes
    rects: dict[str, dict]  # element id -> x, y, width, height (CSS pixels), decoded


class _DevTools:
    """One Chromium process; `call` sends a command and waits for its answer, keeping the
    events that arrive meanwhile."""

    def __init__(self, profile: str):
        to_browser, self._send = os.pipe()
        self._receive, from_browser = os.pipe()
        self.process = subprocess.Popen(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", f"--window-size={WIDTH},900"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4), preexec_fn=lambda: _as_fds_3_and_4(to_browser, from_browser),
            start_new_session=True,  # its own process group: its helpers end with it
        )  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self.events, self._buffer, self._next_id = [], b"", 0

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._read())

    def _read(self) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer over the DevTools pipe")
            chunk = os.read(self._receive, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(message)

    def close(self) -> None:
        """Ask Chromium to quit, then end its process group, so that no helper still
        writes into the profile folder when it is removed."""
        try:
            self.call("Browser.close")
            self.process.wait(timeout=10)
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
            pass  # it may close the pipe before answering
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        os.close(self._send)
        os.close(self._receive)


def _as_fds_3_and_4(reads: int, writes: int) -> None:
    """In the child: the pipe Chromium reads as fd 3 and the one it writes as fd 4 (via
    fresh copies, so that neither overwrites the other)."""
    reads, writes = os.dup(reads), os.dup(writes)
    os.dup2(reads, 3)
    os.dup2(writes, 4)


def _errors(events: list[dict]) -> list[str]:
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            found.append(
                " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            found.append(params["entry"]["text"])
    return found


def open_page(path: Path) -> Page:
    """Load `path` in a fresh headless Chromium and return what it drew."""
    with tempfile.TemporaryDirectory(prefix="autopar-chromium-") as profile:
        browser = _DevTools(profile)
        try:
            target = browser.call("Target.createTarget", url="about:blank")["targetId"]
            session = browser.call("Target.attachToTarget", targetId=target, flatten=True)
            session = session["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                browser.call(f"{domain}.enable", session)
            browser.call("Page.navigate", session, url=Path(path).resolve().as_uri())
            browser.wait_for("Page.loadEventFired")
            return _capture(browser, session)
        finally:
            browser.close()


def _capture(browser: _DevTools, session: str) -> Page:
    evaluate = lambda js: browser.call("Runtime.evaluate", session, expression=js)  # noqa: E731
    height = int(evaluate("document.documentElement.scrollHeight")["result"]["value"])
    browser.call("Emulation.setDeviceMetricsOverride", session, width=WIDTH, height=height,
                 deviceScaleFactor=1, mobile=False)  # fmt: skip
    rects = json.loads(evaluate(RECTS_JS)["result"]["value"])
    shot = browser.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True)
    return Page(
        _errors(browser.events), base64.b64decode(shot["data"]), {r["id"]: r for r in rects}
    )


def region_spread(png: bytes, rect: dict) -> tuple[float, float]:
    """(standard deviation of grey levels, share of pixels that are not near-white) inside
    `rect` of a screenshot: about (0, 0) for a blank region."""
    import numpy as np
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    box = tuple(round(v) for v in (rect["x"], rect["y"], rect["x"] + rect["width"],
                                   rect["y"] + rect["height"]))  # fmt: skip
    pixels = np.asarray(image.crop(box), dtype=float)
    return float(pixels.std()), float((pixels < 240).mean())


def _save_top(png: bytes, path: Path, height: int | None) -> None:
    """The screenshot, cut to its top `height` pixels when given."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    if height is not None:
        image = image.crop((0, 0, image.width, min(height, image.height)))
    image.save(path, optimize=True)


if __name__ == "__main__":
    page = open_page(Path(sys.argv[1]))
    _save_top(page.screenshot_png, Path(sys.argv[2]), int(sys.argv[3]) if sys.argv[3:] else None)
    print(f"{sys.argv[2]} written; console errors: {page.console_errors or 'none'}")

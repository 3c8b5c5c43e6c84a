"""Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): the real
browser of the `browser` marker, with no websocket client or browser driver to install."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import subprocess
import time
from pathlib import Path


class Chromium:
    """One headless Chromium with one page: open a URL, evaluate JavaScript, press keys, take screenshots.
    Every URL the page requests is kept in `requests`."""

    def __init__(self, profile: Path, timeout: float = 60.0):
        self.timeout, self.requests, self._buffer, self._next, self._session = timeout, [], b"", 0, None
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()
        # Chromium reads fd 3 and writes fd 4; bash moves the child's ends there from fds >= 10 (dash cannot)
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser, from_browser)]
        for fd in (to_browser, from_browser):
            os.close(fd)
        args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                f"--user-data-dir={profile}", "--window-size=1200,1000", "--remote-debugging-pipe", "about:blank"]
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{ends[0]} 4>&{ends[1]} {ends[0]}<&- {ends[1]}>&-', "bash", *args],
            pass_fds=ends, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for fd in ends:
            os.close(fd)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._send("Browser.close", {}, None)
            self.process.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        finally:
            os.close(self._out)
            os.close(self._in)

    def _send(self, method: str, params: dict, session: str | None) -> int:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._out, json.dumps(message).encode() + b"\0")
        return self._next

    def _receive(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            if not select.select([self._in], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe: " + self.process.stderr.read().decode()[-2000:])
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, _browser: bool = False, **params) -> dict:
        """One DevTools command (to the page, or to the browser) and its result; events are recorded."""
        sent = self._send(method, params, None if _browser else self._session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._receive(deadline)
            if message.get("method") == "Network.requestWillBeSent":
                self.requests.append(message["params"]["request"]["url"])
            if message.get("id") == sent:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str) -> None:
        """A new page at `url`, once it has loaded."""
        target = self.call("Target.createTarget", _browser=True, url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", _browser=True, targetId=target, flatten=True)["sessionId"]
        self.call("Network.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-serialisable)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float | None = None):
        """Evaluate `expression` until it is truthy; its value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false: {expression}")
            time.sleep(0.1)
        return value

    def press(self, selector: str, key: str, code: int) -> None:
        """Focus the element and press a key on the keyboard (as a user choosing in a <select>)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)

    def screenshot(self, selector: str) -> bytes:
        """A PNG of the element as the page draws it."""
        box = self.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return {x: r.x + scrollX, y: r.y + scrollY, "
                            "width: r.width, height: r.height}; })()")
        shot = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True, clip={**box, "scale": 1})
        return base64.b64decode(shot["data"])

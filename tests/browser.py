"""Opens a page in real headless Chromium and reports what a reader would see, over DevTools.

The Chrome DevTools Protocol is spoken directly over its WebSocket (websocket-client, pinned),
so no driver binary is needed: `chromium` from Debian is enough (`make test` installs it).
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Dict, List, Optional

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium_binary() -> Optional[str]:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Page:
    """One headless browser tab; use as a context manager."""

    def __init__(self, timeout: float = 60.0):
        binary = chromium_binary()
        if binary is None:
            raise RuntimeError("no Chromium found (looked for %s); `make test` installs Debian's "
                               "chromium package" % ", ".join(CANDIDATES))
        self._timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="relkd-chromium-")
        self._port = _free_port()
        self._process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", f"--user-data-dir={self._profile}",
             f"--remote-debugging-port={self._port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._ws = None
        self._next_id = 0
        self.events: List[Dict[str, Any]] = []

    def __enter__(self) -> "Page":
        import websocket

        deadline = time.monotonic() + self._timeout
        targets = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self._port}/json/list", timeout=2) as r:
                    targets = [t for t in json.load(r) if t.get("type") == "page"]
                if targets:
                    break
            except OSError:
                pass
            if self._process.poll() is not None:
                raise RuntimeError(f"chromium exited with code {self._process.returncode}")
            time.sleep(0.2)
        if not targets:
            raise RuntimeError("chromium did not open its DevTools port")
        self._ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=self._timeout,
                                               suppress_origin=True)
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method)
        return self

    def __exit__(self, *exc) -> None:
        if self._ws is not None:
            self._ws.close()
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
        shutil.rmtree(self._profile, ignore_errors=True)

    def call(self, method: str, **params) -> Dict[str, Any]:
        self._next_id += 1
        call_id = self._next_id
        self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, event: str) -> Dict[str, Any]:
        for message in self.events:
            if message.get("method") == event:
                return message
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            message = json.loads(self._ws.recv())
            self.events.append(message)
            if message.get("method") == event:
                return message
        raise TimeoutError(event)

    def open(self, path: str) -> None:
        self.call("Page.navigate", url="file://" + os.path.abspath(path))
        self.wait_for("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> List[str]:
        """Console errors, uncaught exceptions and browser log errors (failed loads, CSP, ...)."""
        errors = []
        for message in self.events:
            method, params = message.get("method"), message.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                errors.append(str(params.get("exceptionDetails", {}).get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        return errors

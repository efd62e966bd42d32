"""A page opened in a real headless Chromium (Debian's ``chromium``, installed by
``make system-packages``), driven over the Chrome DevTools Protocol.

No browser driver package: Chromium is started with ``--remote-debugging-port=0``, the port
it picked is read from ``DevToolsActivePort`` in its profile folder, and the protocol is
spoken over a websocket with aiohttp (installed with ``ray[default]``). Imported by the tests
as ``import browser``, like ``helpers``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every <img>: did it load and decode (naturalWidth > 0)? Every table: its rows.
_PAGE_FACTS = """(() => ({
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                          width: i.naturalWidth, height: i.naturalHeight})),
  tables: [...document.querySelectorAll('table')].map(t => t.rows.length),
  text: document.body.innerText,
  height: document.documentElement.scrollHeight,
  scripts: document.querySelectorAll('script').length,
}))()"""


@dataclass
class PageCheck:
    images: list[dict[str, Any]]
    tables: list[int]
    text: str
    height: int
    scripts: int
    screenshot: bytes
    errors: list[str] = field(default_factory=list)

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        return [i for i in self.images if not i["complete"] or i["width"] == 0]

    def screenshot_colours(self) -> int:
        """Distinct colours in the screenshot: 1 for a blank page."""
        from PIL import Image

        with Image.open(io.BytesIO(self.screenshot)) as image:
            return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def open_page(path: Path, timeout_s: float = 60.0) -> PageCheck:
    """Load ``path`` (file://) in a fresh headless Chromium; return what rendered, a
    full-page screenshot and every console error, uncaught exception and failed load."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed: run `make system-packages`")
    profile = tempfile.mkdtemp(prefix="csmn-chromium-")
    process = subprocess.Popen(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,900",
         "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = _devtools_port(Path(profile), process, timeout_s)
        return asyncio.run(asyncio.wait_for(_check(port, path.resolve().as_uri()), timeout_s))
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(profile: Path, process: subprocess.Popen, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().strip():
            return int(marker.read_text().split()[0])
        if process.poll() is not None:
            raise RuntimeError(f"chromium exited with {process.returncode}")
        time.sleep(0.2)
    raise TimeoutError("chromium wrote no DevToolsActivePort")


class _Session:
    def __init__(self, socket: Any):
        self.socket, self.next_id, self.events = socket, 0, []
        self.pending: dict[int, asyncio.Future] = {}

    async def pump(self) -> None:
        async for message in self.socket:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.socket.send_str(json.dumps({"id": self.next_id, "method": method,
                                               "params": params}))
        reply = await future
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_event(self, method: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    return event
            await asyncio.sleep(0.05)
        raise TimeoutError(f"no {method}")


def _errors(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                 for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            errors.append("exception: " + str(params["exceptionDetails"].get("text")))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        elif method == "Network.loadingFailed":
            errors.append(f"load failed: {params.get('errorText')}")
    return errors


async def _check(port: int, url: str) -> PageCheck:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as response:
            target = await response.json(content_type=None)
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            session = _Session(socket)
            pump = asyncio.create_task(session.pump())
            try:
                for domain in ("Page", "Runtime", "Log", "Network"):
                    await session.call(f"{domain}.enable")
                await session.call("Page.navigate", url=url)
                await session.wait_event("Page.loadEventFired", 30.0)
                facts = await session.call("Runtime.evaluate", expression=_PAGE_FACTS,
                                           returnByValue=True)
                shot = await session.call("Page.captureScreenshot", format="png",
                                          captureBeyondViewport=True)
            finally:
                pump.cancel()
    value = facts["result"]["value"]
    return PageCheck(images=value["images"], tables=value["tables"], text=value["text"],
                     height=value["height"], scripts=value["scripts"],
                     screenshot=base64.b64decode(shot["data"]), errors=_errors(session.events))

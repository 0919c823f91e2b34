"""Read the built book as a reader would: every page in headless Chromium.

Serves ``_build/html`` on 127.0.0.1, loads each page in Debian's ``chromium`` (driven over the
DevTools protocol with ``websocket-client``; nothing is downloaded at run time, and every host
other than 127.0.0.1 is unreachable, as on a machine without a network), and fails on

- a JavaScript error (an uncaught exception or a ``console.error``),
- a missing image or any other file of the book that does not load,
- a broken internal link or anchor (the target page or its ``#id`` does not exist),
- a glue placeholder left unrendered (``{glue:text}`key``` or ``{{ key }}`` in the page's text),
- code that scrolls sideways at the theme's default width (``scrollWidth > clientWidth`` of a
  visible ``pre`` outside cell outputs: code cells, code blocks, included library code; collapsed
  cells and papermill's injected-parameters cell are not measured).

It saves a screenshot of each page under ``_build/screenshots/``. Usage::

    .venv/bin/python tests/browser_check.py [HTML_DIR] [--screenshots DIR] [--width PX]

``make test`` runs it on the smoke-built book (tests/test_chapters.py). Install Chromium with
``sudo apt-get install chromium`` (Debian/Ubuntu) or point ``LMBOOK_CHROMIUM`` at a Chrome binary.
"""

from __future__ import annotations

import argparse
import functools
import html.parser
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parents[1]
INSTALL_HINT = "install Chromium to run the browser test: sudo apt-get install chromium (or set LMBOOK_CHROMIUM)"
# A wide desktop window: the theme's content column has reached its full (default) width.
WIDTH, HEIGHT = 1440, 900
MAX_SHOT_HEIGHT = 8000  # the top of a long page: title, parameters, set-up, first figures (Chromium allows 16384)
GLUE_LEFT = re.compile(r"\{glue(:\w+)?\}`[^`]*`|\{\{\s*[\w.]+\s*\}\}")


def find_chromium() -> str | None:
    """The Chromium (or Chrome) binary: $LMBOOK_CHROMIUM, else the first one on PATH."""
    if os.environ.get("LMBOOK_CHROMIUM"):
        return os.environ["LMBOOK_CHROMIUM"]
    for name in ["chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]:
        if shutil.which(name):
            return shutil.which(name)
    return None


class _Ids(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if k == "id" or (k == "name" and tag == "a"):
                self.ids.add(v or "")


@functools.lru_cache(maxsize=None)
def page_ids(path: Path) -> frozenset[str]:
    p = _Ids()
    p.feed(path.read_text(errors="replace"))
    return frozenset(p.ids)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


class DevTools:
    """A minimal client of the Chrome DevTools protocol over one browser websocket (flat sessions)."""

    def __init__(self, ws_url: str):
        import websocket  # websocket-client, pinned in requirements.txt

        self.ws = websocket.create_connection(ws_url, timeout=300, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict] = []

    def call(self, method: str, session: str | None = None, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        self.ws.settimeout(300)  # drain() and wait_for() shorten it
        while True:
            m = json.loads(self.ws.recv())
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_for(self, method: str, timeout: float = 60.0) -> dict:
        end = time.monotonic() + timeout
        while True:
            for e in self.events:
                if e.get("method") == method:
                    return e
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {timeout:.0f} s")
            self.ws.settimeout(max(0.1, end - time.monotonic()))
            self.events.append(json.loads(self.ws.recv()))

    def drain(self, seconds: float) -> None:
        """Collect events for ``seconds`` (late console errors, late image loads)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.ws.settimeout(max(0.05, end - time.monotonic()))
            try:
                self.events.append(json.loads(self.ws.recv()))
            except Exception:  # websocket timeout: nothing more arrived
                break

    def close(self):
        self.ws.close()


def launch(chromium: str, profile: Path, width: int, height: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
         "--disable-background-networking", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         f"--window-size={width},{height}",
         # Only the local server is reachable: CDN scripts fail at once, as they would offline.
         "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    port_file = profile / "DevToolsActivePort"
    for _ in range(300):
        if port_file.is_file() and len(port_file.read_text().splitlines()) >= 2:
            port, path = port_file.read_text().splitlines()[:2]
            return proc, f"ws://127.0.0.1:{port}{path}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{chromium} did not start (exit code {proc.poll()})")


PAGE_JS = r"""
(() => {
  // Collapsed cells (hide-input: a closed <details>) are not on screen and are not measured.
  const visible = el => !el.closest('details:not([open])') &&
    (el.checkVisibility ? el.checkVisibility() : el.offsetParent !== null);
  const code = [...document.querySelectorAll('pre')]
    // Outputs are not code; papermill's injected-parameters cell exists only in a papermill run.
    .filter(p => !p.closest('.cell_output, .output, .tag_injected-parameters') && visible(p) &&
                 p.scrollWidth > p.clientWidth + 1)
    .map(p => {
      const lines = p.innerText.split('\n');
      const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), '');
      return {excess_px: p.scrollWidth - p.clientWidth, width_px: p.clientWidth, line: longest};
    });
  const main = document.querySelector('article') || document.body;
  return {
    images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.currentSrc || i.src),
    links: [...document.querySelectorAll('a[href]')].map(a => a.href),
    text: main.innerText,
    code: code,
    pre_width: Math.max(0, ...[...document.querySelectorAll('.cell_input pre, div.highlight pre')]
                               .filter(visible).map(p => p.clientWidth)),
  };
})()
"""

WAIT_IMAGES_JS = """
Promise.all([...document.images].map(i => i.complete ? 1 :
  new Promise(r => { i.addEventListener('load', r); i.addEventListener('error', r); setTimeout(r, 10000); })))
"""


def check_page(dt: DevTools, session: str, base: str, html_root: Path, rel: str, shots: Path,
               width: int) -> list[str]:
    """Load one page; return its problems (an empty list when a reader would find none)."""
    problems: list[str] = []
    dt.events.clear()
    dt.call("Page.navigate", session, url=f"{base}/{rel}")
    dt.wait_for("Page.loadEventFired", 90)
    dt.call("Runtime.evaluate", session, expression=WAIT_IMAGES_JS, awaitPromise=True)
    dt.drain(0.5)
    local = base + "/"
    for e in dt.events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text") or ""
            problems.append(f"JavaScript error: {text.splitlines()[0] if text else d}")
        elif m == "Runtime.consoleAPICalled" and p.get("type") == "error":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
            problems.append(f"console.error: {text[:300]}")
        elif m == "Network.responseReceived" and p["response"]["url"].startswith(local) \
                and p["response"]["status"] >= 400 and p["response"]["url"] != local + "favicon.ico":
            problems.append(f"missing file ({p['response']['status']}): {p['response']['url'][len(local):]}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            req = next((x["params"]["request"]["url"] for x in dt.events
                        if x.get("method") == "Network.requestWillBeSent"
                        and x["params"]["requestId"] == p["requestId"]), "")
            if req.startswith(local):
                problems.append(f"failed to load {req[len(local):]}: {p.get('errorText')}")
    r = dt.call("Runtime.evaluate", session, expression=PAGE_JS, returnByValue=True)["result"]["value"]
    problems += [f"missing image: {src}" for src in r["images"]]
    for href in sorted(set(r["links"])):
        u = urlsplit(href)
        if not href.startswith(local):
            continue
        path = unquote(u.path)
        target = html_root / path.lstrip("/")
        if path.endswith("/"):
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"broken link: {href[len(local) - 1:]}")
        elif u.fragment and target.suffix == ".html" and unquote(u.fragment) not in page_ids(target):
            problems.append(f"broken anchor: {href[len(local) - 1:]}")
    for hit in sorted({m.group(0) for m in GLUE_LEFT.finditer(r["text"])}):
        problems.append(f"glue placeholder left in the text: {hit}")
    for c in r["code"]:
        problems.append(f"code scrolls sideways by {c['excess_px']} px in a {c['width_px']} px column: "
                        f"{c['line'].strip()[:100]!r} ({len(c['line'])} characters)")
    # A window as tall as the page (up to MAX_SHOT_HEIGHT), same width: the column keeps its layout
    # (captureBeyondViewport lays the page out again at another width).
    height = int(min(dt.call("Page.getLayoutMetrics", session)["cssContentSize"]["height"], MAX_SHOT_HEIGHT))
    dt.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height, deviceScaleFactor=1,
            mobile=False)
    dt.drain(0.3)
    shot = dt.call("Page.captureScreenshot", session, format="png",
                   clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
    dt.call("Emulation.setDeviceMetricsOverride", session, width=width, height=HEIGHT, deviceScaleFactor=1,
            mobile=False)
    out = shots / (rel[:-len(".html")].replace("/", "__") + ".png")
    import base64

    out.write_bytes(base64.b64decode(shot["data"]))
    return problems


def pages(html_root: Path) -> list[str]:
    """Every page a reader can reach: all .html files but the redirecting index and Sphinx's internals."""
    out = []
    for p in sorted(html_root.rglob("*.html")):
        rel = p.relative_to(html_root).as_posix()
        if rel.startswith(("_static/", "_sources/", "_images/", "_downloads/")) or rel == "index.html":
            continue
        out.append(rel)
    return out


def check_book(html_root: Path, shots: Path, width: int = WIDTH, chromium: str | None = None) -> dict[str, list[str]]:
    """``{page: problems}`` for every page of the book at ``html_root``; screenshots go to ``shots``."""
    html_root = Path(html_root).resolve()
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(INSTALL_HINT)
    if not (html_root / "intro.html").is_file() and not (html_root / "index.html").is_file():
        raise FileNotFoundError(f"no built book at {html_root}; build it first")
    shots.mkdir(parents=True, exist_ok=True)
    for old in shots.glob("*.png"):
        old.unlink()
    server, base = serve(html_root)
    profile = Path(tempfile.mkdtemp(prefix="lmbook-chromium-"))
    proc = None
    try:
        proc, ws = launch(chromium, profile, width, HEIGHT)
        dt = DevTools(ws)
        target = dt.call("Target.createTarget", url="about:blank")["targetId"]
        session = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        dt.call("Emulation.setDeviceMetricsOverride", session, width=width, height=HEIGHT,
                deviceScaleFactor=1, mobile=False)
        for domain in ["Page", "Runtime", "Network", "Log"]:
            dt.call(f"{domain}.enable", session)
        results = {rel: check_page(dt, session, base, html_root, rel, shots, width) for rel in pages(html_root)}
        dt.close()
        return results
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default=str(ROOT / "_build" / "html"),
                    help="the built book (default _build/html)")
    ap.add_argument("--screenshots", default=str(ROOT / "_build" / "screenshots"),
                    help="folder for one PNG per page (default _build/screenshots)")
    ap.add_argument("--width", type=int, default=WIDTH, help=f"window width in CSS pixels (default {WIDTH})")
    args = ap.parse_args(argv)
    if find_chromium() is None:
        print(f"browser check skipped: {INSTALL_HINT}")
        return 2
    results = check_book(Path(args.html), Path(args.screenshots), args.width)
    bad = {p: v for p, v in results.items() if v}
    for page, problems in results.items():
        print(f"{'FAIL' if problems else 'ok  '} {page}")
        for pr in problems:
            print(f"       {pr}")
    print(f"{len(results)} pages, {len(bad)} with problems; screenshots in {args.screenshots}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

"""noVNC (npm @novnc/novnc) in headless Chromium (Debian's chromium) through websockify
(PyPI) shows kemu's screen: the canvas noVNC drew equals QMP screendump's pixels, and a
command noVNC types (as QEMU extended key events) runs in the guest."""

import base64
import http.server
import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

qmp_mod = pytest.importorskip("qemu.qmp", reason="qemu.qmp is not installed (bootstrap --test)")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: where scripts/bootstrap.sh --test puts noVNC (npm install @novnc/novnc)
NOVNC = Path(os.environ.get("KEMU_NOVNC", Path.home() / ".cache" / "kemu" / "novnc"
                            / "node_modules" / "@novnc" / "novnc"))

PAGE = """<!doctype html><html><body style="margin:0">
<div id="screen" style="width:1280px;height:800px"></div>
<script type="module">
import RFB from './core/rfb.js';
const rfb = new RFB(document.getElementById('screen'), 'ws://127.0.0.1:WSPORT/');
async function send() {
  const canvas = document.querySelector('#screen canvas');
  if (canvas && canvas.width > 1) {
    await fetch('/capture', {method: 'POST', body: canvas.toDataURL('image/png')});
  }
  setTimeout(send, 300);
}
// Type KEYS (keysym, DOM code) with noVNC's sendKey: to kemu, as to QEMU, noVNC sends
// them as QEMU extended key events (scancodes) once the server acknowledged those.
const KEYS = KEYLIST;
async function type() {
  while (!rfb._qemuExtKeyEventSupported) { await new Promise(r => setTimeout(r, 100)); }
  for (const [keysym, code, shift] of KEYS) {
    if (shift) rfb.sendKey(0xffe1, 'ShiftLeft', true);
    rfb.sendKey(keysym, code, true);
    rfb.sendKey(keysym, code, false);
    if (shift) rfb.sendKey(0xffe1, 'ShiftLeft', false);
  }
}
rfb.addEventListener('connect', () => { setTimeout(send, 300); type(); });
</script></body></html>
"""

#: DOM key codes of the characters the test types (US layout).
DOM_CODES = {**{c: f"Key{c.upper()}" for c in "abcdefghijklmnopqrstuvwxyz"},
             **{c: (f"Key{c}", True) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"},
             **{d: f"Digit{d}" for d in "0123456789"}, " ": "Space", "-": "Minus",
             "/": "Slash", "|": ("Backslash", True), "$": ("Digit4", True),
             "(": ("Digit9", True), ")": ("Digit0", True), "*": ("Digit8", True)}


def key_list(text: str) -> list:
    keys = []
    for ch in text:
        code = DOM_CODES[ch]
        code, shift = code if isinstance(code, tuple) else (code, False)
        keys.append([ord(ch), code, shift])
    return keys + [[0xFF0D, "Enter", False]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Captures(http.server.ThreadingHTTPServer):
    """Serves noVNC and the page; keeps the canvases the page posts."""

    def __init__(self, page: str):
        self.page = page.encode()
        self.captures = []
        self.arrived = threading.Condition()
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(NOVNC), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/page.html":
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(self.server.page)
                return
            super().do_GET()

        def guess_type(self, path):
            return "text/javascript" if str(path).endswith(".js") else super().guess_type(path)

        def do_POST(self):
            data = self.rfile.read(int(self.headers["Content-Length"]))
            png = base64.b64decode(data.split(b",", 1)[1])
            with self.server.arrived:
                self.server.captures.append(Image.open(io.BytesIO(png)).convert("RGB"))
                self.server.arrived.notify_all()
            self.send_response(204)
            self.end_headers()


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (bootstrap --test)")
@pytest.mark.skipif(not (NOVNC / "core" / "rfb.js").is_file(),
                    reason=f"noVNC is not installed at {NOVNC} (bootstrap --test)")
def test_novnc_in_chromium_shows_the_login_banner(console_factory, tmp_path):
    pytest.importorskip("websockify", reason="websockify is not installed (bootstrap --test)")
    from test_display_aarch64 import Qmp, free_display, read_ppm
    n = free_display()
    sock = tmp_path / "qmp.sock"
    con = console_factory("run", "-vnc", f"127.0.0.1:{n}",
                          "-qmp", f"unix:{sock},server=on,wait=off")
    con.expect(rb"# ", timeout=180)
    con.run("echo 0 > /sys/class/graphics/fbcon/cursor_blink")
    ws_port = free_port()
    ws = subprocess.Popen([sys.executable, "-m", "websockify", f"127.0.0.1:{ws_port}",
                           f"127.0.0.1:{5900 + n}"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    import json
    typed = "echo novnc-typed-$((6*7)) | tee /dev/ttyAMA0"
    web = Captures(PAGE.replace("WSPORT", str(ws_port))
                   .replace("KEYLIST", json.dumps(key_list(typed))))
    threading.Thread(target=web.serve_forever, daemon=True).start()
    browser = None
    q = Qmp(sock)
    try:
        for _ in range(100):          # websockify listening
            try:
                socket.create_connection(("127.0.0.1", ws_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        browser = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--window-size=1300,900", f"--user-data-dir={tmp_path / 'chromium'}",
             f"http://127.0.0.1:{web.server_address[1]}/page.html"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # what noVNC typed ran in the guest (its output echoed to the serial console)
        con.expect(rb"novnc-typed-42", timeout=120)
        # The screen may still change after the echo (the prompt, a late kernel line):
        # each round takes a fresh screendump; noVNC must have drawn one of them exactly.
        dump = tmp_path / "screen.ppm"
        dumps: list = []
        deadline = time.monotonic() + 120
        matched = False
        while time.monotonic() < deadline and not matched:
            q.execute("screendump", {"filename": str(dump)})
            expected = read_ppm(dump)
            assert expected.getbbox() is not None
            dumps.append(expected)
            with web.arrived:
                web.arrived.wait(1)
                captures = list(web.captures)
            matched = any(c.size == d.size and c.tobytes() == d.tobytes()
                          for c in captures[-20:] for d in dumps[-5:])
        assert web.captures, "noVNC drew nothing (no canvas arrived)"
        assert matched, f"noVNC's canvas never equalled the screendump ({len(web.captures)} seen)"
    finally:
        q.close()
        if browser is not None:
            browser.kill()
            browser.wait()
        ws.kill()
        ws.wait()
        web.shutdown()
    con.send("poweroff -f\n")
    assert con.wait(60) == 0

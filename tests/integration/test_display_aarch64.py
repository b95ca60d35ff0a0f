"""The screen of the default guest: Linux's virtio_gpu DRM driver runs fbcon on kemu's
virtio-gpu; QMP screendump (qemu.qmp), a VNC client from PyPI (vncdotool) and the serial
console all see the same guest.  ``kemu run -vnc`` picks the guest's display flavour."""

import asyncio
import re
import socket
import threading
import time

import pytest

qmp = pytest.importorskip("qemu.qmp", reason="qemu.qmp is not installed (bootstrap --test)")
vncapi = pytest.importorskip("vncdotool.api", reason="vncdotool is not installed (bootstrap --test)")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def display_guest():
    from kemu.errors import GuestBuildError
    from kemu.guest.debian import default_guest
    try:
        return default_guest("aarch64-display", show_progress=False)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the display guest here: {e}")


def free_display() -> int:
    for n in range(200, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 5900 + n))
                return n
            except OSError:
                continue
    pytest.skip("no free VNC port")


def read_ppm(path) -> "Image.Image":
    img = Image.open(path)
    assert img.format == "PPM"
    return img.convert("RGB")


class Qmp:
    """qemu.qmp's client on its own event loop thread, called synchronously."""

    def __init__(self, path):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = qmp.QMPClient("kemu-display-test")
        self.events = []
        self.call(self.client.connect(str(path)))
        self.listener = qmp.EventListener()
        self.client.register_listener(self.listener)

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def execute(self, cmd, args=None):
        return self.call(self.client.execute(cmd, args or {}))

    def event_names(self):
        async def drain():
            names = []
            while not self.listener.empty():
                names.append((await self.listener.get())["event"])
            return names
        self.events += self.call(drain())
        return self.events

    def close(self):
        self.call(self.client.disconnect())
        self.loop.call_soon_threadsafe(self.loop.stop)


def set_desktop_size(port: int, width: int, height: int) -> int:
    """SetDesktopSize from a bare RFB 3.8 client; the status of the server's answer."""
    import struct
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        f = s.makefile("rb")
        f.read(12)
        s.sendall(b"RFB 003.008\n")
        f.read(f.read(1)[0])
        s.sendall(b"\x01")
        f.read(4)
        s.sendall(b"\x01")
        f.read(20)
        f.read(struct.unpack(">I", f.read(4))[0])
        s.sendall(struct.pack(">BxHi", 2, 1, -308))                  # ExtendedDesktopSize
        s.sendall(struct.pack(">BxHHBx", 251, width, height, 1)
                  + struct.pack(">IHHHHI", 0, 0, 0, width, height, 0))
        s.sendall(struct.pack(">BBHHHH", 3, 1, 0, 0, width, height))
        while True:                                                  # the answer (reason 1)
            assert f.read(1) == b"\x00"
            f.read(1)
            for _ in range(struct.unpack(">H", f.read(2))[0]):
                x, y, w, h, e = struct.unpack(">HHHHi", f.read(12))
                assert e == -308, e
                f.read(4 + 16 * f.peek(1)[0])
                if x == 1:
                    return y
            s.sendall(struct.pack(">BBHHHH", 3, 1, 0, 0, width, height))


def wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    return cond()


def test_vnc_screendump_and_typing_into_the_guest(display_guest, console_factory, tmp_path):
    n = free_display()
    sock = tmp_path / "qmp.sock"
    con = console_factory("run", "-vnc", f"127.0.0.1:{n}",
                          "-qmp", f"unix:{sock},server=on,wait=off")
    con.expect(rb"# ", timeout=180)
    assert con.run("cat /sys/class/drm/card0-Virtual-1/status").strip() == "connected"
    assert "fb0" in con.run("ls /sys/class/graphics")
    # the console's cursor blinks: stop it, so two captures of an idle screen agree
    con.run("echo 0 > /sys/class/graphics/fbcon/cursor_blink")
    q = Qmp(sock)
    try:
        vnc = q.execute("query-vnc")
        assert vnc["enabled"] and vnc["service"] == str(5900 + n) and vnc["auth"] == "none"

        def screendump(name, fmt=None):
            path = tmp_path / name
            q.execute("screendump", {"filename": str(path), **({"format": fmt} if fmt else {})})
            return read_ppm(path) if fmt is None else Image.open(path).convert("RGB")

        before = screendump("before.ppm")
        assert before.size == (1280, 800)
        assert before.getbbox() is not None, "the screen is blank"       # fbcon drew text
        assert screendump("before.png", "png").tobytes() == before.tobytes()

        client = vncapi.connect(f"127.0.0.1:{n}", timeout=60)      # display number
        try:
            client.refreshScreen()
            assert client.screen.convert("RGB").tobytes() == before.tobytes()
            assert wait_for(lambda: "VNC_INITIALIZED" in q.event_names())
            assert len(q.execute("query-vnc")["clients"]) == 1
            # A command typed over VNC runs on tty1; its output also goes to the serial port.
            for ch in "echo vnc-typed-$((6*7)) | tee /dev/ttyAMA0":
                client.keyPress(ch)            # X keysyms; shifted ones get a Shift
            client.keyPress("enter")
            con.expect(rb"vnc-typed-42", timeout=60)
            after = wait_for(lambda: (lambda img: img if img.tobytes() != before.tobytes()
                                      else None)(screendump("after.ppm")))
            assert after is not None, "typing changed nothing on the screen"
            # The pointer: the tablet's evdev node gets the absolute position.
            found = con.run("grep -l Tablet /sys/class/input/event*/device/name")
            node = re.search(r"(event\d+)/device/name", found).group(1)
            # three struct input_event records (ABS_X, ABS_Y, SYN), once dd has the node open
            con.run(f"(dd if=/dev/input/{node} of=/tmp/p bs=24 count=3 2>/dev/null &)")
            con.run(f"until ls -l /proc/*/fd 2>&- | grep -q {node}; do sleep 0.05; done")
            client.mouseMove(640, 400)

            def abs_events():
                """(code, value) of the EV_ABS events in struct input_event records."""
                out = []
                for line in con.run("hexdump -v -e '24/1 \"%02x\" \"\\n\"' /tmp/p").split():
                    rec = bytes.fromhex(line)[16:] if len(line) == 48 else b""
                    if rec[:2] == b"\x03\x00":
                        out.append((int.from_bytes(rec[2:4], "little"),
                                    int.from_bytes(rec[4:8], "little")))
                return out
            # pixel (640, 400) of 1280x800 on the 0..32767 axes (ABS_X 0, ABS_Y 1)
            want = [(0, 640 * 32767 // 1279), (1, 400 * 32767 // 799)]
            assert wait_for(lambda: all(w in abs_events() for w in want)), abs_events()
            # what the VNC client sees now is what screendump gives
            wait_for(lambda: client.refreshScreen() or
                     client.screen.convert("RGB").tobytes() == screendump("now.ppm").tobytes())
            assert client.screen.convert("RGB").tobytes() == screendump("now.ppm").tobytes()
        finally:
            client.disconnect()
        assert wait_for(lambda: "VNC_DISCONNECTED" in q.event_names())
        assert q.event_names()[:3] == ["VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"]
        # A client resizes the desktop (ExtendedDesktopSize): the guest's driver gets the
        # display event, reads the new mode and sets it; screendump follows.
        assert set_desktop_size(5900 + n, 1024, 768) == 0
        assert wait_for(lambda: screendump("resized.ppm").size == (1024, 768))
        assert "1024x768" in con.run("cat /sys/class/drm/card0-Virtual-1/modes")
    finally:
        q.close()
    con.send("poweroff -f\n")
    assert con.wait(60) == 0
    assert "Traceback" not in con.stderr

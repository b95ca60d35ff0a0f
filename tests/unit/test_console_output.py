"""The console's output buffer (issue 16, item 5): a stdout nobody reads never
blocks the writer; what does not fit is dropped and counted."""

import fcntl
import os
import struct
import termios
import threading
import time

from kemu.console import ConsoleOutput


def queued(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` reads from."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def test_unread_pipe_never_blocks_and_drops_beyond_the_bound():
    r, w = os.pipe()
    try:
        out = ConsoleOutput(w, limit=256 * 1024)
        def writes() -> None:
            for _ in range(64):
                out.write(b"x" * 32 * 1024)      # 2 MiB into a pipe nobody reads
        writer = threading.Thread(target=writes, daemon=True)
        writer.start()
        writer.join(60)                          # a write that blocked would never end
        assert not writer.is_alive(), "write() blocked on the unread pipe"
        # The writer fills the pipe on its own thread: wait for that (it takes
        # longer on a loaded host), not for a time.
        deadline = time.monotonic() + 60
        while queued(r) < 60000:
            assert time.monotonic() < deadline, f"the pipe holds only {queued(r)} bytes"
            time.sleep(0.01)
        dropped = out.close(patience=0.2)
        # The pipe took at most 64 KiB; the rest was buffered, then dropped.
        assert 2 * 1024 * 1024 - 65536 - 4096 <= dropped <= 2 * 1024 * 1024 - 60000
    finally:
        os.close(r)
        os.close(w)


def test_a_reader_gets_everything_in_order():
    r, w = os.pipe()
    out = ConsoleOutput(w, limit=1 << 20)
    data = bytes(range(256)) * 2048                   # 512 KiB
    for i in range(0, len(data), 1000):
        out.write(data[i:i + 1000])
    got = bytearray()
    while len(got) < len(data):
        got += os.read(r, 65536)
    assert out.close() == 0
    assert bytes(got) == data
    os.close(r)
    os.close(w)

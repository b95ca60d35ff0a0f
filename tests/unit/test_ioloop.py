"""The board's I/O loop: teardown from two threads at once.

The API's watcher thread and the caller's ``wait()`` both close a machine that
ended; each closes the I/O loop.  Both must return cleanly and the loop's
descriptors must be closed exactly once.
"""

from __future__ import annotations

import os
import threading

from kemu.backends.ioloop import EVENT_READ, IoLoop


def test_close_from_two_threads_at_once() -> None:
    loop = IoLoop()
    r, w = os.pipe()
    try:
        got = threading.Event()
        loop.watch(r, EVENT_READ, lambda mask: (os.read(r, 1), got.set()))
        loop.start()
        os.write(w, b"x")
        assert got.wait(10), "the loop did not serve a ready descriptor"
        errors: list[BaseException] = []
        barrier = threading.Barrier(2)

        def close() -> None:
            barrier.wait()
            try:
                loop.close()
            except BaseException as e:   # noqa: BLE001 (the test reports it)
                errors.append(e)
        threads = [threading.Thread(target=close) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert errors == []
        loop.close()                     # and once more, from this thread
    finally:
        os.close(r)
        os.close(w)

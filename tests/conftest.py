"""What every test file shares.

vncdotool (the VNC client of the display tests) runs one Twisted reactor per
process, which cannot be started again once stopped: it is stopped once, when
the whole session ends, not by each test file that used it.
"""

from __future__ import annotations

import sys


def pytest_sessionfinish(session, exitstatus) -> None:
    api = sys.modules.get("vncdotool.api")
    if api is not None:
        api.shutdown()

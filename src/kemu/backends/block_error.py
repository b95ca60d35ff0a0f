"""What a disk does when the host fails a request: QEMU's ``werror=`` and
``rerror=`` (QAPI ``BlockdevOnError``, block/block-backend.c
``blk_get_error_action``) and the data of its ``BLOCK_IO_ERROR`` event.

* ``report``: the guest gets an I/O error (default for reads);
* ``ignore``: the guest is told the request succeeded;
* ``stop``: the request is held, the machine pauses (run state
  ``io-error``) and ``cont`` retries it;
* ``enospc``: ``stop`` when the host is out of space, else ``report``
  (default for writes).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass

#: The policies -drive accepts for werror= and rerror=.
ON_ERROR = ("enospc", "stop", "report", "ignore")
DEFAULT_WERROR = "enospc"
DEFAULT_RERROR = "report"


def error_action(policy: str, err: int) -> str:
    """``report``, ``ignore`` or ``stop`` for a request that failed with ``err``."""
    if policy == "enospc":
        return "stop" if err == errno.ENOSPC else "report"
    if policy not in ON_ERROR:
        raise ValueError(f"unknown error policy {policy!r}")
    return policy


@dataclass(frozen=True)
class BlockIOErrorInfo:
    """One failed request, as QEMU's BLOCK_IO_ERROR reports it."""

    device: str
    node_name: str
    operation: str          # "read" or "write"
    action: str             # "report", "ignore" or "stop"
    errno: int

    @property
    def nospace(self) -> bool:
        return self.errno == errno.ENOSPC

    @property
    def reason(self) -> str:
        return os.strerror(self.errno)

    def qmp_data(self) -> dict:
        return {"device": self.device, "node-name": self.node_name,
                "operation": self.operation, "action": self.action,
                "nospace": self.nospace, "reason": self.reason}

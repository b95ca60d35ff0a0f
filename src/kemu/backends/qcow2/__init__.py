"""qcow2 disk images, interoperable with QEMU (docs/interop/qcow2.txt).

* :mod:`.header` -- header and header extensions, validated;
* :mod:`.refcount` -- refcount table and blocks, cluster allocation;
* :mod:`.image` -- :class:`Qcow2Image`, the block backend (L1/L2 mapping,
  backing files, copy-on-write, compressed and zero clusters);
* :mod:`.create` -- new images;
* :mod:`.check` -- consistency check (as ``qemu-img check``).
"""

from kemu.backends.qcow2.check import CheckResult, check_qcow2
from kemu.backends.qcow2.create import create_qcow2
from kemu.backends.qcow2.header import Header, parse_header
from kemu.backends.qcow2.image import Qcow2Image

__all__ = ["CheckResult", "Header", "Qcow2Image", "check_qcow2", "create_qcow2", "parse_header"]

"""QEMU's option model: argv (keyval and JSON forms) into a :class:`MachineConfig`.

One place for it, used by the command line (:mod:`kemu.cli`), the Python API
and QMP's device and object commands:

* :mod:`.keyval`  the syntax: ``,,``, implied keys, ``help``, JSON arguments, sizes
* :mod:`.argv`    the option table: which option sets what in the config
* :mod:`.drive`, :mod:`.device`, :mod:`.netdev`, :mod:`.sockets`: one option each
"""

from kemu.options.argv import parse_qemu_options
from kemu.options.device import device_from_qmp, parse_device
from kemu.options.keyval import parse_option, parse_size, split_opts

__all__ = ["device_from_qmp", "parse_device", "parse_option", "parse_qemu_options",
           "parse_size", "split_opts"]

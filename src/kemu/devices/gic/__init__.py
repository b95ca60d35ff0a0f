"""ARM Generic Interrupt Controllers: GICv2 (:mod:`.v2`) and GICv3 (:mod:`.v3`,
:mod:`.redistributor`, :mod:`.cpuif`) over one interrupt state machine
(:mod:`.core`).  The GICv2 names are re-exported here."""

from kemu.devices.gic.v2 import *  # noqa: F401,F403

"""The design card's spelling, ``relay.transform.LUTify()``, as a thin alias of the Relax passes.

TVM 0.27 has no Relay; ``from tvm_lut import relay; relay.transform.LUTify`` is ``relay_passes.LUTify``.
"""

from types import SimpleNamespace

import relay_passes

transform = SimpleNamespace(LUTify=relay_passes.LUTify, PriorityMask=relay_passes.PriorityMask,
                            EZCrop=relay_passes.EZCrop, TabulateSubnetworks=relay_passes.TabulateSubnetworks)

__all__ = ["transform"]

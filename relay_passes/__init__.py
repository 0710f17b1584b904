"""Relax passes of tvm-lut (TVM 0.27 has no Relay; the card's ``relay.transform`` name is kept as an alias).

One pass per module, CamelCase class named like the pass, as in ``tvm/relax/transform/``.
"""

from .ezcrop import EZCROP_ATTR, EZCrop
from .lutify import LAYERS_ATTR, MASK_ATTR, LUTify
from .priority_mask import Budget, PriorityMask
from .tabulate import TABLES_ATTR, TabulateSubnetworks

__all__ = ["LUTify", "PriorityMask", "Budget", "EZCrop", "TabulateSubnetworks", "LAYERS_ATTR", "MASK_ATTR", "EZCROP_ATTR", "TABLES_ATTR"]

"""The built-in rewrite methods, registered on import: ``pq`` (table lookup), ``butterfly`` (DeBut factor
chains), ``lowrank`` (EVBMF-ranked factors), ``int8`` (the exact layer in int8 arithmetic, VNNI); ``exact``
is the absence of a rewrite. A method of one's own
is a module like these: subclass ``registry.RewriteMethod`` and ``registry.register`` an instance."""

# each module registers its method; the order is the order users see (pq first: the default)
from . import pq  # noqa: F401  isort: skip
from . import butterfly, lowrank  # noqa: F401  isort: skip
from . import int8  # noqa: F401  isort: skip

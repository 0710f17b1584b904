"""The rewrite methods, by name: one interface for every way a conv/dense layer can be rewritten.

A method is a ``RewriteMethod`` registered under its ``name`` (the ``method`` of ``LUTify``, of a layer's
options and of ``tvm-lut compile --method``). The planner and the rewrite service know methods only
through this interface, so adding one is one module that subclasses ``RewriteMethod`` and calls
``register``; nothing else changes. (Whole-subnetwork tables, HKLUT's, are not a per-layer method: a
subnetwork spans several layers and their activations, so ``relay_passes.tabulate.TabulateSubnetworks`` is
its own Relax pass, one module beside ``LUTify``.) The interface:

* ``configure(plan, options, planner)``: the method's options into the layer's record, when the layer
  gets this method;
* ``fit(plan, planner, rows)``: fit what the rewrite needs (``plan.state``, or the built-ins' typed
  fields); ``rows`` are the layer's calibration inputs when the method says ``calibrated = True``.
  Raising ``KeepExact`` keeps the layer exact with that reason;
* ``account(plan)``: the rewritten layer's op counts (``lut_ops``) and bytes into the record
  (``tvm_lut.math.cost`` has the formulas);
* ``emit(emitter, plan, x, as_output)``: the layer's computation from input ``x`` with the emitter's
  builder and kernel cache (``rewrite.LookupEmitter``), ending with ``emitter.epilogue``;
* ``columns(record)``: what the report shows for the layer (a short parameter string).

``exact`` is a name here too (no rewrite), so every method a user can name is listed by ``names()``.
"""

from __future__ import annotations

from tvm_lut.errors import OptionError

# ``plan`` is a ``rewrite.Plan`` and ``emitter`` a ``rewrite.LookupEmitter``, named here without an import: the rewrite
# service imports this module, never the other way round


class KeepExact(OptionError):
    """Raised by ``fit`` when the method cannot serve this layer (no chain within budget, a rank that saves
    nothing): the layer stays exact with this reason. Other errors (a user's factors that do not fit the
    layer) reach the user."""


class RewriteMethod:
    """Base of the rewrite methods; see the module docstring for the interface."""

    name: str = ""
    calibrated: bool = False  # fit() takes the layer's calibration rows
    description: str = ""

    def configure(self, plan, options, planner) -> None:
        """Record the method's options for ``plan`` (default: none)."""

    def needs_rows(self, plan, planner) -> bool:
        """Whether ``fit`` needs the layer's calibration rows (collected for all such layers in one run)."""
        return self.calibrated

    def fit(self, plan, planner, rows=None, targets=None) -> None:
        raise NotImplementedError(f"rewrite method {self.name!r} does not implement fit")

    def account(self, plan) -> None:
        raise NotImplementedError(f"rewrite method {self.name!r} does not implement account")

    def emit(self, emitter, plan, x, as_output: bool):
        raise NotImplementedError(f"rewrite method {self.name!r} does not implement emit")

    def columns(self, record: dict) -> str:
        return ""


_METHODS: dict[str, RewriteMethod] = {}


def register(method: RewriteMethod) -> RewriteMethod:
    """Make ``method`` available under ``method.name`` (a second registration of a name replaces it)."""
    if not method.name or not method.name.replace("_", "").replace("-", "").isalnum():
        raise OptionError(f"a rewrite method needs a plain name, got {method.name!r}")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove the method registered as ``name`` (a test's or a plugin's own; built-ins can be too)."""
    _METHODS.pop(name, None)


def get(name: str) -> RewriteMethod:
    """The method registered as ``name``; an ``OptionError`` naming the registered ones otherwise."""
    try:
        return _METHODS[name]
    except KeyError:
        raise OptionError(f"unknown method {name!r}; choose one of {', '.join(names())}") from None


def names() -> list[str]:
    """Every method a user can name: the registered ones and ``exact``."""
    return [*_METHODS, "exact"]

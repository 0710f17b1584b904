"""``Target``: one object per kind of machine tvm-lut builds for, each with the same face.

Like TVM's ``relax/backend/<target>/``, every target answers the same questions, so no other module asks
"is this ARM?": how its name resolves, what code built for it may execute, which table-readout kernel a
PQ layer gets on it, which hand schedules its kernels get, where its calibration and accuracy runs
happen, how its library is exported, what the report says about it. A new target is one module here with
a ``Target`` subclass and one entry in ``tvm_lut.targets.KINDS``.
"""

from __future__ import annotations

import tvm

from tvm_lut.errors import OptionError, TargetError
from tvm_lut.math import distances
from tvm_lut.targets.isa import ShuffleISA, isa_for


class Target:
    """A build target: ``tvm`` (the ``tvm.target.Target`` code is built with) and what it implies.

    Subclasses set ``family`` and ``farm_key`` and override what differs, and say where their calibration
    runs (``local``). A TVM target of no family of ours resolves to ``tvm_lut.targets.Other``."""

    family = "other"
    names: tuple[str, ...] = ()  # the names ``from_name`` takes, as the docs and errors list them
    farm_key: str | None = None  # RPC key of devices that run its code (``tvm-lut farm``); None: none do
    schedule = "cpu"  # the hand schedules its kernels get (``tir_schedules.schedule_for``)

    def __init__(self, tvm_target: tvm.target.Target):
        self.tvm = tvm_target

    # -- resolution: which objects a name or a tvm target becomes (``tvm_lut.targets.resolve``) --
    @classmethod
    def from_name(cls, name: str) -> Target | None:
        """The target a command-line name means, or None when the name is not this kind's."""
        return None

    @classmethod
    def claims(cls, tvm_target: tvm.target.Target) -> bool:
        """Whether a ``tvm.target.Target`` given as is belongs to this kind."""
        return False

    # -- what it is --
    @property
    def name(self) -> str:
        """The short name a manifest records (``x86``, ``x86:znver4``, ``arm``, ``cam``)."""
        return str(self.tvm)

    def instruction_sets(self) -> list[str]:
        """The instruction-set extensions its code may use ([] where none is checked before loading)."""
        return []

    def runs_here(self) -> bool:
        """Whether code built for it runs in this (x86-64) process."""
        return False

    def local(self) -> Target:
        """Where calibration, priority-mask and accuracy runs happen for a build for this target: the target
        itself when its code runs here as built, else this host (same tables, the host's kernels)."""
        raise NotImplementedError(f"{type(self).__name__} does not say where its calibration runs")

    # -- lookups --
    def shuffle_isa(self, grouped: bool = True) -> ShuffleISA | None:
        """The widest byte shuffle its lookups can use (``isa.isa_for``), or None (gather lookups)."""
        return isa_for(self.tvm, grouped)

    def lookup_kernel(self, lookup: str, k: int, rows: int, kind: str, distance: str, name: str = "") -> str:
        """The table-readout kernel a PQ layer gets: ``"gather"``, ``"shuffle-<isa>"`` (or ``"cam"``).

        ``lookup`` is LUTify's option (``auto``/``shuffle``/``gather``), ``rows`` the layer's rows per call
        (batch x output pixels), ``kind`` ``"conv2d"`` or ``"dense"``. Tests derive their expectations from
        this method, so they hold on every ISA level."""
        if lookup == "gather":
            return "gather"
        isa = self.shuffle_isa()
        if lookup == "shuffle":
            if isa is None or k != 16:
                raise OptionError(f"lookup='shuffle' for layer {name!r} needs K=16 (got K={k}) and a target "
                                  f"with byte shuffles (SSSE3/AVX2/AVX-512BW, or NEON tbl); got {self.name}")
            return f"shuffle-{isa.name}"
        # the shuffle kernel computes a whole row block (isa.lanes rows) per pass: too few rows waste it.
        # A conv still gains from it with one 16-row encoder tile: the encoder reads the input in place
        # (no im2col kernel) and the lookup streams its tables once instead of gathering table rows
        # (measured: 512->512 3x3 on a 4x4 map, 0.161 vs 0.251 ms with hot tables, more when cold). A
        # dense layer keeps the gather below half a block (batch 1 Linear 512->256: 0.004 vs 0.020 ms).
        if isa is None or k != 16:
            return "gather"
        if rows < (min(16, isa.lanes // 2) if kind == "conv2d" else isa.lanes // 2):
            return "gather"
        if distances.get(distance).multiplier_free:
            # PECAN-D stays multiplier-free end to end only on the gather path: the shuffle kernel's
            # output addressing compiles to an imul per tile (tests/test_multiplier_free.py)
            return "gather"
        return f"shuffle-{isa.name}"

    # -- deployment --
    def export(self, executable, path: str) -> None:
        """Write ``executable`` (a built module) as a shared library at ``path`` with the compiler it needs."""
        executable.export_library(path)

    candidate_export = None  # MetaSchedule builder export for tuning on its devices (None: TVM's default)

    def check_loadable(self, path: str, manifest: dict) -> None:
        """Before this process loads an artifact built for this target: raise ``ArtifactError`` when its code
        cannot run here (saying where it can), and import what its library calls by name."""

    def check_remote(self, path: str) -> None:
        """Before an artifact built for it is run on a farm device: raise ``TargetError`` when it cannot be."""
        if self.farm_key is None:
            raise TargetError(f"{path}: {self.name} code runs on no farm device; run it locally ('tvm-lut run' "
                              "without --farm)")

    # -- reporting --
    def describe(self) -> dict:
        """What a report and a manifest record about the target."""
        return {"target": str(self.tvm), "target_name": self.name, "instruction_sets": self.instruction_sets()}

    def device_report(self, layers: list[dict], overrides: dict | None = None) -> tuple[str, dict] | None:
        """A report section of its own (its key and content) for a model with these layer records, or None."""
        return None

    def latency_note(self) -> str | None:
        """Why latency is not measured for a build for it here, or None when it is."""
        if not self.runs_here():
            return (f"not measured: {self.name} code does not run here (emulated timings would say nothing "
                    "about the device)")
        return None

    def __str__(self) -> str:
        return str(self.tvm)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

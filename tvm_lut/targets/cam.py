"""The simulated content-addressable memory (``cam``): this host's target tagged with the ``cam`` key.

Each PQ layer's encode and table readout become calls of the CAM simulator (``cam_simulator``, resolved
by name at run time, so the .so runs where that module is imported); the rest of the model runs on the
CPU. Latency is not measured (the simulator's cycles and energy are reported instead).
"""

from __future__ import annotations

import tvm

from tvm_lut.targets.isa import host_target
from tvm_lut.targets.x86 import X86

CAM_KEY = "cam"


class Cam(X86):
    family = "cam"
    names = ("cam",)
    farm_key = None  # the lookups run in the host's simulator: nothing to run or tune remotely

    @classmethod
    def simulated(cls) -> Cam:
        spec = dict(host_target().export())
        spec["keys"] = [CAM_KEY, "cpu"]
        return cls(tvm.target.Target({k: v for k, v in spec.items() if not k.startswith("feature.")}))

    @classmethod
    def from_name(cls, name: str) -> Cam | None:
        return cls.simulated() if name == "cam" else None

    @classmethod
    def claims(cls, tvm_target: tvm.target.Target) -> bool:
        return CAM_KEY in [str(k) for k in tvm_target.keys]

    @property
    def name(self) -> str:
        return "cam"

    def local(self) -> X86:
        """Calibration and accuracy runs use the host without the offload (same tables, CPU kernels)."""
        return X86.host()

    def lookup_kernel(self, lookup: str, k: int, rows: int, kind: str, distance: str, name: str = "") -> str:
        return "cam"  # encode and readout on the CAM simulator

    def check_loadable(self, path: str, manifest: dict) -> None:
        super().check_loadable(path, manifest)
        from tvm_lut.targets import cam_simulator  # noqa: F401  (registers the functions the .so calls by name)

    def check_remote(self, path: str) -> None:
        from tvm_lut.errors import TargetError

        raise TargetError(f"{path}: a cam build calls the CAM simulator of the host process; run it locally "
                          "('tvm-lut run' without --farm)")

    def latency_note(self) -> str | None:
        return "not measured: the CAM layers run in a simulator; see cam (cycles, energy)"

    def device_report(self, layers: list[dict], overrides: dict | None = None) -> tuple[str, dict]:
        """The simulator's cost of the model's PQ layers (cycles, energy), with device-parameter overrides."""
        from tvm_lut.targets import cam_simulator

        params = cam_simulator.CAMParams.from_env().with_overrides(overrides or {})
        return "cam", cam_simulator.model_report(layers, params)

"""tvm-lut: run neural networks by table lookup on stock Apache TVM.

Pipeline (data flows one way)::

    frontend (from_torch / from_onnx) -> LUTify pass (calibrate, learn codebooks, rewrite)
        -> build (TIR kernels, hand-scheduled for the target) -> artifact (.so + params + manifest)
        -> runtime (tvm.runtime + relax.VirtualMachine)

Typical use::

    import tvm_lut
    from tvm_lut import relay
    mod = tvm_lut.from_torch(model, example_inputs)
    mod = relay.transform.LUTify(calibration=batches)(mod)
    lib = tvm_lut.build(mod, target="x86")
    lib.export_library("model.so")
"""

__version__ = "0.1.0"

from relay_passes import LUTify  # noqa: E402

from . import relay  # noqa: E402
from .build import build  # noqa: E402
from .errors import ArtifactError, CalibrationError, LUTError, ModelError, OptionError, TargetError  # noqa: E402
from .frontend import from_exported_program, from_onnx, from_torch, load_model  # noqa: E402

__all__ = [
    "LUTify", "relay", "build", "from_torch", "from_onnx", "from_exported_program", "load_model",
    "LUTError", "ModelError", "CalibrationError", "OptionError", "TargetError", "ArtifactError",
]

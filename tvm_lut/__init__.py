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

from tvm_lut.runtime.build import build  # noqa: E402
from tvm_lut.errors import ArtifactError, CalibrationError, LUTError, ModelError, OptionError, TargetError  # noqa: E402
from tvm_lut.frontend.importer import from_exported_program, from_onnx, from_torch, load_model  # noqa: E402



def __getattr__(name: str):
    # The passes live in the sibling package ``relay_passes``, which itself imports tvm_lut's math
    # modules; resolving them lazily keeps either import order working.
    if name == "LUTify":
        from relay_passes import LUTify

        return LUTify
    if name == "relay":
        import importlib

        return importlib.import_module(".relay", __name__)
    raise AttributeError(f"module 'tvm_lut' has no attribute {name!r}")


__all__ = [
    "LUTify", "relay", "build", "from_torch", "from_onnx", "from_exported_program", "load_model",
    "LUTError", "ModelError", "CalibrationError", "OptionError", "TargetError", "ArtifactError",
]

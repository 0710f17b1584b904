"""Errors tvm-lut raises for bad input. Each message names the offending model, layer, array or file.

They are registered with tvm-ffi so that one raised inside a pass (``LUTify`` runs through TVM's
FFI) reaches the caller as the same class, not as a generic ``RuntimeError``.
"""

from __future__ import annotations

import tvm_ffi


@tvm_ffi.register_error
class LUTError(ValueError):
    """Base class: a problem with what the user gave us (not a bug in tvm-lut)."""


@tvm_ffi.register_error
class ModelError(LUTError):
    """The model file is missing, corrupt, or uses something the frontend cannot import."""


@tvm_ffi.register_error
class CalibrationError(LUTError):
    """Calibration data is empty, non-finite, too small, or does not match the model's inputs."""


@tvm_ffi.register_error
class OptionError(LUTError):
    """An option names an unknown layer, method, distance or value out of range."""


@tvm_ffi.register_error
class TargetError(LUTError):
    """An unknown or unsupported compilation target."""


@tvm_ffi.register_error
class ArtifactError(LUTError):
    """A compiled artifact directory is incomplete, corrupt or has been tampered with."""

"""Errors tvm-lut raises for bad input. Each message names the offending model, layer, array or file."""

from __future__ import annotations


class LUTError(ValueError):
    """Base class: a problem with what the user gave us (not a bug in tvm-lut)."""


class ModelError(LUTError):
    """The model file is missing, corrupt, or uses something the frontend cannot import."""


class CalibrationError(LUTError):
    """Calibration data is empty, non-finite, too small, or does not match the model's inputs."""


class OptionError(LUTError):
    """An option names an unknown layer, method, distance or value out of range."""


class TargetError(LUTError):
    """An unknown or unsupported compilation target."""


class ArtifactError(LUTError):
    """A compiled artifact directory is incomplete, corrupt or has been tampered with."""

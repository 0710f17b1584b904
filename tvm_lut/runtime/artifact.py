"""The compiled artifact on disk, and loading it back to run in a fresh process.

An artifact directory holds::

    model.so        the Relax VM executable (LUT tables and codebooks embedded as constants)
    params.bin      the remaining weights (exact layers), TVM's binary param format (no pickle)
    manifest.json   inputs/outputs, target, per-layer decisions, ops, bytes, accuracy, latency,
                    and the SHA-256 of model.so and params.bin
    report.json     the report part of the manifest, for scripts

Writing is atomic: everything goes to a temporary sibling directory that replaces ``out`` only once
complete, so a failure never leaves a half-written artifact. Loading checks the hashes *before* the
shared library is loaded (loading a .so runs its code).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid

import numpy as np

from tvm_lut import targets
from tvm_lut.errors import ArtifactError
from tvm_lut.frontend.native_log import quiet_native

FORMAT = "tvm-lut-artifact/1"
FILES = ("model.so", "params.bin", "manifest.json")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def replace_dir(tmp: str, out: str) -> None:
    """Move a completed temporary directory into place, replacing an older ``out``."""
    if os.path.exists(out):
        old = out.rstrip("/") + ".old-" + uuid.uuid4().hex[:8]
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def staging_dir(out: str) -> str:
    """A fresh temporary directory next to ``out`` (same filesystem, so the final rename is atomic)."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(out)) + ".tmp-", dir=parent)
    os.chmod(tmp, 0o755)
    return tmp


def save(out: str, executable, params: list[tuple[str, np.ndarray]], manifest: dict, target="x86") -> None:
    """Write an artifact directory atomically (``model.so`` built with the compiler ``target`` needs)."""
    import tvm

    tmp = staging_dir(out)
    try:
        so = os.path.join(tmp, "model.so")
        with quiet_native():  # TVM lists the executable's memory scopes on export: not for the user
            targets.resolve(target).export(executable, so)
        pbin = os.path.join(tmp, "params.bin")
        tvm.runtime.save_param_dict_to_file({n: tvm.runtime.tensor(np.ascontiguousarray(v)) for n, v in params}, pbin)
        manifest = dict(manifest)
        manifest["format"] = FORMAT
        manifest["params"] = [n for n, _ in params]
        manifest["sha256"] = {"model.so": _sha256(so), "params.bin": _sha256(pbin)}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(manifest.get("report", {}), f, indent=1)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(path: str, manifest: dict) -> None:
    """Check the files' SHA-256 against the manifest (before anything loads the shared library)."""
    for name, digest in manifest["sha256"].items():
        if _sha256(os.path.join(path, name)) != digest:
            raise ArtifactError(f"{path}/{name}: SHA-256 does not match the manifest (corrupt or tampered)")


def read_manifest(path: str) -> dict:
    """The manifest of an artifact directory, checked for the fields ``run`` relies on."""
    if not os.path.isdir(path):
        raise ArtifactError(f"{path}: not an artifact directory (run 'tvm-lut compile' first)")
    missing = [f for f in FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ArtifactError(f"{path}: incomplete artifact, missing {', '.join(missing)}")
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}/manifest.json: corrupt ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}/manifest.json: not a {FORMAT} manifest")
    for key in ("inputs", "outputs", "params", "sha256"):
        if key not in manifest:
            raise ArtifactError(f"{path}/manifest.json: missing field {key!r}")
    return manifest


class Model:
    """A loaded artifact: ``Model(path).run({"input": array})`` -> {output name: array}.

    Uses only ``tvm.runtime`` and ``relax.VirtualMachine``; datasets of any length are run in
    chunks of the compiled batch size.
    """

    def __init__(self, path: str):
        import tvm

        from tvm_lut.runtime.build import BatchRunner

        self.path = path
        self.manifest = read_manifest(path)
        verify(path, self.manifest)
        targets.of_artifact(self.manifest).check_loadable(path, self.manifest)
        try:
            params = tvm.runtime.load_param_dict_from_file(os.path.join(path, "params.bin"))
            with quiet_native():  # ... and again on load
                lib = tvm.runtime.load_module(os.path.join(path, "model.so"))
        except Exception as exc:
            raise ArtifactError(f"{path}: cannot load the artifact ({exc})") from exc
        missing = [n for n in self.manifest["params"] if n not in params]
        if missing:
            raise ArtifactError(f"{path}/params.bin: missing weights {missing}")
        values = [params[n].numpy() for n in self.manifest["params"]]
        inputs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in self.manifest["inputs"]]
        self.runner = BatchRunner(lib, values, inputs)

    @property
    def inputs(self) -> list[tuple[str, tuple, str]]:
        return self.runner.inputs

    def run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tvm_lut.runtime.calibrate import normalize_inputs

        data = normalize_inputs(arrays, self.runner.inputs, what="input")
        outs = self.runner.run(data)
        return dict(zip(self.manifest["outputs"], outs))


def run_remote(artifact_dir: str, arrays: dict[str, np.ndarray], address: str, key: str) -> dict[str, np.ndarray]:
    """Run an artifact on a farm server: upload ``model.so``, run it in the remote Relax VM batch by batch."""
    import time

    import tvm

    from tvm_lut.runtime.build import BatchRunner
    from tvm_lut.runtime.calibrate import normalize_inputs
    from tvm_lut.targets.farm import request

    manifest = read_manifest(artifact_dir)
    verify(artifact_dir, manifest)
    targets.of_artifact(manifest).check_remote(artifact_dir)
    params = tvm.runtime.load_param_dict_from_file(os.path.join(artifact_dir, "params.bin"))
    inputs = [(i["name"], tuple(i["shape"]), i["dtype"]) for i in manifest["inputs"]]
    data = normalize_inputs(arrays, inputs, what="input")
    sess = request(address, key)
    remote_name = f"tvm_lut_{os.getpid()}_{int(time.time() * 1e3)}.so"
    sess.upload(os.path.join(artifact_dir, "model.so"), remote_name)
    runner = BatchRunner(sess.load_module(remote_name), [params[n].numpy() for n in manifest["params"]], inputs,
                         device=sess.cpu())  # the VM and every tensor live on the remote device
    return dict(zip(manifest["outputs"], runner.run(data)))

"""An emulated aarch64 TVM runtime on this x86 host: cross compiler + qemu-user + an aarch64 CPython.

``tvm-lut farm setup-arm`` (or :func:`setup`) prepares, once:

1. host packages (Debian, as root): ``qemu-user``, the aarch64 cross ``gcc``/``g++`` and the arm64 libc
   headers (``libc6-dev-arm64-cross`` must be named: linking a shared library needs it);
2. a sysroot with an aarch64 ``python3.11`` + ``libstdc++6`` unpacked from Debian's arm64 packages, fetched
   with apt under a *private* state directory (the host's dpkg database is never touched);
3. the aarch64 wheels of the pinned TVM (``apache-tvm``, ``apache-tvm-ffi``, numpy...) installed into the
   sysroot by the host's pip (``--platform manylinux_2_28_aarch64``);
4. ``bin/python3-aarch64``: a wrapper that runs that interpreter under ``qemu-aarch64 -L SYSROOT``, with a
   ``sitecustomize.py`` pointing ``sys.executable`` at the wrapper (``tvm.rpc.Server`` starts its workers with
   ``sys.executable`` and, without binfmt_misc, the kernel cannot exec an aarch64 ELF directly).

Everything goes to a staging directory renamed into place at the end, so a failed setup leaves nothing
half-made; a finished one writes ``ready.json`` and is reused. The home is ``$TVM_LUT_ARM_HOME`` or
``~/.cache/tvm-lut/arm64``.

What this is for: proving that the aarch64 code we generate compiles, loads in a real aarch64 TVM runtime
and gives the same numbers as x86 (``tvm-lut farm start --arm`` serves it over RPC). Emulated timings say
nothing about ARM cores and are never reported as ARM performance.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

from tvm_lut.errors import TargetError

HOST_PACKAGES = ("qemu-user", "gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "libc6-dev-arm64-cross")
HOST_TOOLS = ("qemu-aarch64", "aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++")
SYSROOT_PACKAGES = ("python3.11", "libstdc++6")
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy", "ml_dtypes", "typing_extensions",
          "cloudpickle", "psutil")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
CROSS_CXX = "aarch64-linux-gnu-g++"


def home() -> str:
    """Where the emulated runtime lives: ``$TVM_LUT_ARM_HOME`` or ``~/.cache/tvm-lut/arm64``."""
    return os.environ.get("TVM_LUT_ARM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "tvm-lut", "arm64")


def python_wrapper(root: str | None = None) -> str:
    return os.path.join(root or home(), "bin", "python3-aarch64")


def missing_host_tools() -> list[str]:
    return [t for t in HOST_TOOLS if shutil.which(t) is None]


def is_ready(root: str | None = None) -> bool:
    root = root or home()
    return os.path.isfile(os.path.join(root, "ready.json")) and os.access(python_wrapper(root), os.X_OK) \
        and not missing_host_tools()


def unavailable_reason(root: str | None = None) -> str | None:
    """None when the emulated runtime is usable, else why not (for a test's skip message)."""
    if is_ready(root):
        return None
    tools = missing_host_tools()
    if tools:
        return f"host tools missing: {', '.join(tools)} (run 'tvm-lut farm setup-arm' as root on Debian)"
    return f"no emulated aarch64 runtime at {root or home()} (run 'tvm-lut farm setup-arm')"


def _run(cmd: list[str], what: str, log, env=None, quiet: bool = False) -> None:
    if not quiet:
        log(f"  $ {' '.join(cmd[:6])}{' ...' if len(cmd) > 6 else ''}")
    res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if res.returncode != 0:
        tail = "\n".join(res.stdout.strip().splitlines()[-15:])
        raise TargetError(f"setup-arm: {what} failed (exit {res.returncode}):\n{tail}")


def _install_host_packages(log) -> None:
    if not missing_host_tools():
        return
    if not shutil.which("apt-get"):
        raise TargetError(f"setup-arm: missing {', '.join(missing_host_tools())} and no apt-get: install "
                          f"{' '.join(HOST_PACKAGES)} with your package manager")
    if os.geteuid() != 0:
        raise TargetError(f"setup-arm: missing {', '.join(missing_host_tools())}; installing "
                          f"{' '.join(HOST_PACKAGES)} needs root (run as root or install them yourself)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log("host packages: " + " ".join(HOST_PACKAGES))
    _run(["apt-get", "update", "-q"], "apt-get update", log, env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *HOST_PACKAGES], "apt-get install", log, env)


def _build_sysroot(stage: str, log) -> str:
    """Download arm64 .debs with a private apt state and unpack them into ``stage/sysroot``."""
    state = os.path.join(stage, "apt")
    for d in ("lists/partial", "cache", "archives/partial"):
        os.makedirs(os.path.join(state, d), exist_ok=True)
    open(os.path.join(state, "status"), "w").close()
    opts = ["-o", f"Dir::State::Lists={state}/lists", "-o", f"Dir::State::status={state}/status",
            "-o", f"Dir::Cache={state}/cache", "-o", f"Dir::Cache::Archives={state}/archives",
            "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64", "-o", "Debug::NoLocking=1",
            "-o", "APT::Sandbox::User=root"]
    log("aarch64 sysroot: " + " ".join(SYSROOT_PACKAGES))
    _run(["apt-get", *opts, "update", "-q"], "apt-get update (arm64, private state)", log)
    _run(["apt-get", *opts, "install", "-y", "-q", "--download-only", "--no-install-recommends", *SYSROOT_PACKAGES],
         "apt-get download (arm64)", log)
    sysroot = os.path.join(stage, "sysroot")
    os.makedirs(sysroot)
    debs = sorted(glob.glob(os.path.join(state, "archives", "*.deb")))
    if not debs:
        raise TargetError("setup-arm: apt downloaded no arm64 packages")
    for deb in debs:
        _run(["dpkg-deb", "-x", deb, sysroot], f"unpacking {os.path.basename(deb)}", log, quiet=True)
    log(f"  unpacked {len(debs)} arm64 packages")
    shutil.rmtree(state)
    return sysroot


def _install_wheels(sysroot: str, log) -> None:
    target = os.path.join(sysroot, "opt", "tvm-py")
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    log("aarch64 wheels: " + " ".join(WHEELS))
    _run([sys.executable, "-m", "pip", "install", "-q", "--target", target, "--only-binary=:all:",
          "--implementation", "cp", "--python-version", "3.11", "--abi", "cp311", *plat, *WHEELS],
         "pip install (aarch64 wheels)", log)


def _write_wrapper(stage: str, final_root: str) -> None:
    """``bin/python3-aarch64`` and its sitecustomize, with paths of the final (renamed) location."""
    sysroot = os.path.join(final_root, "sysroot")
    hook = os.path.join(stage, "hook")
    os.makedirs(hook)
    os.makedirs(os.path.join(stage, "bin"))
    wrapper = python_wrapper(final_root)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
        f.write("import sys\n"
                f"sys.executable = {wrapper!r}  # tvm.rpc.Server starts workers with sys.executable\n")
    with open(python_wrapper(stage), "w") as f:
        f.write("#!/bin/sh\n"
                "# aarch64 CPython with the aarch64 TVM wheel, under qemu-user (written by tvm-lut farm setup-arm)\n"
                f"export PYTHONPATH={os.path.join(final_root, 'hook')}:{os.path.join(sysroot, 'opt', 'tvm-py')}\n"
                "export PYTHONNOUSERSITE=1\n"
                f"exec qemu-aarch64 -L {sysroot} {os.path.join(sysroot, 'usr', 'bin', 'python3.11')} \"$@\"\n")
    os.chmod(python_wrapper(stage), 0o755)


def setup(root: str | None = None, force: bool = False, log=print) -> str:
    """Prepare the emulated aarch64 runtime (idempotent); returns its home directory."""
    root = os.path.abspath(root or home())
    if is_ready(root) and not force:
        log(f"aarch64 runtime already set up at {root}")
        return root
    _install_host_packages(log)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    stage = tempfile.mkdtemp(prefix=".arm64-setup-", dir=parent)
    try:
        sysroot = _build_sysroot(stage, log)
        _install_wheels(sysroot, log)
        _write_wrapper(stage, root)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.rename(stage, root)
        log("checking: import tvm under qemu-aarch64 (20-40 s)")
        res = subprocess.run([python_wrapper(root), "-c",
                              "import platform, tvm; print(platform.machine(), tvm.__version__)"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
        if res.returncode != 0 or "aarch64" not in res.stdout:
            shutil.rmtree(root, ignore_errors=True)
            raise TargetError(f"setup-arm: the emulated interpreter does not import tvm:\n{res.stdout[-2000:]}")
        with open(os.path.join(root, "ready.json"), "w") as f:
            json.dump({"python": python_wrapper(root), "check": res.stdout.strip().splitlines()[-1],
                       "wheels": list(WHEELS)}, f, indent=1)
        log(f"ready: {res.stdout.strip().splitlines()[-1]} at {root}")
        return root
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

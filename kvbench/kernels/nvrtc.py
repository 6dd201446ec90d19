"""Hand-laid CUDA kernels compiled at first use by NVRTC (`torch.cuda._compile_kernel`): no build
step and no headers (the sources use inline PTX). A compiled kernel is cached per source and device;
`available()` says once whether this torch/driver can compile and load one (else callers fall back
to their Triton kernels). `compile_offline` compiles a source to SASS on a machine without a GPU
(the `nvidia-cuda-nvrtc` wheel), for tests and CI."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_KERNELS: dict = {}
_AVAILABLE: list = []

_PROBE = r"""extern "C" __global__ void kvbench_probe(float* x) { x[threadIdx.x] += 1.f; }"""


def compile_source(source: str, name: str, device):
    key = (source, name, str(device))
    if key not in _KERNELS:
        from torch.cuda import _compile_kernel

        with torch.cuda.device(device):
            _KERNELS[key] = _compile_kernel(source, name)
    return _KERNELS[key]


def available() -> bool:
    """Whether NVRTC compiles and loads a kernel here (checked once; a failure is remembered)."""
    if not _AVAILABLE:
        try:
            compile_source(_PROBE, "kvbench_probe", torch.device("cuda", torch.cuda.current_device()))
            _AVAILABLE.append(True)
        except Exception:  # no CUDA, no NVRTC, a torch without _compile_kernel, a driver refusing the PTX
            _AVAILABLE.append(False)
    return _AVAILABLE[0]


# --------------------------------------------------------------------------------------------
# Offline: compile a source to sm_90 SASS without a GPU (tests/test_cuda_sources.py, CI)


@dataclass
class OfflineBuild:
    """What NVRTC and ptxas said of one kernel source: `ok` (compiled), registers a thread, spill
    bytes (stores + loads), shared memory, and the whole log (warnings included)."""

    ok: bool
    registers: int
    spill_bytes: int
    smem_bytes: int
    log: str


def _offline_library():
    """libnvrtc from the `nvidia-cuda-nvrtc` wheel (CUDA 13), loaded once; None when not installed."""
    import ctypes
    import glob
    import importlib.util

    if "lib" in _OFFLINE:
        return _OFFLINE["lib"]
    lib = None
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        found = sorted(glob.glob(f"{root}/cu13/lib/libnvrtc.so.13"))
        builtins = sorted(glob.glob(f"{root}/cu13/lib/libnvrtc-builtins.so.13.*"))
        if found and builtins:
            # (libnvrtc opens its builtins by soname: loaded globally first, the open finds them)
            ctypes.CDLL(builtins[0], mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(found[0])
            break
    _OFFLINE["lib"] = lib
    return lib


_OFFLINE: dict = {}


def offline_available() -> bool:
    return _offline_library() is not None


def compile_offline(source: str, arch: str = "sm_90") -> OfflineBuild:
    """Compile `source` to SASS for `arch` with NVRTC (the compiler `torch.cuda._compile_kernel`
    uses on the device) and ptxas in verbose mode, on any machine with the `nvidia-cuda-nvrtc`
    wheel installed: no GPU, no driver."""
    import ctypes
    import re

    lib = _offline_library()
    if lib is None:
        raise RuntimeError("compile_offline needs the nvidia-cuda-nvrtc wheel (pip install nvidia-cuda-nvrtc)")
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None)
    opts = [f"--gpu-architecture={arch}".encode(), b"--ptxas-options=-v"]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    log = buf.value.decode(errors="replace")

    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return OfflineBuild(ok=rc == 0, registers=number(r"Used (\d+) registers"),
                        spill_bytes=number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
                        smem_bytes=number(r"(\d+) bytes smem"), log=log)

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
# Programmatic dependent launch


_PDL: list = []  # [bool]: whether cuLaunchKernelEx with the attribute worked here (decided once)
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID (cuda.h)


def _launch_structs():
    import ctypes

    class Attribute(ctypes.Structure):  # CUlaunchAttribute: id, padding to 8, a 64-byte value union
        _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]

    class Config(ctypes.Structure):  # CUlaunchConfig
        _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                    ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                    ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                    ("attrs", ctypes.POINTER(Attribute)), ("numAttrs", ctypes.c_uint)]

    return Attribute, Config


def launch(kernel, grid, block, args, *, programmatic: bool = False) -> None:
    """Launch a compiled kernel on the current stream. `programmatic=True` (and KVBENCH_PDL not 0):
    through cuLaunchKernelEx with programmatic stream serialization, so the kernel's blocks may start
    while the previous kernel on the stream finishes; the kernel must `griddepcontrol.wait` before
    reading what that kernel writes, and the previous kernel decides when by
    `griddepcontrol.launch_dependents` (cuda_prelude's `pdl_wait` / `pdl_launch_dependents`). Where
    the driver refuses it (checked on first use), a plain launch: the wait is then a no-op."""
    import ctypes
    import os

    if not programmatic or os.environ.get("KVBENCH_PDL", "1") == "0" or _PDL == [False]:
        kernel(grid=grid, block=block, args=args)
        return
    keep, ptrs = [], []
    for a in args:  # the conversions of torch's own launcher: tensors as pointers, ints, floats as doubles
        if isinstance(a, torch.Tensor):
            c = ctypes.c_void_p(a.data_ptr())
        elif isinstance(a, int):
            c = ctypes.c_int(a)
        elif isinstance(a, float):
            c = ctypes.c_double(a)
        else:
            raise TypeError(f"launch: unsupported argument {type(a).__name__}")
        keep.append(c)
        ptrs.append(ctypes.cast(ctypes.byref(c), ctypes.c_void_p))
    params = (ctypes.c_void_p * len(ptrs))(*ptrs)
    Attribute, Config = _launch_structs()
    attr = Attribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value = (1).to_bytes(4, "little") + bytes(60)  # programmaticStreamSerializationAllowed = 1
    cfg = Config(grid[0], grid[1], grid[2], block[0], block[1], block[2], 0,
                 torch.cuda.current_stream()._as_parameter_, ctypes.pointer(attr), 1)
    libcuda = torch.cuda._utils._get_gpu_runtime_library()
    rc = libcuda.cuLaunchKernelEx(ctypes.byref(cfg), kernel.func, params, None)
    if rc != 0:
        if _PDL:  # it worked before: a real launch error
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {rc}")
        _PDL.append(False)  # refused here: plain launches from now on
        kernel(grid=grid, block=block, args=args)
        return
    if not _PDL:
        _PDL.append(True)


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

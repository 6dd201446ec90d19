"""The hand-laid CUDA kernels compile for the H100 (sm_90) without a GPU: NVRTC from the
`nvidia-cuda-nvrtc` wheel (the compiler torch uses on the device) and ptxas in verbose mode. Every
variant a launcher can pick must compile without warnings; the shipped defaults must not spill
and must fit the register budget their launch settings assume (docs/kernel-notes.md), so an edit
that breaks a kernel or costs it its occupancy fails here, before any GPU run."""

import pytest

from kvbench.kernels import kivi_scores_cuda, nvrtc, rotatekv_scores_cuda, token_scores_cuda, values_cuda

pytestmark = pytest.mark.skipif(not nvrtc.offline_available(), reason="needs the nvidia-cuda-nvrtc wheel")

# (name, source, registers at most a thread: 65536 / (128 threads x the programs an SM it is laid out for))
DEFAULTS = [
    ("token_scores G64", token_scores_cuda.source(2), 64),  # 8 programs an SM
    ("token_scores G128, quarot rotation", token_scores_cuda.source(1, rotate_q=True), 64),
    ("values G64", values_cuda.source(2), 128),  # 4 programs an SM
    ("values G128, quarot rotation", values_cuda.source(1, rotate_out=True), 128),
    ("values G32 float zeros (KIVI)", values_cuda.source(4, integer_zero=False), 128),
    ("kivi_scores", kivi_scores_cuda.source(), 168),  # 3 programs an SM
    ("rotatekv_scores NQ32", rotatekv_scores_cuda.source(32), 255),  # 2 programs an SM
    ("rotatekv_scores NQ32 post-RoPE", rotatekv_scores_cuda.source(32, post_rope=True),
     65536 // (128 * rotatekv_scores_cuda.MIN_BLOCKS_POST)),
]

# the other choices each launcher can make: every group size and zero kind, tile counts, rotation
VARIANTS = ([token_scores_cuda.source(ng, tiles, rot) for ng in (1, 2, 4) for tiles, rot in ((1, True), (4, False))]
            + [token_scores_cuda.source(ng, 2, rot, gq) for ng, gq in ((1, 4), (2, 4), (2, 2)) for rot in (False, True)]
            + [values_cuda.source(ng, 4, True, rot, True, gq) for ng, gq in ((1, 4), (2, 4), (2, 2)) for rot in (False, True)]
            + [values_cuda.source(ng, tiles, iz, rot, vec) for ng in (1, 2, 4) for iz in (True, False)
               for tiles, rot, vec in ((1, True, False), (8, False, True))]
            + [rotatekv_scores_cuda.source(nq, post_rope=p) for nq in (8, 64) for p in (False, True)]
            + [kivi_scores_cuda.source(m) for m in (1, 4)])


@pytest.mark.parametrize("name,source,max_registers", DEFAULTS, ids=[d[0] for d in DEFAULTS])
def test_shipped_kernels_compile_without_spills_within_their_register_budget(name, source, max_registers):
    build = nvrtc.compile_offline(source)
    assert build.ok, build.log
    assert "warning" not in build.log, build.log
    assert build.spill_bytes == 0, build.log
    assert 0 < build.registers <= max_registers, build.log


def test_every_variant_compiles_without_warnings():
    for source in VARIANTS:
        build = nvrtc.compile_offline(source)
        assert build.ok and "warning" not in build.log, build.log


def test_a_broken_source_is_reported_not_raised():
    build = nvrtc.compile_offline('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }')
    assert not build.ok and "undefined_name" in build.log


def test_programmatic_launch_structs_match_cuda_h():
    # nvrtc.launch hands these to cuLaunchKernelEx: their layout must be cuda.h's (CUlaunchAttribute:
    # a 4-byte id, padding, a 64-byte value union; CUlaunchConfig: seven uints, then the stream, the
    # attributes pointer and their count, 8-byte aligned).
    import ctypes

    attribute, config = nvrtc._launch_structs()
    assert ctypes.sizeof(attribute) == 72 and attribute.value.offset == 8
    assert config.hStream.offset == 32 and config.attrs.offset == 40 and config.numAttrs.offset == 48
    assert ctypes.sizeof(config) == 56
    assert nvrtc._CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION == 6


def test_kernel_bounds_variants_still_match_and_compile(tmp_path):
    # benchmarks/kernel_bounds.py cuts parts out of the key pass's source by text substitution: an
    # edit to the kernel must not leave the committed bounds tool silently timing the shipped build
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "kernel_bounds.py"
    spec = importlib.util.spec_from_file_location("kernel_bounds", path)
    bounds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bounds)
    for name, subs in bounds.VARIANTS.items():
        mod = bounds.edited_module(name, subs, tmp_path)
        assert mod.source(32) != rotatekv_scores_cuda.source(32), name
        build = nvrtc.compile_offline(mod.source(32))
        assert build.ok and build.spill_bytes == 0, (name, build.log)

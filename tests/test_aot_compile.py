"""Every Triton kernel compiles for H100 (sm_90) and A100 (sm_80), without a GPU.

The interpreter (how CI runs the kernels) never lowers a kernel to PTX, so type
errors, unsupported ops or shared-memory overflows that only the compiler sees
would first show up on a GPU machine. ``tests/aot_check.py`` builds each kernel
ahead of time with the specialisation the JIT gives a channels_last launch
(channel strides == 1 become constants; pointers and other integers divisible by
16), for the largest and a small candidate tile. Here we check each build fits in
shared memory and that the GEMM K loops are software-pipelined (async copies or
TMA): a kernel whose loads stop being pipelined passes every numerical test and
still loses much of its speed.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is not installed")

SCRIPT = Path(__file__).with_name("aot_check.py")
SMEM = {"sm90": 227 * 1024, "sm80": 163 * 1024}  # opt-in shared memory per block, bytes


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        if "cannot import name" in proc.stderr and "triton" in proc.stderr:
            pytest.skip(f"this Triton has no ahead-of-time compile API: {proc.stderr.strip().splitlines()[-1]}")
        raise AssertionError(f"aot_check.py failed:\n{proc.stderr[-4000:]}")
    builds = json.loads(proc.stdout)
    if "__unsupported__" in builds:
        pytest.skip(f"this Triton's ahead-of-time compile API differs: {builds['__unsupported__']}")
    return builds


def test_every_kernel_compiles_and_fits(builds):
    errors = {k: v["error"] for k, v in builds.items() if "error" in v}
    assert not errors, "\n".join(f"{k}: {v}" for k, v in errors.items())
    from effops.ops import osa

    # Every kernel family, for each GPU generation and dtype.
    for cc in ("sm90", "sm80"):
        for dt in ("fp16", "bf16", "fp32"):
            for family in ("conv_3x3", "conv_1x1", "osa_agg_flat", "osa_agg_per_image", "dw_pw", "depthwise",
                           "gate_residual", "shuffle", "conv_gated_1x1", "conv_gated_3x3", "conv_shuffled_1x1",
                           "conv_shuffled_3x3", "conv_chsum_1x1", "conv_chsum_3x3", "depthwise_gated_shuffled"):
                assert any(k.startswith(f"{family}_{dt}") and k.endswith(cc) for k in builds), (family, dt, cc)
        assert f"ese_gate_{cc}" in builds
    # The N-segment aggregation with the OSA block's two segments and with eight, both tilings.
    for family in ("osa_agg_flat", "osa_agg_per_image"):
        for n_seg in (2, 8):
            for cc in ("sm90", "sm80"):
                assert any(k.startswith(family) and f"_seg{n_seg}_" in k and k.endswith(cc) for k in builds)
    for name, b in builds.items():
        limit = SMEM[name.rsplit("_", 1)[-1]]
        assert b["shared"] <= limit, f"{name} needs {b['shared']} B of shared memory, the GPU has {limit}"


def test_gemm_loops_are_pipelined(builds):
    for name, b in builds.items():
        if name.startswith("conv_"):
            assert b["async_copies"] + b["tma"] > 0, f"{name}: K loop not pipelined"
        elif name.startswith("osa_agg_"):
            # One K loop per segment, each with an A and a B operand; both aggregation tiles
            # use 3 stages: every operand of every loop has 2 copies issued ahead + 1 in the loop.
            n_seg = int(re.search(r"_seg(\d+)_", name).group(1))
            assert b["async_copies"] >= 6 * n_seg, f"{name}: aggregation K loops not pipelined ({b})"


def test_tma_kernel_loads_operands_with_tma_and_multiplies_with_wgmma(builds):
    """The TMA conv kernel's operands arrive by bulk-tensor copies (no per-thread cp.async
    gathers), pipelined (several copies in flight), into Hopper's warpgroup MMA."""
    tma = {k: v for k, v in builds.items() if k.startswith("conv_tma_")}
    assert {k.split("_")[3] for k in tma} == {"fp16", "bf16", "fp32"} and len(tma) >= 16
    for name, b in tma.items():
        assert b["ptx"].get("cp.async.16B", 0) == 0, f"{name}: per-thread async copies ({b['ptx']})"
        assert b["ptx"]["tma.load"] >= 2 and b["tma"] >= 4, f"{name}: operands not loaded by pipelined TMA ({b})"
        assert b["ptx"]["wgmma"] > 0, f"{name}: no wgmma ({b['ptx']})"

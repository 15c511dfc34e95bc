"""Test set-up shared by every test module.

Without a GPU, Triton kernels run on CPU tensors under Triton's interpreter;
TRITON_INTERPRET must be set before effops (and so its kernels) is imported.
With a GPU, the kernel tests run on CUDA instead, and the interpreter stays off.

On CPU the suite runs twice (see .ci/run): once as users run effops, CPU tensors on the native
backend (``csrc/``) and the reference, and once with ``EFFOPS_CPU_BACKEND=triton``, CPU tensors
on the Triton kernels under the interpreter. The native backend's own test files (which force
it) run in the first pass only.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# One fixed kernel config on CUDA: autotuning every tiny test shape would cost minutes of compiles.
os.environ.setdefault("EFFOPS_AUTOTUNE", "0")
# No speed check in effops.optimize: it keeps the original of any block that measures faster on
# this machine at that moment, so what the conversion tests assert would depend on timing noise.
# tests/test_speedcheck.py turns it on (check_speed=True) with deterministic and real timings.
os.environ.setdefault("EFFOPS_CHECK_SPEED", "0")
# No tuning files: tests that tune must not read or write ~/.cache/effops (tests/test_vendor.py turns it on).
os.environ.setdefault("EFFOPS_TUNING_CACHE", "0")

import pytest  # noqa: E402

# Under pytest-xdist every worker is a process of its own: one intra-op thread each, or the
# workers' OpenMP pools oversubscribe the cores and small CPU ops spin (a float64 conv measured
# 46 ms per call with 2 threads per worker against 7 us with 1 on the 2-core CI machine).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# References in fp32/fp64 with TF32 off (the kernel follows cudnn.allow_tf32 too).
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_NATIVE_ONLY = {"test_native.py", "test_native_kernels.py"}


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in _NATIVE_ONLY and os.environ.get("EFFOPS_CPU_BACKEND") == "triton":
        return True  # the Triton pass: these files force the native backend, already run in the first pass
    return None

"""effops: fused kernels for efficient CNN backbones (Triton on GPUs, a native C++ backend on CPUs).

Installs on any machine: Triton kernels need no build step, and the native CPU backend
(``csrc/``) is built just in time on first use. ``EFFOPS_BUILD_NATIVE=1`` builds it here
instead, ahead of time; that needs torch importable at build time, so pass
``--no-build-isolation``::

    EFFOPS_BUILD_NATIVE=1 pip install --no-build-isolation -e .

A failed ahead-of-time build never fails the install: it prints why, and effops builds the
extension just in time (or runs the PyTorch reference when it can't).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

# Same flags as effops/native.py's just-in-time build (see there for why -fopenmp).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]
LDFLAGS = ["-fopenmp"]


def _native_extension():
    """``(ext_modules, cmdclass)`` for the ahead-of-time build, or empty ones with a printed reason."""
    if os.environ.get("EFFOPS_BUILD_NATIVE", "0") != "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as e:
        print(f"effops: EFFOPS_BUILD_NATIVE=1 but torch is not importable here ({e}); pip's isolated build "
              "environment has no torch: use --no-build-isolation. The native backend will be built just in "
              "time instead.", file=sys.stderr)
        return [], {}

    class OptionalBuild(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - a compiler problem must not fail the install
                print(f"effops: building the native CPU backend failed ({type(e).__name__}: {e}); effops will "
                      "try a just-in-time build on first use, else run the PyTorch reference.", file=sys.stderr)

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    ext = CppExtension("effops._native", sources, extra_compile_args=CFLAGS, extra_link_args=LDFLAGS)
    return [ext], {"build_ext": OptionalBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _native_extension()

setup(
    name="effops",
    version="0.1.0",
    description="Fused kernels and drop-in modules for efficient CNN backbones (VoVNet, MobileNet, ...)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["effops", "effops.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
        "ninja",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "timm", "torchvision"],
        "bench": ["timm", "torchvision", "pytest", "onnxruntime", "openvino", "onnx", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["effops=effops.__main__:main"]},
)

"""effops: fused GPU kernels for efficient CNN backbones.

Installs on any machine: Triton kernels need no build step, and nothing here
compiles native code at install time (a GPU and a compiler are optional).
"""
from setuptools import find_packages, setup

setup(
    name="effops",
    version="0.1.0",
    description="Fused Triton kernels and drop-in modules for efficient CNN backbones (VoVNet, MobileNet, ...)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["effops", "effops.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.6",
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "timm", "torchvision"],
        "bench": ["timm", "pytest"],
    },
    entry_points={"console_scripts": ["effops=effops.__main__:main"]},
)

"""Builds the compiled kernels (swat_deploy/_swatk); everything else is in pyproject.toml.

No -march flag on purpose: each loop carries its own ISA (gcc target attributes) and the ISA
is picked at run time, so the wheel / editable build runs on any x86-64 CPU.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "swat_deploy._swatk",
            sources=["swat_deploy/kernels/native/shift_f32.c", "swat_deploy/kernels/native/pack_f32.c"],
            extra_compile_args=["-O3", "-std=c11", "-fno-math-errno"],
        )
    ]
)

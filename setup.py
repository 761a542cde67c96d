"""Builds the compiled kernel core (swat_native/_swatk); everything else is in pyproject.toml.

No -march flag on purpose: each loop carries its own ISA (gcc target attributes) and the ISA
is picked at run time, so the wheel / editable build runs on any x86-64 CPU. Every C file in
swat_native/csrc/ is compiled in, so adding a kernel touches one file.
"""
from pathlib import Path

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "swat_native._swatk",
            sources=sorted(str(p) for p in Path("swat_native/csrc").glob("*.c")),
            extra_compile_args=["-O3", "-std=c11", "-fno-math-errno"],
        )
    ]
)

"""Which CPU this is: every speed figure the project prints names it, since a win on one CPU is not a
win on another (int8 especially: VNNI / AMX make onnxruntime's int8 several times faster than float32,
plain AVX2 much less)."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

# flags that decide which float32 / int8 code paths a CPU has, best first within each group
ISA_FLAGS = ("amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni", "avx512bw", "avx512f", "avx2", "fma", "sse4_2",
             "neon", "asimd", "asimddp", "i8mm", "sve")


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """``model`` (e.g. "Intel(R) Xeon(R) Platinum 8480+"), ``isa`` (the best vector ISA, e.g.
    "avx512_vnni"), ``int8_dot`` (the int8 dot-product instruction: "amx_int8", "avx512_vnni",
    "avx_vnni" or None), ``flags`` (those of :data:`ISA_FLAGS` present), ``cores`` (logical CPUs)
    , ``machine`` and ``kernel_isa`` (what swat's compiled kernels run at: "avx512", "avx2" or
    "generic"). Read from /proc/cpuinfo; elsewhere only what :mod:`platform` knows."""
    model, flags = _proc_cpuinfo()
    present = [f for f in ISA_FLAGS if f in flags]
    int8_dot = next((f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags), None)
    isa = next((f for f in ("avx512_vnni", "avx512f", "avx_vnni", "avx2", "sse4_2", "asimddp", "asimd", "neon")
                if f in flags), None)
    import swat_native as native  # the ISA our compiled kernels run at here (SWAT_ISA may lower it)

    return {"model": model or platform.processor() or platform.machine() or "unknown",
            "isa": isa, "int8_dot": int8_dot, "flags": present, "cores": os.cpu_count(),
            "machine": platform.machine(), "kernel_isa": native.isa() if native.available() else None}


def describe(info: dict[str, Any] | None = None) -> str:
    """One line for reports: model, then ISA flags, e.g. "Intel Xeon (avx512f avx512_vnni amx_int8, 2 CPUs)"."""
    info = info or cpu_info()
    shown = [f for f in ("avx2", "avx512f", "avx_vnni", "avx512_vnni", "amx_int8", "asimddp", "i8mm") if f in info["flags"]]
    kern = f"; swat kernels: {info['kernel_isa']}" if info.get("kernel_isa") else ""
    return f"{info['model']} ({' '.join(shown) or info['machine']}, {info['cores']} CPUs{kern})"


def _proc_cpuinfo() -> tuple[str | None, set[str]]:
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model", "Hardware") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model, flags

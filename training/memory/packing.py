"""Packed bitmasks and compact values: what SWAT layers keep instead of dense tensors.

A bitmask holds 1 bit per element (little-endian within a byte); :func:`compact` keeps the
values whose bit is set, :func:`expand` puts them back. On CPU float32 the loops run in the
compiled C of ``swat_native/csrc/bits_f32.c`` (vectorised; "native"), or in the numba kernels of
:mod:`training._swat_kernels` where the library was not built ("numba"); other dtypes and
devices use plain torch. :func:`use_backend` forces one path, so tests can check that all give
identical results.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

# slots past count a compact copy's storage holds: the compiled gather's last 8-lane store may
# spill 7 floats past count (expand's loaders read one slot past the end)
from swat_native.bits import GATHER_SPARE

MAX_PARTS = 4  # threads a bitmask pass is split over at most

BACKENDS = ("auto", "native", "numba", "torch")
_backend = "auto"
_kernels: dict[str, Any] = {}


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the native, numba or torch implementation inside the block (tests, benchmarks)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


class _NativeKernels:
    """The numba kernel module's interface with the bitmask passes in compiled C (2.5-5x faster
    per call, see bits_f32.c); the Top-K selection loops stay numba. The ISA (``SWAT_ISA``) is
    read once, when the backend is first used."""

    def __init__(self, numba_mod: Any) -> None:
        import swat_native
        from swat_native import bits

        self._bits, self._code = bits, swat_native.isa_code()
        self.kth_largest_abs_rows = numba_mod.kth_largest_abs_rows
        self.pack_exact = numba_mod.pack_exact

    def _parts(self, n: int) -> int:
        """Threads for a pass over n elements: torch's count (the training loop's), capped at
        what leaves each part >= PARALLEL_MIN / 2 elements."""
        if n < self._bits.PARALLEL_MIN:
            return 1
        return max(1, min(torch.get_num_threads(), MAX_PARTS, 2 * n // self._bits.PARALLEL_MIN))

    def relu_pack(self, x: np.ndarray, y: np.ndarray, bits: np.ndarray) -> int:
        return self._bits.relu_pack(self._code, x, y, bits, self._parts(x.size))

    def mask_select(self, x_u32: np.ndarray, bits: np.ndarray, out_u32: np.ndarray) -> None:
        self._bits.mask_select(self._code, x_u32, bits, out_u32, self._parts(x_u32.size))

    def pack_gt(self, x: np.ndarray, thr: np.ndarray, inner: int, period: int, bits: np.ndarray) -> int:
        return self._bits.pack_gt(self._code, x, thr, inner, period, bits, self._parts(x.size))

    def gather(self, x: np.ndarray, bits: np.ndarray, vals: np.ndarray) -> int:
        return self._bits.gather(self._code, x, bits, vals)

    def expand(self, bits: np.ndarray, vals: np.ndarray, out: np.ndarray) -> None:
        self._bits.expand(self._code, bits, vals, out)


def native_available() -> bool:
    """Whether the compiled kernels were built (``pip install -e .``) and load."""
    import swat_native

    return swat_native.available()


def _load_kernels(name: str) -> Any:
    """The kernels of backend ``name`` ("auto", "native" or "numba"), built on first use (numba
    compiles for ~1 s)."""
    k = _kernels.get(name)
    if k is not None:
        return k
    from training import _swat_kernels

    if name == "auto":
        k = _load_kernels("native" if native_available() else "numba")
    elif name == "native":
        if not native_available():
            raise ValueError("the native backend needs the compiled kernels (pip install -e .); "
                             "use_backend('numba') or 'auto'")
        k = _NativeKernels(_swat_kernels)
    else:
        k = _swat_kernels
    _kernels[name] = k
    return k


def kernels_for(*tensors: Tensor) -> Any:
    """The kernels of the chosen backend if every tensor can take the fast path, else None."""
    if _backend == "torch":
        return None
    ok = True
    for t in tensors:  # a plain loop: this runs several times per layer and step
        if t.dtype != torch.float32 or t.device.type != "cpu":
            ok = False
            break
    if not ok:
        if _backend != "auto":
            raise ValueError(f"the {_backend} backend handles CPU float32 tensors only; use_backend('auto')")
        return None
    return _load_kernels(_backend)


def flat_np(t: Tensor) -> np.ndarray:
    return t.detach().contiguous().view(-1).numpy()


_BIT_WEIGHTS: dict[torch.device, Tensor] = {}


def _bit_weights(device: torch.device) -> Tensor:
    w = _BIT_WEIGHTS.get(device)
    if w is None:
        w = _BIT_WEIGHTS[device] = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=device)
    return w


def pack_bits(mask: Tensor) -> Tensor:
    """Bool tensor -> flat uint8 tensor of ceil(n/8) bytes; element i is bit i%8 of byte i//8."""
    flat = mask.detach().reshape(-1)
    if flat.device.type == "cpu" and _backend != "torch":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    pad = (-flat.numel()) % 8
    u = F.pad(flat.to(torch.uint8), (0, pad)).view(-1, 8)
    return (u * _bit_weights(u.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: a flat bool tensor of ``numel`` elements."""
    if bits.device.type == "cpu" and _backend != "torch":
        out = np.unpackbits(bits.numpy(), count=numel, bitorder="little")
        return torch.from_numpy(out.view(np.bool_))
    b = bits.view(-1, 1).bitwise_and(_bit_weights(bits.device)).ne(0)
    return b.view(-1)[:numel]


def compact(x: Tensor, bits: Tensor, count: int) -> Tensor:
    """The entries of ``x`` whose bit is set, in flat order (``count`` of them)."""
    k = kernels_for(x)
    if k is not None:
        buf = torch.empty(count + GATHER_SPARE, dtype=x.dtype)
        got = k.gather(flat_np(x), bits.numpy(), buf.numpy())
        if got != count:
            raise RuntimeError(f"bitmask holds {got} set bits, expected {count}")
        return buf[:count]
    return x.detach().reshape(-1)[unpack_bits(bits, x.numel())]


def _padded(values: Tensor) -> Tensor:
    """``values`` plus one slot past its end (the spare slot :func:`compact` allocates)."""
    n = values.numel()
    room = values.untyped_storage().nbytes() // values.element_size() - values.storage_offset()
    if values.is_contiguous() and room > n:
        return values.as_strided((n + 1,), (1,))
    return torch.cat([values.reshape(-1), values.new_zeros(1)])


def expand(values: Tensor, bits: Tensor, shape: torch.Size) -> Tensor:
    """Dense tensor of ``shape`` with ``values`` at the set bits and zeros elsewhere."""
    out = torch.empty(shape, dtype=values.dtype, device=values.device)
    k = kernels_for(values)
    if k is not None:
        k.expand(bits.numpy(), _padded(values.detach()).numpy(), out.view(-1).numpy())
        return out
    out.zero_()
    out.view(-1).masked_scatter_(unpack_bits(bits, out.numel()), values)
    return out


def masked_grad(grad: Tensor, bits: Tensor) -> Tensor:
    """``grad`` where the bit is set, 0 elsewhere (no dense mask is ever kept)."""
    k = kernels_for(grad)
    if k is not None:
        out = torch.empty(grad.shape, dtype=grad.dtype)
        k.mask_select(flat_np(grad).view(np.uint32), bits.numpy(), out.view(-1).numpy().view(np.uint32))
        return out
    mask = unpack_bits(bits, grad.numel()).view(grad.shape)
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def positive_bits(y: Tensor) -> tuple[Tensor, int]:
    """Packed bitmask of ``not (y <= 0)`` (torch's ReLU-backward rule: NaN passes) and its popcount."""
    mask = ~(y <= 0)
    return pack_bits(mask), int(mask.sum())

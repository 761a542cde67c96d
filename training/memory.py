"""Compact saved-for-backward storage, and measuring what autograd really keeps.

SWAT's memory claim is that a layer keeps only TopK(a_in) for its backward pass.  That is only
true if the kept activation is stored compactly - here as its non-zero values plus a packed
bitmask (1 bit per element, little-endian within a byte) - and if the neighbours do not keep
the dense tensor alive anyway.  A plain ``nn.ReLU`` saves its dense output (the very tensor the
next conv reads), so :class:`SwatReLU` saves only the bitmask of ``output > 0``, and
:class:`SwatMaxPool2d` saves the argmax as a window offset (1 byte) instead of the dense input
plus int64 indices.  BatchNorm stays dense, as in the paper.

:func:`saved_bytes` measures the result with ``torch.autograd.graph.saved_tensors_hooks``,
counting every storage once (a tensor saved by two nodes costs memory once).

On CPU float32 the bit work runs in the numba kernels of :mod:`training._swat_kernels` (numba is
a dependency); everything else (other dtypes, other devices) uses plain torch.  :func:`use_backend` forces
one path, so tests can check that both give identical results.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BACKENDS", "use_backend", "pack_bits", "unpack_bits", "compact", "expand", "masked_grad",
           "SwatReLU", "SwatMaxPool2d", "SavedTensor", "saved_tensors", "saved_bytes"]

BACKENDS = ("auto", "numba", "torch")
_backend = "auto"
_kernels: Any = None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force the numba or the torch implementation inside the block (tests, benchmarks)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _load_kernels() -> Any:
    """The numba kernel module, imported on first use (compiling it costs ~1 s)."""
    global _kernels
    if _kernels is None:
        from training import _swat_kernels
        _kernels = _swat_kernels
    return _kernels


def kernels_for(*tensors: Tensor) -> Any:
    """The numba kernel module if every tensor can take the fast path, else None."""
    if _backend == "torch":
        return None
    ok = True
    for t in tensors:  # a plain loop: this runs several times per layer and step
        if t.dtype != torch.float32 or t.device.type != "cpu":
            ok = False
            break
    if not ok:
        if _backend == "numba":
            raise ValueError("the numba backend handles CPU float32 tensors only; use_backend('auto')")
        return None
    return _load_kernels()


def _flat_np(t: Tensor) -> np.ndarray:
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
        buf = torch.empty(count + 1, dtype=x.dtype)
        got = k.gather(_flat_np(x), bits.numpy(), buf.numpy())
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
        k.mask_select(_flat_np(grad).view(np.uint32), bits.numpy(), out.view(-1).numpy().view(np.uint32))
        return out
    mask = unpack_bits(bits, grad.numel()).view(grad.shape)
    return torch.where(mask, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))


def positive_bits(y: Tensor) -> tuple[Tensor, int]:
    """Packed bitmask of ``not (y <= 0)`` (torch's ReLU-backward rule: NaN passes) and its popcount."""
    mask = ~(y <= 0)
    return pack_bits(mask), int(mask.sum())


class _MaskReLUFn(torch.autograd.Function):
    """ReLU that keeps 1 bit per element for backward instead of its dense output."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, inplace: bool) -> Tensor:  # type: ignore[override]
        k = kernels_for(x) if x.is_contiguous() else None
        if k is not None:  # one pass: relu and its bitmask together
            y = x if inplace else torch.empty_like(x)
            bits = torch.empty((x.numel() + 7) // 8, dtype=torch.uint8)
            k.relu_pack(x.detach().view(-1).numpy(), y.detach().view(-1).numpy(), bits.numpy())
            if inplace:
                ctx.mark_dirty(x)
        else:
            if inplace:
                y = x.relu_()
                ctx.mark_dirty(x)
            else:
                y = torch.relu(x)
            bits, _ = positive_bits(y)
        ctx.save_for_backward(bits)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (bits,) = ctx.saved_tensors
        return masked_grad(grad, bits), None


def _training_step(module: nn.Module, x: Tensor) -> bool:
    return module.training and torch.is_grad_enabled() and x.requires_grad


class SwatReLU(nn.ReLU):
    """``nn.ReLU`` whose backward state is a bitmask (installed by swatify in swat/saw mode)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _training_step(self, x):
            return super().forward(x)
        return _MaskReLUFn.apply(x, self.inplace)


# ------------------------------------------------------------------------------- MaxPool
def _pool_geometry(x_hw: tuple[int, int], out_hw: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
    h0 = (torch.arange(out_hw[0], device=device) * stride[0] - padding[0]).view(-1, 1)
    w0 = (torch.arange(out_hw[1], device=device) * stride[1] - padding[1]).view(1, -1)
    return h0, w0


class _CompactMaxPoolFn(torch.autograd.Function):
    """2-D max pool that saves the argmax as an offset inside its window (1 byte per output)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],  # type: ignore[override]
                padding: tuple[int, int], dilation: tuple[int, int], ceil_mode: bool) -> Tensor:
        out, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
        H, W = x.shape[-2:]
        h0, w0 = _pool_geometry((H, W), out.shape[-2:], stride, padding, x.device)
        kh = torch.div(idx // W - h0, dilation[0], rounding_mode="floor")
        kw = torch.div(idx % W - w0, dilation[1], rounding_mode="floor")
        window = kernel[0] * kernel[1]
        dtype = torch.uint8 if window <= 256 else (torch.int16 if window <= 32767 else torch.int32)
        offsets = (kh * kernel[1] + kw).to(dtype)
        ctx.save_for_backward(offsets)
        ctx.geom = (x.shape, kernel, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (offsets,) = ctx.saved_tensors
        shape, kernel, stride, padding, dilation = ctx.geom
        H, W = shape[-2:]
        h0, w0 = _pool_geometry((H, W), grad.shape[-2:], stride, padding, grad.device)
        off = offsets.to(torch.int64)
        h = h0 + torch.div(off, kernel[1], rounding_mode="floor") * dilation[0]
        w = w0 + (off % kernel[1]) * dilation[1]
        idx = (h * W + w).reshape(shape[0], shape[1], -1)
        gi = torch.zeros(shape[0], shape[1], H * W, dtype=grad.dtype, device=grad.device)
        gi.scatter_add_(2, idx, grad.reshape(shape[0], shape[1], -1))
        return gi.view(shape), None, None, None, None, None


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SwatMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose backward state is a 1-byte window offset per output element."""

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not _training_step(self, x) or x.dim() not in (3, 4):
            return super().forward(x)
        unbatched = x.dim() == 3
        xb = x.unsqueeze(0) if unbatched else x
        stride = self.stride if self.stride is not None and self.stride != [] else self.kernel_size
        out = _CompactMaxPoolFn.apply(xb, _pair(self.kernel_size), _pair(stride), _pair(self.padding),
                                      _pair(self.dilation), bool(self.ceil_mode))
        return out.squeeze(0) if unbatched else out


# ------------------------------------------------------------------------ measurement
@dataclass(frozen=True)
class SavedTensor:
    """One tensor autograd kept for backward (``duplicate``: its storage was already counted)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    duplicate: bool
    parameter: bool


LossSpec = Union[Tensor, Callable[[Tensor], Tensor]]


def saved_tensors(model: nn.Module, x: Tensor, y_or_loss_fn: LossSpec) -> list[SavedTensor]:
    """Every tensor one training-mode forward + loss saves for backward, in save order.

    Runs on a deep copy, so the caller's BatchNorm statistics and SWAT threshold caches are
    untouched.  ``y_or_loss_fn`` is either class targets (cross-entropy) or ``output -> loss``.
    """
    net = copy.deepcopy(model).train()
    owned = {p.untyped_storage().data_ptr() for p in list(net.parameters()) + list(net.buffers())}
    seen: set[int] = set()
    records: list[SavedTensor] = []

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse / meta tensors: no storage to count
            key, nbytes = -1 - len(records), t.numel() * t.element_size()
        dup = key in seen and nbytes > 0
        seen.add(key)
        records.append(SavedTensor(tuple(t.shape), t.dtype, nbytes, dup, key in owned))
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
        loss = y_or_loss_fn(out) if callable(y_or_loss_fn) else F.cross_entropy(out, y_or_loss_fn)
        del loss, out
    return records


def saved_bytes(model: nn.Module, x: Tensor, y_or_loss_fn: LossSpec, *,
                exclude_parameters: bool = False) -> int:
    """Bytes autograd keeps alive for one backward pass (each storage counted once).

    ``exclude_parameters`` leaves out storages owned by the model (weights saved by reference
    cost no extra memory); the default counts them so that SWAT's compact weight copy and a
    dense layer's reference to its weight are compared on equal terms.
    """
    return sum(r.nbytes for r in saved_tensors(model, x, y_or_loss_fn)
               if not r.duplicate and not (exclude_parameters and r.parameter))

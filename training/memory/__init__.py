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

On CPU float32 the bit work runs in compiled C (``swat_native/csrc/bits_f32.c``), or in the numba
kernels of :mod:`training._swat_kernels` where the library was not built; everything else (other
dtypes, other devices) uses plain torch.  :func:`use_backend` forces one path, so tests can check
that all give identical results.

One job per module: :mod:`~training.memory.packing` (bitmasks, compact values and the native /
numba / torch backends), :mod:`~training.memory.layers` (the ReLU and max-pool that save little) and
:mod:`~training.memory.saved` (measuring what autograd keeps).
"""
from training.memory.layers import SwatMaxPool2d, SwatReLU
from training.memory.packing import (BACKENDS, compact, expand, masked_grad, pack_bits, positive_bits,
                                     unpack_bits, use_backend)
from training.memory.saved import SavedTensor, saved_bytes, saved_tensors

__all__ = ["BACKENDS", "use_backend", "pack_bits", "unpack_bits", "compact", "expand", "masked_grad",
           "positive_bits", "SwatReLU", "SwatMaxPool2d", "SavedTensor", "saved_tensors", "saved_bytes"]

"""Weight storage formats: CSR (int32), BSR (1x4, 4x4, 8x8 and Bx1 blocks) and dense; and the
sizes of the forms inside an ONNX file (bitmask, COO, block-mask: :mod:`.encoded`). One
:func:`choose_format` picks among any of them.

Every format has ``nbytes``, ``to_dense()``, ``to_state(prefix) -> (tensors, header)`` and
``from_state(tensors, header, prefix)``: the tensors are a flat ``{"<layer>.values": ...}``
dict that goes into a safetensors file as is, the header a small JSON-able dict (format name,
shape, block) that goes next to it. `load_state` dispatches on ``header["format"]``.
"""
from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

from .blocks import BLOCK_CANDIDATES, block_pattern_violations, block_size_of
from .bsr import BLOCK_SHAPES, BSRWeight, bsr_nbytes, to_bsr
from .csr import INDEX_DTYPE, CSRWeight, csr_nbytes, matrix_shape, to_csr
from .dense import DenseWeight, to_dense_format
from .encoded import BLOCK_LAYER_OVERHEAD, ENCODED_NAMES, LAYER_OVERHEAD, encoded_nbytes

SparseWeight = Union[CSRWeight, BSRWeight, DenseWeight]

# Runtime formats: the names `to_format` accepts, and `choose_format`'s default candidates.
FORMAT_NAMES: tuple[str, ...] = ("dense", "csr") + tuple(f"bsr{bh}x{bw}" for bh, bw in BLOCK_SHAPES)

__all__ = ["BLOCK_CANDIDATES", "BLOCK_LAYER_OVERHEAD", "BLOCK_SHAPES", "BSRWeight", "CSRWeight", "DenseWeight",
           "ENCODED_NAMES", "FORMAT_NAMES", "INDEX_DTYPE", "LAYER_OVERHEAD", "SparseWeight",
           "block_pattern_violations", "block_size_of", "choose_format", "format_nbytes", "load_state", "matrix_shape",
           "sparsity_of", "to_bsr", "to_csr", "to_dense_format", "to_format"]


def sparsity_of(t: Union[torch.Tensor, np.ndarray]) -> float:
    """Fraction of exact zeros (NaN counts as non-zero): the one count every report, plan and
    check uses, so a layer's sparsity reads the same in `swat verify`, `swat info`, the bench
    and the kernel choice."""
    if isinstance(t, np.ndarray):
        n, nz = t.size, int(np.count_nonzero(t))
    else:
        n, nz = t.numel(), int(torch.count_nonzero(t))
    return 0.0 if n == 0 else 1.0 - nz / n


def _parse_bsr(name: str) -> tuple[int, int] | None:
    if not name.startswith("bsr"):
        return None
    try:
        bh, bw = (int(v) for v in name[3:].split("x"))
    except ValueError:
        return None
    return bh, bw


def to_format(dense: torch.Tensor, name: str) -> SparseWeight:
    """`dense` stored in format `name` ("dense", "csr", "bsr1x4", "bsr4x4", "bsr8x8", any "bsrHxW")."""
    if name == "dense":
        return to_dense_format(dense)
    if name == "csr":
        return to_csr(dense)
    block = _parse_bsr(name)
    if block is not None:
        return to_bsr(dense, block)
    raise ValueError(f"unknown weight format {name!r}; choose one of: {', '.join(FORMAT_NAMES)}")


def format_nbytes(dense: torch.Tensor, name: str, itemsize: int | None = None, block: int = 1) -> int:
    """Bytes `dense` would take in format `name`, computed without building it.

    ``itemsize``: bytes per stored value (default the tensor's: e.g. 2 for an fp16 file of a
    float32 weight); ``block``: the channel block of a "blockmask" form.
    """
    itemsize = dense.element_size() if itemsize is None else itemsize
    encoded = encoded_nbytes(name, dense.numel(), int(torch.count_nonzero(dense)), itemsize, block)
    if encoded is not None:
        return encoded
    if name == "dense":
        return dense.numel() * itemsize
    if name == "csr":
        rows, _ = matrix_shape(tuple(dense.shape))
        return csr_nbytes(rows, int(torch.count_nonzero(dense)), itemsize)
    block = _parse_bsr(name)
    if block is not None:
        return bsr_nbytes(dense, block)
    raise ValueError(f"unknown weight format {name!r}; choose one of: {', '.join(FORMAT_NAMES)}")


def choose_format(weight: torch.Tensor | np.ndarray, candidates: tuple[str, ...] = FORMAT_NAMES, *,
                  itemsize: int | None = None, block: int | None = None) -> str:
    """The candidate format that stores `weight` in the fewest bytes (first listed wins ties).

    Runtime formats (`FORMAT_NAMES`, the default) or ONNX file forms (`ENCODED_NAMES`), any mix.
    A weight whose B consecutive output channels share their zeros (`block_size_of`, e.g.
    trained with ``--block B``; ``block`` given: that B) also competes in its block form: BSR
    with (B, 1) blocks among runtime formats, "blockmask" among file forms.
    """
    w = torch.from_numpy(np.ascontiguousarray(weight)) if isinstance(weight, np.ndarray) else weight
    if block is None:
        block = block_size_of(w) if w.dim() >= 1 else 1
    if block > 1:
        extra = "blockmask" if "bitmask" in candidates else f"bsr{block}x1"
        if extra not in candidates:
            candidates = tuple(candidates) + (extra,)
    sizes = {name: format_nbytes(w, name, itemsize, block) for name in candidates}
    return min(candidates, key=sizes.__getitem__)


def load_state(tensors: dict[str, torch.Tensor], header: dict[str, Any], prefix: str = "") -> SparseWeight:
    """Rebuild the weight `to_state` wrote; the inverse is exact (bit-identical values)."""
    fmt = header.get("format")
    cls = {"csr": CSRWeight, "bsr": BSRWeight, "dense": DenseWeight}.get(fmt)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown weight format {fmt!r} in header of {prefix!r}; expected csr, bsr or dense")
    return cls.from_state(tensors, header, prefix)

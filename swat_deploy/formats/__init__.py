"""Weight storage formats: CSR (int32), BSR (1x4, 4x4, 8x8 and Bx1 blocks) and dense.

Every format has ``nbytes``, ``to_dense()``, ``to_state(prefix) -> (tensors, header)`` and
``from_state(tensors, header, prefix)``: the tensors are a flat ``{"<layer>.values": ...}``
dict that goes into a safetensors file as is, the header a small JSON-able dict (format name,
shape, block) that goes next to it. `load_state` dispatches on ``header["format"]``.
"""
from __future__ import annotations

from typing import Any, Union

import torch

from .blocks import BLOCK_CANDIDATES, block_pattern_violations, block_size_of
from .bsr import BLOCK_SHAPES, BSRWeight, bsr_nbytes, to_bsr
from .csr import INDEX_DTYPE, CSRWeight, csr_nbytes, matrix_shape, to_csr
from .dense import DenseWeight, to_dense_format

SparseWeight = Union[CSRWeight, BSRWeight, DenseWeight]

# Names accepted by `to_format` and returned by `choose_format`.
FORMAT_NAMES: tuple[str, ...] = ("dense", "csr") + tuple(f"bsr{bh}x{bw}" for bh, bw in BLOCK_SHAPES)

__all__ = ["BLOCK_CANDIDATES", "BLOCK_SHAPES", "BSRWeight", "CSRWeight", "DenseWeight", "FORMAT_NAMES", "INDEX_DTYPE",
           "SparseWeight", "block_pattern_violations", "block_size_of", "choose_format", "format_nbytes", "load_state", "matrix_shape", "to_bsr", "to_csr", "to_dense_format",
           "to_format"]


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


def format_nbytes(dense: torch.Tensor, name: str) -> int:
    """Bytes `dense` would take in format `name`, computed without building it."""
    itemsize = dense.element_size()
    if name == "dense":
        return dense.numel() * itemsize
    if name == "csr":
        rows, _ = matrix_shape(tuple(dense.shape))
        return csr_nbytes(rows, int(torch.count_nonzero(dense)), itemsize)
    block = _parse_bsr(name)
    if block is not None:
        return bsr_nbytes(dense, block)
    raise ValueError(f"unknown weight format {name!r}; choose one of: {', '.join(FORMAT_NAMES)}")


def choose_format(weight: torch.Tensor, candidates: tuple[str, ...] = FORMAT_NAMES) -> str:
    """The candidate format that stores `weight` in the fewest bytes (first listed wins ties).

    A weight whose B consecutive output channels share their zeros (`block_size_of`, e.g.
    trained with ``--block B``) also competes as BSR with (B, 1) blocks over its (O, rest) view.
    """
    block = block_size_of(weight) if weight.dim() >= 1 else 1
    if block > 1 and f"bsr{block}x1" not in candidates:
        candidates = tuple(candidates) + (f"bsr{block}x1",)
    sizes = {name: format_nbytes(weight, name) for name in candidates}
    return min(candidates, key=sizes.__getitem__)


def load_state(tensors: dict[str, torch.Tensor], header: dict[str, Any], prefix: str = "") -> SparseWeight:
    """Rebuild the weight `to_state` wrote; the inverse is exact (bit-identical values)."""
    fmt = header.get("format")
    cls = {"csr": CSRWeight, "bsr": BSRWeight, "dense": DenseWeight}.get(fmt)  # type: ignore[arg-type]
    if cls is None:
        raise ValueError(f"unknown weight format {fmt!r} in header of {prefix!r}; expected csr, bsr or dense")
    return cls.from_state(tensors, header, prefix)

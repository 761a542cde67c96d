"""Block sparse row storage (blocks of bh x bw, int32 block indices).

Kept as a storage format because it is smaller than CSR when the zeros come in blocks (one
index per block instead of one per value). The matrix view is padded up to whole blocks;
the padding is zeros in the stored blocks and is cropped by `to_dense`. Measured: for
unstructured SWAT weights a BSR kernel never beats CSR, so no kernel reads this format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .csr import INDEX_DTYPE, _key, matrix_shape

BLOCK_SHAPES: tuple[tuple[int, int], ...] = ((1, 4), (4, 4), (8, 8))


def _blocks_view(dense: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(BR, BC, bh, bw) view of the zero-padded matrix."""
    rows, cols = matrix_shape(tuple(dense.shape))
    bh, bw = block
    br, bc = -(-rows // bh), -(-cols // bw)
    m = dense.detach().reshape(rows, cols)
    if br * bh != rows or bc * bw != cols:
        m = torch.nn.functional.pad(m, (0, bc * bw - cols, 0, br * bh - rows))
    return m.reshape(br, bh, bc, bw).permute(0, 2, 1, 3)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    bh, bw = (int(b) for b in block)
    if bh < 1 or bw < 1:
        raise ValueError(f"BSR block must be positive, got {block}; use one of {BLOCK_SHAPES}")
    return bh, bw


@dataclass(frozen=True)
class BSRWeight:
    """A weight tensor as BSR over its (dim0, rest) view, padded up to whole blocks."""

    indptr: torch.Tensor   # int32 (block_rows + 1,)
    indices: torch.Tensor  # int32 (nnz_blocks,), block column
    values: torch.Tensor   # (nnz_blocks, bh, bw)
    shape: tuple[int, ...]
    block: tuple[int, int]

    format = "bsr"

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    @property
    def nnz_blocks(self) -> int:
        return int(self.indices.numel())

    @property
    def nbytes(self) -> int:
        """4 * (block_rows + 1) + 4 * nnz_blocks + itemsize * nnz_blocks * bh * bw."""
        return (self.indptr.numel() * self.indptr.element_size() + self.indices.numel() * self.indices.element_size()
                + self.values.numel() * self.values.element_size())

    def to_dense(self) -> torch.Tensor:
        rows, cols = self.matrix_shape
        bh, bw = self.block
        br, bc = -(-rows // bh), -(-cols // bw)
        blocks = torch.zeros(br, bc, bh, bw, dtype=self.values.dtype)
        counts = (self.indptr[1:] - self.indptr[:-1]).to(torch.int64)
        row_of = torch.repeat_interleave(torch.arange(br, dtype=torch.int64), counts)
        blocks[row_of, self.indices.to(torch.int64)] = self.values
        m = blocks.permute(0, 2, 1, 3).reshape(br * bh, bc * bw)[:rows, :cols]
        return m.contiguous().reshape(self.shape)

    def to_state(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flat tensors (`<prefix>.indptr`, `.indices`, `.values`) + a JSON-able header."""
        tensors = {_key(prefix, "indptr"): self.indptr.contiguous(), _key(prefix, "indices"): self.indices.contiguous(),
                   _key(prefix, "values"): self.values.contiguous()}
        return tensors, {"format": self.format, "shape": list(self.shape), "block": list(self.block),
                         "nnz_blocks": self.nnz_blocks}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], prefix: str = "") -> "BSRWeight":
        try:
            indptr, indices, values = (tensors[_key(prefix, f)] for f in ("indptr", "indices", "values"))
        except KeyError as e:
            raise ValueError(f"BSR weight {prefix!r} is missing tensor {e.args[0]!r}; re-export the model") from None
        w = cls(indptr, indices, values, tuple(int(d) for d in header["shape"]), _check_block(tuple(header["block"])))
        w.validate()
        return w

    def validate(self) -> None:
        rows, cols = self.matrix_shape
        bh, bw = self.block
        br, bc = -(-rows // bh), -(-cols // bw)
        where = f"BSR weight of shape {self.shape}, block {self.block}"
        if self.indptr.dtype != INDEX_DTYPE or self.indices.dtype != INDEX_DTYPE:
            raise ValueError(f"{where}: indices must be int32")
        n = self.nnz_blocks
        if self.indptr.shape != (br + 1,) or self.values.shape != (n, bh, bw):
            raise ValueError(f"{where}: array shapes do not match the block grid")
        if int(self.indptr[0]) != 0 or int(self.indptr[-1]) != n or bool((self.indptr[1:] < self.indptr[:-1]).any()):
            raise ValueError(f"{where}: indptr must start at 0, be non-decreasing and end at {n}")
        if n and (int(self.indices.min()) < 0 or int(self.indices.max()) >= bc):
            raise ValueError(f"{where}: block column out of range [0, {bc})")


def bsr_nbytes(dense: torch.Tensor, block: tuple[int, int]) -> int:
    """Bytes `to_bsr(dense, block)` would take, without building it."""
    bh, bw = _check_block(block)
    blocks = _blocks_view(dense, (bh, bw))
    nnzb = int((blocks != 0).any(dim=3).any(dim=2).sum())
    return 4 * (blocks.shape[0] + 1) + nnzb * (4 + dense.element_size() * bh * bw)


def to_bsr(dense: torch.Tensor, block: tuple[int, int] = (4, 4)) -> BSRWeight:
    """BSR of `dense`; a block is stored when any of its entries is non-zero."""
    bh, bw = _check_block(block)
    shape = tuple(int(d) for d in dense.shape)
    blocks = _blocks_view(dense, (bh, bw))
    mask = (blocks != 0).any(dim=3).any(dim=2)  # (BR, BC)
    if math.prod(mask.shape) > 2**31 - 1:
        raise ValueError(f"weight of shape {shape} has too many blocks for int32 indices; use a larger block")
    counts = mask.sum(dim=1)
    indptr = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=indptr[1:])
    nz = mask.nonzero()
    values = blocks[nz[:, 0], nz[:, 1]].contiguous()
    return BSRWeight(indptr.to(INDEX_DTYPE), nz[:, 1].to(INDEX_DTYPE).contiguous(), values, shape, (bh, bw))

"""Bitmask, COO and block-mask: the forms a sparse weight takes inside an ONNX file.

Unlike CSR / BSR (decoded by our kernels), these are decoded by standard ONNX ops in the graph
itself (:mod:`swat_deploy.onnx_compact` writes those nodes), so a form's size includes what its
nodes cost in the file. Sizes only: :func:`swat_deploy.formats.choose_format` compares them with
the other formats'.
"""
from __future__ import annotations

# ONNX file forms in tie order (the simplest wins a tie); "blockmask" joins for a block weight
ENCODED_NAMES: tuple[str, ...] = ("dense", "bitmask", "coo")
# serialized bytes a bitmask layer adds beyond its bits and values (Reshape node, shape, split entry)
LAYER_OVERHEAD = 160
# a blockmask layer also has its grid shape, three more nodes and a Concat entry (measured)
BLOCK_LAYER_OVERHEAD = LAYER_OVERHEAD + 220


def encoded_nbytes(name: str, n: int, nnz: int, itemsize: int, block: int = 1) -> int | None:
    """Bytes of ``n`` values with ``nnz`` non-zeros in form ``name``; None if not a file form.

    bitmask: the non-zero values plus one bit per element; coo: the values plus an int32 index
    each; blockmask: the values plus one bit per group of ``block`` output channels.
    """
    if name == "bitmask":
        return nnz * itemsize + (n + 7) // 8 + LAYER_OVERHEAD
    if name == "coo":
        return nnz * (itemsize + 4) + LAYER_OVERHEAD + 100
    if name == "blockmask":
        return nnz * itemsize + (n // max(block, 1) + 7) // 8 + BLOCK_LAYER_OVERHEAD
    return None

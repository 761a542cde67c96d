"""Sparse weight formats: exact round trips, the byte formulas, format choice, file round trip."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from swat_deploy import formats as F


def _sparse(shape: tuple[int, ...], sparsity: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    return w


SHAPES = [(64, 32, 3, 3), (10, 512), (7, 5, 5, 3), (3, 1, 1, 1), (9, 13), (1, 4)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("name", F.FORMAT_NAMES)
def test_round_trip_is_bit_exact(shape: tuple[int, ...], sparsity: float, name: str) -> None:
    w = _sparse(shape, sparsity)
    w.view(-1)[0] = -1e-30  # a tiny value must survive, not be rounded to zero
    stored = F.to_format(w, name)
    assert torch.equal(_bits(stored.to_dense()), _bits(w))
    tensors, header = stored.to_state("layer1.conv")
    json.dumps(header)  # the header must be JSON-able
    assert all(k.startswith("layer1.conv.") for k in tensors)
    back = F.load_state(tensors, header, "layer1.conv")
    assert type(back) is type(stored)
    assert torch.equal(_bits(back.to_dense()), _bits(w))
    assert back.nbytes == stored.nbytes == F.format_nbytes(w, name)


@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_formulas(shape: tuple[int, ...]) -> None:
    w = _sparse(shape, 0.8, seed=1)
    rows = shape[0]
    cols = w.numel() // rows
    nnz = int((w != 0).sum())
    csr = F.to_csr(w)
    assert csr.indptr.dtype == csr.indices.dtype == torch.int32
    assert csr.nbytes == 4 * (rows + 1) + 4 * nnz + 4 * nnz
    assert csr.nnz == nnz and csr.matrix_shape == (rows, cols)
    assert abs(csr.sparsity - (1 - nnz / w.numel())) < 1e-12
    for bh, bw in F.BLOCK_SHAPES:
        bsr = F.to_bsr(w, (bh, bw))
        br, bc = -(-rows // bh), -(-cols // bw)
        padded = torch.zeros(br * bh, bc * bw)
        padded[:rows, :cols] = w.reshape(rows, cols)
        nnzb = int((padded.reshape(br, bh, bc, bw) != 0).any(3).any(1).sum())
        assert bsr.nnz_blocks == nnzb
        assert bsr.nbytes == 4 * (br + 1) + 4 * nnzb + 4 * bh * bw * nnzb
        assert bsr.values.shape == (nnzb, bh, bw)
    assert F.to_dense_format(w).nbytes == 4 * w.numel()


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_csr_matches_torch_reference() -> None:
    w = _sparse((12, 7, 3, 3), 0.7, seed=2)
    csr = F.to_csr(w)
    ref = w.reshape(12, -1).to_sparse_csr()
    assert torch.equal(csr.indptr.long(), ref.crow_indices())
    assert torch.equal(csr.indices.long(), ref.col_indices())
    assert torch.equal(csr.values, ref.values())


def test_choose_format_picks_smallest() -> None:
    dense = torch.randn(32, 64)
    assert F.choose_format(dense) == "dense"
    assert F.choose_format(_sparse((64, 64, 3, 3), 0.9)) == "csr"
    blocky = torch.zeros(64, 64)
    blocky[:8, :8] = torch.randn(8, 8)
    blocky[32:40, 16:24] = torch.randn(8, 8)
    choice = F.choose_format(blocky)
    assert choice == "bsr8x8"
    sizes = {n: F.format_nbytes(blocky, n) for n in F.FORMAT_NAMES}
    assert sizes[choice] == min(sizes.values())
    quad = torch.zeros(16, 64)
    quad[::2, ::8] = 1.0  # isolated values: one 1x4 block each is 5 floats vs CSR's 2
    assert F.choose_format(quad, ("csr", "bsr1x4")) == "csr"


def test_safetensors_file_round_trip(tmp_path) -> None:  # noqa: ANN001
    weights = {"conv1": _sparse((16, 3, 3, 3), 0.9), "fc": _sparse((10, 64), 0.95), "conv2": torch.randn(8, 16, 1, 1)}
    tensors: dict[str, torch.Tensor] = {}
    headers = {}
    for name, w in weights.items():
        fmt = F.choose_format(w)
        t, h = F.to_format(w, fmt).to_state(name)
        tensors.update(t)
        headers[name] = h
    save_file(tensors, str(tmp_path / "w.safetensors"))
    (tmp_path / "w.json").write_text(json.dumps(headers))
    loaded = load_file(str(tmp_path / "w.safetensors"))
    hdrs = json.loads((tmp_path / "w.json").read_text())
    for name, w in weights.items():
        assert torch.equal(F.load_state(loaded, hdrs[name], name).to_dense(), w)


def test_bad_state_is_rejected_with_a_message() -> None:
    w = _sparse((8, 8), 0.5)
    tensors, header = F.to_csr(w).to_state("l")
    with pytest.raises(ValueError, match="missing tensor"):
        F.load_state({k: v for k, v in tensors.items() if not k.endswith("indices")}, header, "l")
    with pytest.raises(ValueError, match="unknown weight format"):
        F.load_state(tensors, {**header, "format": "coo"}, "l")
    bad = dict(tensors)
    bad["l.indices"] = bad["l.indices"].clone()
    bad["l.indices"][0] = 99
    with pytest.raises(ValueError, match="out of range"):
        F.load_state(bad, header, "l")
    bad = dict(tensors)
    bad["l.indptr"] = bad["l.indptr"].long()
    with pytest.raises(ValueError, match="int32"):
        F.load_state(bad, header, "l")
    with pytest.raises(ValueError, match="unknown weight format"):
        F.to_format(w, "bsr")


def test_sparsity_of_counts_exact_zeros_in_torch_and_numpy() -> None:
    """One count for every report: -0.0 is a zero, NaN is not, an empty tensor is 0 % sparse."""
    import numpy as np

    from swat_deploy.formats import sparsity_of

    t = torch.tensor([0.0, -0.0, float("nan"), 1.0, 0.0, 2.0, 0.0, 3.0])
    assert sparsity_of(t) == 0.5
    assert sparsity_of(t.numpy()) == 0.5
    assert sparsity_of(np.zeros((0, 3), np.int8)) == 0.0
    assert sparsity_of(torch.zeros(3, 3, dtype=torch.int8)) == 1.0

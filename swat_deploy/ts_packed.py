"""TorchScript layers whose weights are stored as bitmask + values and run sparse where that wins.

Storage: buffers ``weight_bits`` (numpy packbits order), ``weight_values`` (the non-zeros,
row-major) and ``weight_shape`` - the same compact form as the ONNX export, so ``torch.jit.load``
alone restores the model.

Compute: the first forward decodes the weight. Batches of up to ``csr_max_batch`` images then run
as a torch CSR matrix times the input (im2col for convs), larger ones as the dense op. Export
times both on each layer's real input shape (`pack_layers(..., tune=True)`) and sets the
threshold: torch's CSR kernels only beat dense on small, very sparse problems (measured here:
a 512x512x3x3 conv on a 4x4 map at 95 % sparsity 2.4x faster at batch 1, 2x slower at batch 64;
a 64x64x3x3 conv on 32x32 5x slower at any batch, the unfold costs more than the whole dense
conv). The numba kernels of `swat_deploy.Session` are faster still but cannot live in a
TorchScript file.

No ``from __future__ import annotations`` here: TorchScript must see real annotations.
"""
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from swat_deploy.prune import SparseModel

# Batch sizes timed at export, smallest first; the threshold is the last one CSR wins at
# without a loss at any smaller one. CSR must be this much faster to be chosen (timing noise).
TUNE_BATCHES = (1, 4, 16, 64)
CSR_MARGIN = 0.9


def _unpack(bits: torch.Tensor, values: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """Bitmask (MSB first, numpy packbits order) + row-major nonzeros -> dense float32 weight."""
    dims: List[int] = shape.tolist()
    n = 1
    for d in dims:
        n *= d
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    mask = torch.bitwise_and(torch.bitwise_right_shift(bits.unsqueeze(1), shifts), 1).reshape(-1)[:n].to(torch.bool)
    flat = torch.zeros(n, dtype=torch.float32)
    flat = flat.masked_scatter(mask, values.to(torch.float32))
    return flat.reshape(dims)


class _Packed(nn.Module):
    """Shared storage of a packed layer: the three buffers and the lazily decoded weights."""

    _dense: Optional[torch.Tensor]
    _csr: Optional[torch.Tensor]
    csr_max_batch: int

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        w = weight.detach().to(torch.float32).contiguous()
        mask = (w != 0).reshape(-1)
        self.register_buffer("weight_bits", torch.from_numpy(np.packbits(mask.numpy())))
        self.register_buffer("weight_values", w.reshape(-1)[mask].clone())
        self.register_buffer("weight_shape", torch.tensor(list(w.shape), dtype=torch.int64))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._dense = None
        self._csr = None
        self.csr_max_batch = 0

    def dense_weight(self) -> torch.Tensor:
        w = self._dense
        if w is None:
            w = _unpack(self.weight_bits, self.weight_values, self.weight_shape)
            self._dense = w
        return w

    def csr_weight(self) -> torch.Tensor:
        """(out, in * kh * kw) as a CSR tensor, decoded without keeping the dense copy."""
        w = self._csr
        if w is None:
            dense = self._dense
            if dense is None:
                dense = _unpack(self.weight_bits, self.weight_values, self.weight_shape)
            w = dense.reshape(dense.size(0), -1).to_sparse_csr()
            self._csr = w
        return w


class PackedConv2d(_Packed):
    """``nn.Conv2d`` (zero padding) with its weight stored as bitmask + values."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__(conv.weight, conv.bias)
        self.stride: List[int] = list(conv.stride)
        self.padding: List[int] = list(conv.padding)
        self.dilation: List[int] = list(conv.dilation)
        self.groups: int = conv.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(0) <= self.csr_max_batch:
            return self.forward_csr(x)
        return self.forward_dense(x)

    @torch.jit.export
    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.jit.export
    def forward_csr(self, x: torch.Tensor) -> torch.Tensor:
        """im2col, then one CSR x dense product for the whole batch (groups == 1 only)."""
        n = x.size(0)
        kh = int(self.weight_shape[2])
        kw = int(self.weight_shape[3])
        cols = F.unfold(x, [kh, kw], dilation=self.dilation, padding=self.padding, stride=self.stride)
        length = cols.size(2)
        y = torch.mm(self.csr_weight(), cols.permute(1, 0, 2).reshape(cols.size(1), n * length))
        bias = self.bias
        if bias is not None:
            y = y + bias.unsqueeze(1)
        h_out = (x.size(2) + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        return y.reshape(-1, n, length).permute(1, 0, 2).reshape(n, -1, h_out, length // h_out)


class PackedLinear(_Packed):
    """``nn.Linear`` with its weight stored as bitmask + values."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.size(0) <= self.csr_max_batch:
            return self.forward_csr(x)
        return self.forward_dense(x)

    @torch.jit.export
    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    @torch.jit.export
    def forward_csr(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.mm(self.csr_weight(), x.t()).t()
        bias = self.bias
        return y if bias is None else y + bias


def _packable(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and not isinstance(m.padding, str))


def _input_shapes(sm: SparseModel, names: List[str]) -> Dict[str, Tuple[int, ...]]:
    """Each named layer's input shape on one image, from a forward pass with hooks."""
    net = sm.module.net
    shapes: Dict[str, Tuple[int, ...]] = {}
    hooks = [net.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))) for name in names]
    try:
        with torch.inference_mode():
            sm.module(torch.rand((1,) + tuple(sm.input_shape[1:])))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def csr_max_batch(layer: _Packed, input_shape: Tuple[int, ...]) -> int:
    """The largest batch of `TUNE_BATCHES` up to which CSR was timed faster than dense (0: never)."""
    from swat_deploy.timing import time_interleaved

    if isinstance(layer, PackedConv2d) and layer.groups != 1:
        return 0
    best = 0
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        for b in TUNE_BATCHES:
            x = torch.rand((b,) + tuple(input_shape[1:]), generator=gen)
            t = time_interleaved({"dense": lambda: layer.forward_dense(x), "csr": lambda: layer.forward_csr(x)},
                                 repeats=7, budget_s=0.2, per_turn=2)
            if t["csr"][0] >= CSR_MARGIN * t["dense"][0]:
                break
            best = b
    layer._dense = None
    layer._csr = None
    return best


def pack_layers(sm: SparseModel, tune: bool = False) -> Dict[str, str]:
    """Swap each run.json layer whose packed form is smaller for its Packed twin; format per layer.

    ``tune`` times dense vs CSR on each packed layer (see `csr_max_batch`); the format reads
    ``bitmask+csr<=B`` for a layer that runs CSR up to batch B.
    """
    from swat_deploy.formats import ENCODED_NAMES, choose_format

    net = sm.module.net
    chosen: Dict[str, str] = {}
    packed: Dict[str, _Packed] = {}
    for layer in sm.layers:
        m = net.get_submodule(layer.name)
        fmt = choose_format(m.weight.detach(), ENCODED_NAMES) if _packable(m) else "dense"
        if fmt == "dense":  # where coo wins in ONNX, bitmask still beats dense; one packed form here
            chosen[layer.name] = "dense"
            continue
        packed[layer.name] = PackedLinear(m.weight, m.bias) if isinstance(m, nn.Linear) else PackedConv2d(m)
        chosen[layer.name] = "bitmask"
    shapes = _input_shapes(sm, list(packed)) if tune and packed else {}
    for name, p in packed.items():
        if name in shapes:
            p.csr_max_batch = csr_max_batch(p, shapes[name])
            if p.csr_max_batch:
                chosen[name] = f"bitmask+csr<={p.csr_max_batch}"
        scripted = torch.jit.script(p)  # scripted now, so an outer trace keeps the batch branch and caches
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, scripted)
    return chosen

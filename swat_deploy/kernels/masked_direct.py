"""Direct sparse conv on the unpadded NCHW input, the zero padding as lane masks (AVX-512, AVX2).

Why a second direct kernel: `csr_direct` multiplies over a packed input (kw column-shifted,
zero-padded copies written on every call), which keeps every load aligned - what matters when
the multiply dominates (many non-zeros, large batches). At batch 1 and high sparsity that copy
is a large share of the layer. This kernel (the one SWAT training runs its forward on,
``swat_native/csrc/train_conv_f32.c``) reads the input where it lies: every tap is one constant
shift of the flat plane, the lanes whose source pixel falls outside the image are masked off,
and a strided conv reads one copy split into stride phases. Measured per layer at batch 1, one
thread, AMD EPYC (AVX-512), ResNet-18 shapes: 1.0-1.25x `csr_direct` at 32x32 and 16x16 maps,
1.5-2.2x at 8x8 and 4x4. The autotuner picks per layer, so where the packed layout wins it
stays.

Covers: any groups (a grouped or depthwise conv is a block-diagonal weight: each group's rows
read their own input channels, so MobileNet's depthwise convs run here too), AVX-512 or AVX2 (vmaskmovps; the same 16-lane tiles as two halves), blocks of 1, 2 or 4, any dilation, a stride-1 conv whose output is
as large as its input (symmetric "same" padding) or a strided conv whose taps all land inside
its stride phases (ResNet's downsampling 3x3 and 1x1 convs). The weight's tap-major block CSR
and the lane masks are built once per input shape.
"""
from __future__ import annotations

import numpy as np
import torch

import swat_native as native
from swat_native import direct_layer, layout_choice
from swat_native import train as native_train
from swat_deploy.threads import native_threads
from . import _numba_common as nc
from .base import LayerSpec
from .csr_direct import _CsrDirectConv

_MAX_SHAPES = 8


def _tables(spec: LayerSpec, h: int, w: int, block: int) -> tuple | None:
    """(h_out, w_out, lane masks, per-tap shifts) for input h x w, or None if the kernel does
    not apply. Tap (i, j) of output pixel q reads phase (ry, rx) of the input at q + shift."""
    o, cg, kh, kw = spec.weight_shape
    (sh, sw), (dh, dw) = spec.stride, spec.dilation
    pt, pl, pb, pr = spec.padding
    h_out = (h + pt + pb - dh * (kh - 1) - 1) // sh + 1
    w_out = (w + pl + pr - dw * (kw - 1) - 1) // sw + 1
    plane = h_out * w_out
    if h_out < 1 or w_out < 1 or not native_train.tconv_supported(native.isa_code(), block, plane):
        return None
    if (sh, sw) == (1, 1) and (h_out, w_out) != (h, w):
        return None
    if cg * spec.groups * sh * sw * plane + 2 * plane >= 2**31 or kh * kw > 255:
        return None
    t = native_train.direct_tables(kh, kw, (sh, sw), (pt, pl), (dh, dw), h, w, h_out, w_out)
    if t is None:
        return None
    masks, shifts = t
    return h_out, w_out, masks, shifts


def _usable_block(block: int, per_group: int = 4) -> int:
    """The largest block height the kernel has (4, 2, 1) that divides `block` and the output
    channels per group: a pattern shared by 8 or 16 channels is also shared by each 4 of them."""
    return next(b for b in (4, 2, 1) if block % b == 0 and per_group % b == 0)


class _MaskedDirectConv:
    uses_torch_threads = False  # the extension's own pool; see base.thread_scope
    own_pool = True  # its thread count comes from threads.native_threads(), nothing else
    fuses_epilogue = True  # __call__ takes residual / relu (see Op.fused)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        o, cg, kh, kw = spec.weight_shape
        self.spec = spec
        self._weight, self._bias_t = weight, bias
        self._fallback: _CsrDirectConv | None = None
        self.block = _usable_block(spec.block, o // spec.groups)
        self._c_in = cg * spec.groups
        self._depthwise = cg == 1 and spec.groups == o and self.block == 1
        self.w2 = weight.detach().float().reshape(o, -1).contiguous().numpy()
        self.bias = np.zeros(o, np.float32) if bias is None else bias.detach().float().contiguous().numpy()
        nz = self.w2.reshape(o // self.block, self.block, -1).any(axis=1)
        self.nbytes = int(nz.sum()) * (4 * self.block + 4) + (o // self.block + 1) * 4
        self._calls: dict[tuple[int, int, bool], direct_layer.DirectLayerCall | None] = {}
        self._token = object()  # this op's part of its layout_choice keys
        self._picked: dict[tuple[int, int, int, int], direct_layer.DirectLayerCall] = {}
        if spec.input_shape is not None:
            nc.warm_up(self, spec.input_shape)

    def _call_for(self, h: int, w: int, pad: bool = False) -> direct_layer.DirectLayerCall | None:
        """The layer call for an h x w input, None where the kernel does not apply to that size;
        ``pad``: the offsets assume the input channels at the padded stride of tconv_cstride
        (a strided conv's stride phases are always copied, so they always take it)."""
        (sh, sw) = self.spec.stride
        strided = (sh, sw) != (1, 1)
        pad = not self._depthwise and (strided or pad)
        key = (h, w, pad)
        if key in self._calls:
            return self._calls[key]
        t = _tables(self.spec, h, w, self.block)
        if t is None:
            self._calls[key] = None
            return None
        h_out, w_out, masks, shifts = t
        o, cg, kh, kw = self.spec.weight_shape
        plane, kk = h_out * w_out, kh * kw
        cstride = sh * sw * plane if strided else h * w
        # a strided 1x1 conv without padding reads phase (0, 0) only: copy just that quarter
        phase0 = strided and kk == 1 and not self._depthwise and not np.any(shifts)
        if phase0:
            cstride = plane
        if pad:
            cstride = native_train.tconv_cstride(cstride)
        rows = o // self.block
        indptr = np.zeros(rows * kk + 1, np.int32)
        offs = np.zeros(rows * cg * kk, np.int32)
        vals = np.zeros(o * cg * kk, np.float32)
        native_train.tconv_csr(self.w2, self.block, kk, cstride, shifts, indptr, offs, vals, self.spec.groups)
        call = direct_layer.DirectLayerCall(indptr, offs, vals, self.bias, masks, kk=kk, o=o, B=self.block, P=plane,
                                            c=cg * self.spec.groups, h=h, w=w, sh=sh, sw=sw, ho=h_out, wo=w_out,
                                            dw=2 if phase0 else int(self._depthwise and strided), cs=cstride)
        if len(self._calls) >= _MAX_SHAPES:
            self._calls.pop(next(iter(self._calls)))
        self._calls[key] = call
        return call

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        n, c, h, w = x.shape
        if c != self._c_in:
            raise ValueError(f"conv expects input (N, {self._c_in}, H, W), got {tuple(x.shape)}")
        call = self._pick_call(x)
        if call is None:  # an op built for another input size (or none): the packed direct kernel
            if self._fallback is None:
                self._fallback = _CsrDirectConv(self._weight, self._bias_t, self.spec)
            return self._fallback(x, residual, relu)
        a = call.args
        y = x.new_empty((n, a.o, a.ho, a.wo))  # x is float32 (Op checks); 2 us less than torch.empty(dtype=)
        res = 0
        if residual is not None:
            if residual.shape != y.shape or residual.dtype != torch.float32:
                y = self(x)
                y = y.add_(residual)
                return y.relu_() if relu else y
            residual = residual.contiguous()
            res = residual.data_ptr()
        self._run(call, x, y, res, relu)
        return y

    @staticmethod
    def _run(call: direct_layer.DirectLayerCall, x: torch.Tensor, y: torch.Tensor, res: int, relu: bool) -> None:
        n = x.shape[0]
        scratch = call.scratch_floats(n)
        phases = nc.workspace(0, scratch).ctypes.data if scratch else 0
        call(x.data_ptr(), y.data_ptr(), n, res, relu, phases, native.isa_code(), native_threads())

    def _pick_call(self, x: torch.Tensor) -> direct_layer.DirectLayerCall | None:
        """The call for x's shape: a stride-1 conv on several images reads its input in place or
        copied at the padded channel stride, whichever was faster when first timed here
        (swat_native.layout_choice; one image is always read in place: the copy cost about what it
        saved, 0.98-1.09x, on Zen 3)."""
        n, _, h, w = x.shape
        threads = native_threads()
        hit = self._picked.get((h, w, n, threads))
        if hit is not None:
            return hit
        call = self._pick_uncached(x, threads)
        if call is not None:
            if len(self._picked) >= _MAX_SHAPES:
                self._picked.pop(next(iter(self._picked)))
            self._picked[(h, w, n, threads)] = call
        return call

    def _pick_uncached(self, x: torch.Tensor, threads: int) -> direct_layer.DirectLayerCall | None:
        n, _, h, w = x.shape
        plain = self._call_for(h, w)
        if (plain is None or n == 1 or self._depthwise or self.spec.stride != (1, 1)
                or native_train.tconv_cstride(h * w) == h * w):
            return plain
        padded = self._call_for(h, w, True)
        y = x.new_empty((n, plain.args.o, plain.args.ho, plain.args.wo))
        won = layout_choice.padded_wins((self._token, h, w, n, threads),
                                        lambda: self._run(plain, x, y, 0, False),
                                        lambda: self._run(padded, x, y, 0, False))
        return padded if won else plain


class MaskedDirectKernel:
    """Direct sparse conv on the NCHW input with lane-masked padding (AVX-512 or AVX2, no packed copies)."""

    name = "masked_direct"
    thread_pool = "native"
    rule_min_sparsity = None  # only where timed on a known input shape (it covers some layers only)

    def supports(self, spec: LayerSpec) -> bool:
        if (spec.kind != "conv2d" or spec.weight_shape[0] % spec.groups or not direct_layer.available()
                or native.isa() not in ("avx2", "avx512")):
            return False
        top, left, bottom, right = spec.padding
        if spec.stride == (1, 1) and (top != bottom or left != right):
            return False
        if spec.input_shape is not None:
            n, c, h, w = spec.input_shape
            return _tables(spec, h, w, _usable_block(spec.block, spec.weight_shape[0] // spec.groups)) is not None
        return True

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> _MaskedDirectConv:
        return _MaskedDirectConv(weight, bias, spec)

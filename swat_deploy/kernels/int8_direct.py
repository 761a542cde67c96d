"""Sparse int8 conv (QDQ semantics) on the compiled kernels of ``swat_native/csrc/int8_conv.c``.

One layer of a QDQ graph, ``Q(Conv(DQ(x_u8), DQ(w_i8), DQ(b_i32)))``, computed the way
onnxruntime's QLinearConv does (int32 sums, float requantisation, round half to even), but over
the non-zero weight blocks only. The block is what the int8 dot product consumes: 4
consecutive input channels of one output channel at one kernel tap (VNNI's vpdpbusd multiplies
4 u8 by 4 s8 per lane); weights pruned in such blocks lose nothing, unstructured ones store the
zeros of partly filled blocks (at 90 % unstructured sparsity about a third of the blocks
survive, so they still run ~3x fewer blocks than dense).

Same two-step shape as the float32 kernels (`supports(spec)`, `prepare(...)` -> a callable with
``nbytes``), but its own spec: an int8 layer carries scales and zero points, and its callable
takes and returns uint8 tensors, so it is not in the float32 `kernels.KERNELS` registry.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch

from .base import numba_threads, serial_call

BLOCK = 4  # input channels per weight block (the int8 dot product's width)
_SLACK_WORDS = 32  # the kernels read up to 16 words past the last grid position


@dataclass(frozen=True)
class QConvSpec:
    """A QDQ conv: weights int8 symmetric per output channel, activations uint8 per tensor."""

    weight_shape: tuple[int, int, int, int]  # (O, C, kh, kw)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    x_scale: float = 1.0
    x_zero: int = 0
    y_scale: float = 1.0
    y_zero: int = 0
    relu: bool = False  # clamp at the output zero point (a Relu between Conv and QuantizeLinear)


def requant_multipliers(x_scale: float, w_scale: np.ndarray, y_scale: float) -> np.ndarray:
    """float32 ``x_scale * w_scale[o] / y_scale``, in onnxruntime's order of float32 operations."""
    xs, ys = np.float32(x_scale), np.float32(y_scale)
    return ((xs * np.asarray(w_scale, np.float32).reshape(-1)) / ys).astype(np.float32)


class Int8DirectKernel:
    """The direct sparse int8 conv (any kernel size, stride and padding; dilation 1, groups 1)."""

    name = "int8-direct"

    def supports(self, spec: QConvSpec) -> bool:
        from swat_native import int8 as native

        return (native.available() and spec.groups == 1 and tuple(spec.dilation) == (1, 1)
                and len(spec.weight_shape) == 4 and 0 <= spec.x_zero <= 255 and 0 <= spec.y_zero <= 255)

    def prepare(self, weight: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None,
                spec: QConvSpec) -> "PreparedQConv":
        return PreparedQConv(weight, w_scale, bias, spec)


class PreparedQConv:
    """uint8 NCHW in -> uint8 NCHW out for one layer; input-shape dependent offsets cached.

    ``isa`` pins one path (tests); None uses `swat_native.int8.isa()` at each call.
    """

    uses_torch_threads = False

    def __init__(self, weight: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None, spec: QConvSpec,
                 isa: str | None = None) -> None:
        w = np.asarray(weight)
        if w.dtype != np.int8 or w.ndim != 4:
            raise ValueError(f"int8 conv weight must be a 4-D int8 array, got {w.dtype} {w.shape}")
        o, c, kh, kw = (int(d) for d in w.shape)
        w_scale = np.asarray(w_scale, np.float32).reshape(-1)
        if w_scale.size == 1:
            w_scale = np.full(o, w_scale[0], np.float32)
        if w_scale.size != o:
            raise ValueError(f"weight scale has {w_scale.size} values for {o} output channels")
        self.spec, self.isa = spec, isa
        self.out_channels, self.in_channels, self.kh, self.kw = o, c, kh, kw
        cg = -(-c // BLOCK)
        self.groups_in = cg
        wp = np.zeros((o, cg * BLOCK, kh, kw), np.int8)
        wp[:, :c] = w
        # (o, i, j, cg, q): one block per (o, tap, channel group); kept if any of its 4 is non-zero
        blocks = np.ascontiguousarray(wp.reshape(o, cg, BLOCK, kh, kw).transpose(0, 3, 4, 1, 2))
        keep = blocks.any(axis=-1)  # (o, kh, kw, cg)
        oo, ii, jj, gg = np.nonzero(keep)
        sh = spec.stride[0]
        # memory order of the packed input: copy (j, i % s), channel group, row shift i // s
        order = np.lexsort((ii // sh, gg, ii % sh, jj, oo))
        oo, ii, jj, gg = oo[order], ii[order], jj[order], gg[order]
        self._tap = (ii.astype(np.int64), jj.astype(np.int64), gg.astype(np.int64))
        self.vals = np.ascontiguousarray(blocks[oo, ii, jj, gg]).view(np.int32).reshape(-1).copy()
        self.indptr = np.zeros(o + 1, np.int32)
        np.cumsum(np.bincount(oo, minlength=o), out=self.indptr[1:])
        sums = w.reshape(o, -1).astype(np.int64).sum(axis=1)
        b = np.zeros(o, np.int64) if bias is None else np.asarray(bias, np.int64).reshape(-1)
        corr = b - int(spec.x_zero) * sums
        if np.abs(corr).max(initial=0) >= 2**31:
            raise ValueError("int8 conv bias / zero-point correction overflows int32")
        self.corr = corr.astype(np.int32)
        self.mult = requant_multipliers(spec.x_scale, w_scale, spec.y_scale)
        self.lo = int(spec.y_zero) if spec.relu else 0
        self.nbytes = int(self.vals.nbytes + self.indptr.nbytes + 4 * self.vals.size)  # vals + offsets
        self.nnz_blocks = int(self.vals.size)
        self._shapes: dict[tuple[int, int], tuple] = {}
        self._scratch = threading.local()  # the packed input, one buffer per calling thread
        self._calls: dict[tuple, tuple] = {}  # (thread, n, h, w, threads) -> one-call layer
        self.residual: tuple[float, float, float, int] | None = None  # see fuse_residual

    @property
    def block_density(self) -> float:
        """Fraction of the (o, tap, 4-channel group) blocks stored."""
        return self.nnz_blocks / max(1, self.out_channels * self.kh * self.kw * self.groups_in)

    def _geometry(self, h: int, w: int) -> tuple:
        g = self._shapes.get((h, w))
        if g is None:
            s = self.spec
            sh, sw = s.stride
            pt, pl, pb, pr = s.padding
            h_out = (h + pt + pb - self.kh) // sh + 1
            w_out = (w + pl + pr - self.kw) // sw + 1
            if h_out < 1 or w_out < 1:
                raise ValueError(f"input {h}x{w} is smaller than the {self.kh}x{self.kw} kernel")
            if sh != sw:
                raise ValueError("int8 conv with different row and column strides is not supported")
            ii, jj, gg = self._tap
            # kw column-shifted copies per row phase: a tap is (copy, channel group, whole-row
            # shift). One copy per tap (im2col) keeps narrow maps' loads 64-byte aligned, but was
            # measured slower on 8x8 / 4x4 maps (3x the window, 2x the packing).
            nph = min(sh, self.kh)
            rows = h_out + (self.kh - 1) // sh
            shift = (ii // sh) * w_out
            copy = rows * w_out
            img_in = self.kw * nph * self.groups_in * copy
            tap_row = ii % sh
            offs = ((jj * nph + tap_row) * self.groups_in + gg) * copy + shift
            if img_in >= 2**31 // 64:
                raise ValueError("int8 conv input too large for 32-bit offsets")
            g = (h_out, w_out, nph, rows, img_in, offs.astype(np.int32))
            self._shapes[(h, w)] = g
        return g

    def fuse_residual(self, ra: float, rb: float, c: float, lo: int) -> None:
        """Calls given a residual then return QLinearAdd(conv output, residual) instead: onnxruntime's
        ``rint(clamp(y * ra + res * rb + c, lo, 255))`` in float32 (see `_qadd` in int8_qdq.py),
        done in the conv's output loop (one pass over the output and one step per block fewer)."""
        self.residual = (float(np.float32(ra)), float(np.float32(rb)), float(np.float32(c)), int(lo))
        self._calls.clear()  # calls built before carry no residual

    def __call__(self, x: torch.Tensor, threads: int | None = None, res: torch.Tensor | None = None) -> torch.Tensor:
        """``threads``: work items to split the layer into (None: numba's thread count; 1 and
        inside `serial_scope`: one serial call). ``res``: the residual of a `fuse_residual` layer."""
        from swat_native import int8 as native

        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"int8 conv expects uint8 NCHW input with {self.in_channels} channels, "
                             f"got {x.dtype} {tuple(x.shape)}")
        if res is not None and (self.residual is None or res.dtype != torch.uint8):
            raise ValueError("a residual needs fuse_residual() first and a uint8 tensor")
        n, c, h, w = x.shape
        threads = 1 if serial_call() else max(1, threads or numba_threads())
        if _LAYER_CALL and native.layer_call_available():
            return self._one_call(x, n, h, w, threads, res)
        h_out, w_out, nph, rows, img_in, offs = self._geometry(h, w)
        xn = np.ascontiguousarray(x.numpy())
        xp = self._packed(n * img_in * 4 + _SLACK_WORDS * 4)
        par = threads > 1
        s = self.spec
        items = n * self.groups_in
        native.pack_loop(par)(xn, xp, c, h, w, self.kw, s.stride[0], nph, s.padding[0], s.padding[1], rows,
                              w_out, s.x_zero, img_in, items, min(threads, items))
        plane = h_out * w_out
        y = np.empty((n, self.out_channels, h_out, w_out), np.uint8)
        ntiles = n * (-(-plane // 16))
        by_rows = par and ntiles < 8 * threads
        code = native.isa_code(self.isa)
        native.conv_loop(par)(code, self.indptr, offs, self.vals, self.corr, self.mult, s.y_zero, self.lo, 255,
                              xp, img_in, y, self.out_channels * plane, plane, ntiles, threads, by_rows)
        if res is not None:
            rn = np.ascontiguousarray(res.numpy()).reshape(-1)
            if rn.size != y.size:
                raise ValueError(f"residual {tuple(res.shape)} does not match the conv output {y.shape}")
            ra, rb, rc, rlo = self.residual
            native.add_loop(False)(code, y.reshape(-1), rn, y.reshape(-1), ra, rb, rc, rlo, 1)
        return torch.from_numpy(y)

    def _packed(self, need: int) -> np.ndarray:
        """This calling thread's packed-input buffer, 64-byte aligned (the kernel loads whole lines)."""
        xp = getattr(self._scratch, "buf", None)
        if xp is None or xp.size < need:
            raw = np.empty(need + 64, np.uint8)
            start = (-raw.ctypes.data) % 64
            xp = self._scratch.buf = raw[start:start + need]
        return xp

    def layer_call(self, n: int, h: int, w: int, threads: int) -> tuple:
        """(a new `swat_native.int8.QLayerCall` for inputs (n, C, h, w), the output shape, the packed
        buffer's bytes); the caller sets its pointers (`_one_call`, or a chain of layers)."""
        from swat_native import int8 as native

        h_out, w_out, nph, rows, img_in, offs = self._geometry(h, w)
        s = self.spec
        plane = h_out * w_out
        ntiles = n * (-(-plane // 16))
        items = n * self.groups_in
        chunk = fused_chunk(n, plane, threads)
        call = native.QLayerCall(
            self.indptr, offs, self.vals, self.corr, self.mult, rows=self.out_channels, zy=s.y_zero, lo=self.lo,
            hi=255, n=n, c=self.in_channels, h=h, w=w, kw=self.kw, s=s.stride[0], nph=nph, pt=s.padding[0],
            pl=s.padding[1], R=rows, w_out=w_out, zx=s.x_zero, img_in=img_in, plane=plane,
            pack_items=min(items, 4 * threads) if threads > 1 else 1,
            by_rows=int(threads > 1 and ntiles < 8 * threads),
            row_parts=min(self.out_channels, 2 * threads), threads=threads, chunk=chunk)
        if self.residual is not None:
            call.set_residual(*self.residual)
        need = 64 if chunk else n * img_in * 4 + _SLACK_WORDS * 4  # fused items pack into their own scratch
        return call, (n, self.out_channels, h_out, w_out), need

    def _one_call(self, x: torch.Tensor, n: int, h: int, w: int, threads: int,
                  res: torch.Tensor | None) -> torch.Tensor:
        """Pack + multiply in one C call on the extension's pool (`swat_native.int8.QLayerCall`):
        two numba parallel regions per layer cost more than a batch-1 layer's arithmetic. The
        per-call Python is kept to a few attribute sets (each us here is 1 % of a batch-1 run)."""
        from swat_native import int8 as native

        key = (threading.get_ident(), n, h, w, threads)  # the struct's pointers are per calling thread
        hit = self._calls.get(key)
        if hit is None:
            hit = self._calls[key] = self.layer_call(n, h, w, threads)
        call, shape, need = hit
        if not x.is_contiguous():
            x = x.contiguous()
        buf = getattr(self._scratch, "one", None)
        if buf is None or buf[0].size < need:
            xp = self._packed(need)
            buf = self._scratch.one = (xp, xp.ctypes.data)
        y = torch.from_numpy(np.empty(shape, np.uint8))  # torch.empty costs 3x more here
        rp = 0
        if res is not None:
            if tuple(res.shape) != shape:
                raise ValueError(f"residual {tuple(res.shape)} does not match the conv output {shape}")
            res = res.contiguous()
            rp = res.data_ptr()
        call.run(x.data_ptr(), buf[1], y.data_ptr(), native.isa_code(self.isa), rp)
        return y


def fused_chunk(n: int, plane: int, threads: int) -> int:
    """Images per fused pack + multiply item of the one-call layer (0: pack the whole batch, then
    multiply). Why: packed per chunk, a chunk's input is multiplied while it is in L2 instead of
    the whole batch's packed copies going to memory and back (see int8_layer.c q_fused_item).
    A chunk holds at least one full group of 8 tiles (the multiply's register block); fused only
    when there are at least 2 chunks per thread, so batch 1 keeps its split over rows."""
    if _FUSED == 0:
        return 0
    tpi = -(-plane // 16)
    chunk = max(1, -(-8 // tpi))
    if _FUSED is None and n < 2 * chunk * max(1, threads):
        return 0
    return min(chunk, n)


# SWAT_INT8_FUSED=0 / 1: never / always pack per chunk of images (default: by fused_chunk's rule)
_FUSED = {"0": 0, "off": 0, "false": 0, "1": 1, "on": 1, "true": 1}.get(
    os.environ.get("SWAT_INT8_FUSED", "").strip().lower())

# SWAT_INT8_LAYER_CALL=0: the two numba calls per layer (pack, multiply) instead of one C call
_LAYER_CALL = os.environ.get("SWAT_INT8_LAYER_CALL", "1").strip().lower() not in ("0", "off", "false")


def reference_qconv(x: np.ndarray, weight: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None,
                    spec: QConvSpec) -> np.ndarray:
    """The exact QLinearConv result (int64 sums, float32 requantisation), for tests and checks."""
    xi = torch.from_numpy(np.asarray(x, np.float64) - spec.x_zero)
    wi = torch.from_numpy(np.asarray(weight, np.float64))
    pt, pl, pb, pr = spec.padding
    xi = torch.nn.functional.pad(xi, (pl, pr, pt, pb))
    acc = torch.nn.functional.conv2d(xi, wi, stride=spec.stride).numpy()
    if bias is not None:
        acc = acc + np.asarray(bias, np.float64).reshape(1, -1, 1, 1)
    mult = requant_multipliers(spec.x_scale, w_scale if np.size(w_scale) > 1 else
                               np.full(weight.shape[0], np.asarray(w_scale).reshape(-1)[0]), spec.y_scale)
    f = acc.astype(np.float32) * mult.reshape(1, -1, 1, 1)
    lo = spec.y_zero if spec.relu else 0
    f = np.clip(f, np.float32(lo - spec.y_zero), np.float32(255 - spec.y_zero))
    return (np.rint(f).astype(np.int32) + spec.y_zero).astype(np.uint8)


def reference_qadd(y: np.ndarray, res: np.ndarray, ra: float, rb: float, c: float, lo: int) -> np.ndarray:
    """onnxruntime's QLinearAdd on uint8 arrays (float32, round half to even), for tests."""
    v = (y.astype(np.float32) * np.float32(ra) + res.astype(np.float32) * np.float32(rb)) + np.float32(c)
    return np.rint(np.clip(v, np.float32(lo), np.float32(255))).astype(np.uint8)

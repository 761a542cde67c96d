"""The compiled kernels on every ISA this CPU runs (forced with SWAT_ISA), with and without blocks.

An ISA this CPU lacks cannot run here (e.g. AVX-512 on an AVX2-only EPYC); its loops are still
checked for their vector width in the assembly (test_each_isa_path_uses_its_vector_width)."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import swat_native as native
from swat_deploy.kernels import detect_block, make_conv2d, make_linear

pytestmark = pytest.mark.skipif(not native.available(), reason="compiled kernels not built (pip install -e .)")

ISAS = list(native.cpu_isas())


@pytest.fixture(autouse=True)
def _no_autotune(tmp_path, monkeypatch):  # noqa: ANN001, ANN202
    monkeypatch.setenv("SWAT_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")


def _block_sparse(shape: tuple[int, ...], sparsity: float, block: int, seed: int) -> torch.Tensor:
    """Random weight whose zero pattern is shared by every `block` consecutive output channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    o = shape[0]
    keep = torch.rand((o // block, 1) + tuple(shape[1:]), generator=g) >= sparsity
    return w * keep.expand(o // block, block, *shape[1:]).reshape(shape)


# (O, I/g, kh, kw, stride, padding, dilation, groups, N, H, W)
CASES = [
    (32, 8, 3, 3, 1, 1, 1, 1, 1, 9, 9),
    (32, 8, 3, 3, 2, 1, 1, 1, 3, 11, 7),      # stride 2, odd sizes
    (32, 16, 3, 3, 1, 2, 2, 1, 2, 10, 10),    # dilation 2
    (32, 4, 3, 3, 1, 1, 1, 2, 2, 8, 8),       # groups 2 (16 outputs per group)
    (16, 1, 3, 3, 1, 1, 1, 16, 2, 8, 8),      # depthwise (block 1 only)
    (32, 16, 1, 1, 1, 0, 1, 1, 5, 6, 6),      # 1x1
    (32, 16, 1, 1, 2, 0, 1, 1, 1, 7, 7),      # 1x1 stride 2
    (16, 8, 3, 3, 1, 1, 1, 1, 64, 4, 4),      # batch 64 on a 4x4 map
    (48, 8, 5, 5, 2, 2, 1, 1, 1, 13, 13),     # 5x5, stride 2
    (32, 16, 1, 1, 1, 0, 1, 1, 1, 8, 8),      # 1x1 read in place (plane of whole vectors)
    (16, 16, 1, 1, 1, 0, 1, 1, 2, 64, 64),    # the same, two large images (one per chunk)
    (16, 16, 3, 3, 1, 1, 1, 1, 2, 64, 64),    # two large images, shifted copies / padded pitch
    (16, 16, 3, 3, 2, 1, 1, 1, 2, 63, 61),    # two large odd images, stride 2
    (32, 8, 3, 3, 2, 1, 1, 1, 2, 34, 34),     # stride 2 on an even map: the vector phase split
    (32, 64, 3, 3, 1, 1, 1, 1, 1, 4, 4),      # batch 1, one-vector plane, long rows: partial sums
    (24, 1, 3, 3, 2, 1, 1, 24, 1, 16, 16),    # depthwise, stride 2 on an even map (MobileNet)
    (32, 16, 3, 3, 1, 1, 1, 1, 3, 16, 16),    # 1 KB planes: read at a padded channel stride
    (16, 16, 3, 3, 2, 1, 1, 1, 2, 32, 32),    # stride phases of 4 KB per channel: padded too
    (16, 1, 3, 3, 2, 1, 1, 16, 3, 10, 10),    # the same, 3 images (stride phases per row and image)
    (32, 8, 3, 3, 1, 1, 1, 4, 3, 12, 12),     # groups 4, blocks inside a group
    (96, 16, 1, 1, 1, 0, 1, 1, 1, 40, 40),    # narrow 1x1 on a large map: runs of tiles per row
    (32, 64, 1, 1, 2, 0, 1, 1, 3, 32, 32),    # 1x1 stride 2 (ResNet's shortcut): phase (0, 0) copied alone
    (48, 24, 1, 1, 2, 0, 1, 1, 1, 15, 16),    # the same, batch 1 (copy split by channels), odd height
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_matches_torch_on_every_isa_and_block(isa: str, block: int, case: tuple, monkeypatch) -> None:  # noqa: ANN001
    o, ig, kh, kw, st, pad, dil, groups, n, h, w = case
    if (o // groups) % block:
        pytest.skip("block does not divide the outputs per group")
    monkeypatch.setenv("SWAT_ISA", isa)
    wt = _block_sparse((o, ig, kh, kw), 0.7, block, seed=o + block)
    b = torch.randn(o)
    x = torch.randn(n, ig * groups, h, w)
    for kernel in ("csr_direct", "csr_im2col"):
        op = make_conv2d(wt, b, st, pad, dil, groups, kernel=kernel, block=block)
        assert op.spec.block == block
        ref = F.conv2d(x, wt, b, st, pad, dil, groups)
        torch.testing.assert_close(op(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 2])  # one image: output written by the kernel itself; two: unpack pass
@pytest.mark.parametrize("kernel", ["csr_direct", "csr_im2col"])
def test_fused_residual_relu_and_nan_on_every_isa(isa: str, n: int, kernel: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SWAT_ISA", isa)
    wt = _block_sparse((16, 16, 3, 3), 0.8, 4, seed=1)
    x = torch.randn(n, 16, 9, 7)
    x[0, 3, 4, 4] = float("nan")
    res = torch.randn(n, 16, 9, 7)
    op = make_conv2d(wt, None, 1, 1, kernel=kernel)
    assert op.spec.block == 4
    got = op.fused(x, res, True)
    # A NaN reaches exactly the outputs that a non-zero weight connects it to (a pruned weight
    # is absent, not a zero that multiplies it), and ReLU keeps it, as torch.relu does.
    reach = F.conv2d(torch.isnan(x).float(), (wt != 0).float(), None, 1, 1) > 0
    assert reach.any()
    assert torch.equal(torch.isnan(got), reach)
    ref = torch.relu(F.conv2d(torch.nan_to_num(x), wt, None, 1, 1) + res)
    torch.testing.assert_close(got[~reach], ref[~reach], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 3, 17, 64])
def test_linear_matches_torch_on_every_isa(isa: str, n: int, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SWAT_ISA", isa)
    wt = _block_sparse((40, 33), 0.8, 1, seed=n)
    b = torch.randn(40)
    x = torch.randn(n, 33)
    op = make_linear(wt, b, kernel="csr_rows")
    torch.testing.assert_close(op(x), F.linear(x, wt, b), rtol=1e-4, atol=1e-4)


def test_parallel_split_matches_serial(monkeypatch) -> None:  # noqa: ANN001
    wt = _block_sparse((64, 32, 3, 3), 0.9, 4, seed=3)
    x = torch.randn(4, 32, 16, 16)
    ref = F.conv2d(x, wt, None, 1, 1)
    for threads in (1, 2):
        op = make_conv2d(wt, None, 1, 1, kernel="csr_direct", threads=threads)
        torch.testing.assert_close(op(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("case", [c for c in CASES if c[8] <= 3], ids=lambda c: "x".join(map(str, c)))
def test_one_call_layer_on_two_threads_matches_torch(block: int, case: tuple, monkeypatch) -> None:  # noqa: ANN001
    """The one-call layer (swat_native.layer, on by default) on its own two-thread pool, with the
    fused residual + ReLU, against torch and against the step-by-step path (SWAT_LAYER_CALL=0)."""
    from swat_deploy.kernels import _numba_common as nc
    import swat_native.layer as native_layer

    o, ig, kh, kw, st, pad, dil, groups, n, h, w = case
    if (o // groups) % block:
        pytest.skip("block does not divide the outputs per group")
    monkeypatch.setattr(nc, "PARALLEL_MIN_WORK", 0)  # two threads even on these small layers
    wt = _block_sparse((o, ig, kh, kw), 0.7, block, seed=o * block + n)
    b = torch.randn(o)
    x = torch.randn(n, ig * groups, h, w)
    ref = F.conv2d(x, wt, b, st, pad, dil, groups)
    res = torch.randn(ref.shape)
    want = torch.relu(ref + res)
    got = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("SWAT_LAYER_CALL", flag)
        op = make_conv2d(wt, b, st, pad, dil, groups, kernel="csr_direct", block=block, threads=2)
        got[flag] = (op(x), op.fused(x, res, True))
        calls = [c for c in op.prepared._calls.values() if c is not None]
        # n == 1 always fits one of the one-call layouts; the flag decides whether it is used
        if n == 1:
            assert bool(calls) == (flag == "1")
        else:  # several images: per-image items, each packed into its thread's own buffer
            assert all(c.args.per_image == 1 for c in calls)
    for plain, fused in got.values():
        torch.testing.assert_close(plain, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-4)
    if n == 1:
        assert native_layer.pool_started() >= 1  # the second thread came from the extension's pool


def test_detect_block() -> None:
    assert detect_block(_block_sparse((32, 8, 3, 3), 0.8, 8, seed=0)) == 8
    assert detect_block(_block_sparse((32, 8, 3, 3), 0.8, 16, seed=0)) == 16
    assert detect_block(_block_sparse((32, 8, 3, 3), 0.8, 1, seed=0)) == 1
    assert detect_block(torch.randn(32, 8, 3, 3)) == 1  # dense: nothing to share
    assert detect_block(_block_sparse((12, 8, 3, 3), 0.8, 4, seed=0)) == 4
    # a value that is exactly 0.0 inside a kept block does not cost the layer its blocks
    w = _block_sparse((64, 32, 3, 3), 0.8, 4, seed=2)
    w.view(-1)[torch.nonzero(w.view(-1))[:3, 0]] = 0.0
    assert detect_block(w) == 4
    # blocks may not straddle groups: 6 outputs per group only admit 2
    assert detect_block(_block_sparse((12, 4, 3, 3), 0.8, 2, seed=0), groups=2) == 2


def test_bad_isa_request_is_one_clear_error(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SWAT_ISA", "sse9")
    with pytest.raises(ValueError, match="SWAT_ISA"):
        native.isa()


def test_bad_block_request() -> None:
    with pytest.raises(ValueError, match="block"):
        make_conv2d(torch.randn(12, 4, 3, 3), block=8)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_each_isa_path_uses_its_vector_width() -> None:
    """The AVX-512 loops hold their tiles in zmm registers, the AVX2 ones in ymm: the shift
    kernel's drivers, the lane-masked direct conv's (tci_ / tci2_) and the padded-gradient
    weight-gradient loops (ws16_ / ws8_, w2_16_ / w2_8_)."""
    lib = native._find_library()
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(lib)], capture_output=True, text=True,
                         check=True).stdout
    funcs: dict[str, str] = {}
    name = None
    for line in asm.splitlines():
        if line.endswith(">:"):
            name = line.split("<", 1)[1][:-2]
            funcs[name] = ""
        elif name:
            funcs[name] += line + "\n"
    families = [("drive_16_", "drive_8_"), ("tci_", "tci2_"), ("ws16_", "ws8_"), ("w2_16_", "w2_8_")]
    avx512 = [f for wide, _ in families for f in funcs if f.startswith(wide)]
    avx2 = [f for _, narrow in families for f in funcs if f.startswith(narrow)]
    for wide, narrow in families:
        assert any(f.startswith(wide) for f in funcs) and any(f.startswith(narrow) for f in funcs), (wide, narrow)
    for f in avx512:
        assert "vfmadd231ps" in funcs[f] and "%zmm" in funcs[f], f
    for f in avx2:
        assert "vfmadd231ps" in funcs[f] and "%ymm" in funcs[f] and "%zmm" not in funcs[f], f


def test_compiled_loop_direct_call_matches_numpy() -> None:
    """The C entry point itself on every ISA: block rows x shifted rows, with a bias."""
    rng = np.random.default_rng(0)
    rows, blk, run, chunk = 5, 4, 48, 400
    indptr = np.array([0, 3, 3, 7, 8, 12], np.int32)
    offs = rng.integers(0, chunk - run, indptr[-1]).astype(np.int32)
    vals = rng.standard_normal(indptr[-1] * blk).astype(np.float32)
    bias = rng.standard_normal(rows * blk).astype(np.float32)
    x = rng.standard_normal(chunk).astype(np.float32)
    ref = np.repeat(bias[:, None], run, axis=1).astype(np.float64)
    for r in range(rows):
        for k in range(indptr[r], indptr[r + 1]):
            for j in range(blk):
                ref[r * blk + j] += vals[k * blk + j] * x[offs[k]:offs[k] + run]
    for isa in ISAS:
        out = np.full(rows * blk * run, np.nan, np.float32)
        ntg, tg, nrg = native.split(run, 1, rows, 1)
        native.shift_rows(False)(native.isa_code(isa), indptr, offs, vals, bias, x, chunk, out, run, 1, blk,
                                 ntg, tg, nrg)
        np.testing.assert_allclose(out.reshape(rows * blk, run), ref, rtol=1e-5, atol=1e-5)


def test_without_the_compiled_kernels_the_numba_loops_give_the_same_result(monkeypatch) -> None:  # noqa: ANN001
    """A build without the extension (no C compiler) still runs unstructured layers, on numba."""
    wt = _block_sparse((16, 8, 3, 3), 0.8, 1, seed=5)
    x = torch.randn(3, 8, 9, 9)
    monkeypatch.setattr(native, "available", lambda: False)
    for kernel in ("csr_direct", "csr_im2col"):
        op = make_conv2d(wt, None, 2, 1, kernel=kernel)
        torch.testing.assert_close(op(x), F.conv2d(x, wt, None, 2, 1), rtol=1e-4, atol=1e-4)
    lin = make_linear(wt.reshape(16, -1), None, kernel="csr_rows")
    xl = torch.randn(5, 72)
    torch.testing.assert_close(lin(xl), F.linear(xl, wt.reshape(16, -1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 100, 1003, 40001])
def test_bitmask_passes_match_the_numba_loops_on_every_isa(isa: str, n: int) -> None:
    """ReLU + bits, masking, threshold -> bits, compact <-> dense: bit-identical to the numba
    reference, NaN / -0.0 / inf included, at lengths that end mid-byte and mid-vector."""
    from swat_native import bits as B
    from training import _swat_kernels as K

    code = native.isa_code(isa)
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    for v in (np.nan, 0.0, -0.0, np.inf, -np.inf):
        x[rng.integers(0, n, max(1, n // 40))] = v
    nb = (n + 7) // 8
    y_ref, b_ref = np.empty_like(x), np.zeros(nb, np.uint8)
    c_ref = K.relu_pack(x, y_ref, b_ref)
    y, b = np.empty_like(x), np.zeros(nb, np.uint8)
    assert B.relu_pack(code, x, y, b) == c_ref
    assert np.array_equal(b, b_ref) and np.array_equal(y.view(np.uint32), y_ref.view(np.uint32))
    xi = x.copy()  # in place, as SwatReLU(inplace=True) calls it
    B.relu_pack(code, xi, xi, b)
    assert np.array_equal(xi.view(np.uint32), y_ref.view(np.uint32))

    g_ref, g = np.empty(n, np.uint32), np.empty(n, np.uint32)
    K.mask_select(x.view(np.uint32), b_ref, g_ref)
    B.mask_select(code, x.view(np.uint32), b_ref, g)
    assert np.array_equal(g, g_ref)

    thr = np.abs(rng.standard_normal(5)).astype(np.float32)
    for inner, period in ((n, 1), (3, 5), (9, 2), (64, 5), (1000, 3)):
        p_ref, p = np.zeros(nb, np.uint8), np.zeros(nb, np.uint8)
        assert B.pack_gt(code, x, thr[:period], inner, period, p) == K.pack_gt(x, thr[:period], inner, period, p_ref)
        assert np.array_equal(p, p_ref), (inner, period)

    v_ref, v = np.zeros(n + 1, np.float32), np.full(n + 16, 7.0, np.float32)
    count = K.gather(x, b_ref, v_ref)
    assert B.gather(code, x, b_ref, v) == count
    assert np.array_equal(v[:count].view(np.uint32), v_ref[:count].view(np.uint32))
    assert (v[count + 7:] == 7.0).all()  # at most 7 spare slots written past the values
    d_ref, d = np.empty(n, np.float32), np.empty(n, np.float32)
    K.expand(b_ref, v_ref, d_ref)
    B.expand(code, b_ref, v[:count].copy(), d)  # no spare slot needed
    assert np.array_equal(d.view(np.uint32), d_ref.view(np.uint32))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(2, 16, 32, 32, 1, 1), (3, 32, 7, 7, 2, 1), (2, 64, 8, 8, 1, 1),
                                   (2, 16, 5, 3, 0, 0), (1, 48, 1, 1, 1, 2), (2, 24, 6, 6, 1, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_padded_nhwc_copy_matches_numpy_on_every_isa(isa: str, shape: tuple) -> None:
    """The weight gradient's zero-padded NHWC copy of the output gradient (a register transpose
    on AVX-512 for 16-channel groups, AVX2 for 8, a plain loop otherwise), with plane sizes that end mid-tile."""
    from swat_native import train as native_train

    n, c, h, w, top, left = shape
    hp, wp = h + top + 2, w + left + 1
    x = np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32)
    want = np.zeros((n, hp, wp, c), np.float32)
    want[:, top:top + h, left:left + w, :] = x.transpose(0, 2, 3, 1)
    for parts in (1, 2):
        got = native_train.to_nhwc_padded(native.isa_code(isa), x, top, left, hp, wp, parts)
        np.testing.assert_array_equal(got, want)


def _masked_direct_applies(case: tuple) -> bool:
    from swat_deploy.kernels.base import LayerSpec
    from swat_deploy.kernels.masked_direct import MaskedDirectKernel

    o, ig, kh, kw, st, pad, dil, groups, n, h, w = case
    spec = LayerSpec("conv2d", (o, ig, kh, kw), (st, st), (pad,) * 4, (dil, dil), groups, True, 0.7, (n, ig * groups, h, w))
    return MaskedDirectKernel().supports(spec)


def _vector_isa(monkeypatch, isa: str) -> None:  # noqa: ANN001
    """Run on `isa` (SWAT_ISA), or skip where this CPU lacks it."""
    if isa not in ISAS:
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("SWAT_ISA", isa)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("block", [1, 2, 4, 16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_masked_direct_matches_torch(monkeypatch, isa: str, threads: int, block: int, case: tuple) -> None:  # noqa: ANN001
    """The lane-masked direct kernel (no packed input) on every case it takes, with the fused
    residual + ReLU, batch 1 split by rows over two threads and larger batches by images; on each
    vector ISA this CPU runs (AVX2 forced on an AVX-512 machine)."""
    _vector_isa(monkeypatch, isa)
    o, ig, kh, kw, st, pad, dil, groups, n, h, w = case
    if (o // groups) % block:
        pytest.skip("block does not divide the outputs per group")
    if not _masked_direct_applies(case):
        pytest.skip("not a layer the kernel takes (groups, or a stride-1 conv that changes the map size)")
    wt = _block_sparse((o, ig, kh, kw), 0.7, block, seed=o + block)
    b = torch.randn(o)
    x = torch.randn(n, ig * groups, h, w)
    op = make_conv2d(wt, b, st, pad, dil, groups, kernel="masked_direct", block=block, threads=threads)
    ref = F.conv2d(x, wt, b, st, pad, dil, groups)
    torch.testing.assert_close(op(x), ref, rtol=1e-4, atol=1e-4)
    res = torch.randn_like(ref)
    torch.testing.assert_close(op.fused(x, res, True), torch.relu(ref + res), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_masked_direct_nan_reaches_what_a_kept_weight_connects(monkeypatch, isa: str) -> None:  # noqa: ANN001
    _vector_isa(monkeypatch, isa)
    wt = _block_sparse((16, 16, 3, 3), 0.8, 4, seed=1)
    x = torch.randn(1, 16, 9, 7)
    x[0, 3, 0, 4] = float("nan")  # on the border: the lane masks must not hide it
    res = torch.randn(1, 16, 9, 7)
    op = make_conv2d(wt, None, 1, 1, kernel="masked_direct", threads=2)
    got = op.fused(x, res, True)
    reach = F.conv2d(torch.isnan(x).float(), (wt != 0).float(), None, 1, 1) > 0
    assert reach.any()
    assert torch.equal(torch.isnan(got), reach)
    ref = torch.relu(F.conv2d(torch.nan_to_num(x), wt, None, 1, 1) + res)
    torch.testing.assert_close(got[~reach], ref[~reach], rtol=1e-4, atol=1e-4)


def test_masked_direct_is_offered_only_where_it_runs(monkeypatch) -> None:  # noqa: ANN001
    """AVX2 and AVX-512 only: forced down to portable C the registry does not offer it (the
    autotuner then never times it), and asking for it by name is one clear error."""
    from swat_deploy.kernels.base import LayerSpec
    from swat_deploy.kernels.masked_direct import MaskedDirectKernel

    spec = LayerSpec("conv2d", (16, 16, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, False, 0.9, (1, 16, 8, 8))
    monkeypatch.setenv("SWAT_ISA", "generic")
    assert not MaskedDirectKernel().supports(spec)
    with pytest.raises(ValueError, match="masked_direct"):
        make_conv2d(torch.randn(16, 16, 3, 3), None, 1, 1, kernel="masked_direct")
    monkeypatch.delenv("SWAT_ISA")
    if native.isa() in ("avx2", "avx512"):  # grouped and depthwise convs are block-diagonal weights
        assert MaskedDirectKernel().supports(LayerSpec("conv2d", (16, 4, 3, 3), groups=4, padding=(1, 1, 1, 1)))
        assert MaskedDirectKernel().supports(LayerSpec("conv2d", (16, 1, 3, 3), groups=16, padding=(1, 1, 1, 1)))


@pytest.mark.parametrize("kernel", ["csr_direct", "masked_direct"])
def test_one_layer_run_from_two_python_threads_at_once(kernel: str) -> None:
    """The compiled layer calls release the GIL: two Python threads running the same layer on
    different inputs each get their own result (the per-call pointers are per thread)."""
    import threading

    if kernel == "masked_direct" and "avx2" not in ISAS:
        pytest.skip("the lane-masked direct kernel needs AVX2 or AVX-512")
    wt = _block_sparse((64, 64, 3, 3), 0.9, 1, seed=3)
    op = make_conv2d(wt, None, 1, 1, kernel=kernel, threads=1)
    xs = [torch.randn(1, 64, 16, 16) for _ in range(2)]
    want = [F.conv2d(x, wt, None, 1, 1) for x in xs]
    wrong = []

    def work(i: int) -> None:
        for _ in range(300):
            if not torch.allclose(op(xs[i]), want[i], rtol=1e-4, atol=1e-4):
                wrong.append(i)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


@pytest.mark.skipif("avx2" not in ISAS, reason="the lane-masked direct kernel needs AVX2 or AVX-512")
def test_masked_direct_runs_any_input_size() -> None:
    """An op built for one input size runs others too; sizes whose taps leave the stride phases
    go to the packed direct kernel."""
    wt = _block_sparse((16, 8, 3, 3), 0.7, 1, seed=5)
    op = make_conv2d(wt, None, 2, 1, kernel="masked_direct", input_shape=(1, 8, 8, 8))
    for shape in [(1, 8, 8, 8), (3, 8, 8, 8), (2, 8, 5, 9), (1, 8, 1, 1), (1, 8, 8, 8)]:
        x = torch.randn(shape)
        torch.testing.assert_close(op(x), F.conv2d(x, wt, None, 2, 1), rtol=1e-4, atol=1e-4)


def test_openmp_spin_is_shortened_before_torch_loads_unless_the_user_set_it() -> None:
    import os
    import subprocess
    import sys

    # sys.modules keeps import order: swat_native must have set the value before torch loaded
    code = ("import training, os, sys; m = list(sys.modules); "
            "assert m.index('swat_native') < m.index('torch'), 'torch first'; print(os.environ['GOMP_SPINCOUNT'])")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "10000"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "GOMP_SPINCOUNT": "7"}, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "7"


@pytest.mark.parametrize("shape", [(2, 3, 34, 34, 2, 2, 17, 17), (1, 2, 32, 16, 2, 2, 16, 8), (1, 2, 9, 11, 2, 2, 5, 6),
                                   (1, 2, 8, 8, 2, 2, 5, 5), (1, 2, 9, 9, 3, 3, 3, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_stride_phases_match_numpy(shape: tuple) -> None:
    """The strided direct conv's input split into stride phases, zeros past the map; stride 2 on
    an even width takes a vector path, the rest the scalar loop."""
    from swat_native import train as native_train

    n, c, h, w, sh, sw, ho, wo = shape
    x = np.random.default_rng(1).standard_normal((n, c, h, w)).astype(np.float32)
    want = np.zeros((n, c, sh, sw, ho, wo), np.float32)
    for ri in range(sh):
        for rj in range(sw):
            part = x[:, :, ri::sh, rj::sw][:, :, :ho, :wo]
            want[:, :, ri, rj, :part.shape[2], :part.shape[3]] = part
    np.testing.assert_array_equal(native_train.tconv_phases(x, sh, sw, ho, wo), want)
    # with a channel stride one cache line longer (tconv_cstride), on one and two threads
    size = sh * sw * ho * wo
    for parts in (1, 2):
        padded = native_train.tconv_phases(x, sh, sw, ho, wo, parts, cs=size + 16)
        assert padded.shape == (n, c, size + 16)
        np.testing.assert_array_equal(padded[:, :, :size].reshape(want.shape), want)


def test_channel_stride_gets_a_cache_line_only_where_planes_alias() -> None:
    """Channel planes 1 KB apart or a multiple of it (32 x 32, 16 x 16 maps) share L1 sets;
    the direct kernel reads them one cache line apart instead, and the copy keeps every value."""
    from swat_native import train as native_train

    assert native_train.tconv_cstride(1024) == 1040 and native_train.tconv_cstride(256) == 272
    assert native_train.tconv_cstride(4 * 256) == 1040  # 16 x 16 stride phases of a 32 x 32 map
    for plain in (64, 49, 196, 784, 3136, 300):  # 8 x 8, 7 x 7, 14 x 14, 28 x 28, 56 x 56: no alias
        assert native_train.tconv_cstride(plain) == plain
    x = np.random.default_rng(2).standard_normal((3, 5, 16, 16)).astype(np.float32)
    for parts in (1, 2):
        out = native_train.tconv_restride(x, 272, parts)
        assert out.shape == (3, 5, 272)
        np.testing.assert_array_equal(out[:, :, :256].reshape(x.shape), x)
    with pytest.raises(ValueError, match="channel stride"):
        native_train.tconv_restride(x, 255)


@pytest.mark.skipif(not {"avx2", "avx512"} & set(native.cpu_isas()), reason="no vector ISA for masked_direct")
def test_masked_direct_pads_the_channel_stride_for_batches_and_stride_phases() -> None:
    """One image is read in place (the copy would cost what it saves); several images, and the
    stride phases a strided conv copies anyway, are read one cache line apart per channel."""
    torch.manual_seed(0)
    w = torch.randn(32, 16, 3, 3) * (torch.rand(32, 16, 3, 3) < 0.2)
    op = make_conv2d(w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, input_shape=(4, 16, 16, 16), kernel="masked_direct")
    assert op.prepared._call_for(16, 16).args.cs == 256
    assert op.prepared._call_for(16, 16, True).args.cs == 272
    # SWAT_AUTOTUNE=0 (conftest): a batch takes the padded stride untimed; one image never does
    assert op.prepared._pick_call(torch.zeros(4, 16, 16, 16)).args.cs == 272
    assert op.prepared._pick_call(torch.zeros(1, 16, 16, 16)).args.cs == 256
    s2 = make_conv2d(w, None, (2, 2), (1, 1, 1, 1), (1, 1), 1, input_shape=(1, 16, 32, 32), kernel="masked_direct")
    assert s2.prepared._call_for(32, 32).args.cs == 4 * 256 + 16
    for n in (1, 4):
        x = torch.randn(n, 16, 16, 16)
        torch.testing.assert_close(op(x), torch.nn.functional.conv2d(x, w, None, 1, 1), rtol=1e-4, atol=1e-4)


def test_strided_1x1_copies_only_the_phase_it_reads() -> None:
    """A 1x1 stride-2 conv without padding reads phase (0, 0) only: its scratch holds that phase
    (a quarter of the input, at the padded stride), where a strided 3x3 copies all four."""
    torch.manual_seed(1)
    w1 = torch.randn(32, 64, 1, 1) * (torch.rand(32, 64, 1, 1) < 0.2)
    op = make_conv2d(w1, None, (2, 2), (0, 0, 0, 0), (1, 1), 1, kernel="masked_direct")
    call = op.prepared._call_for(64, 64)
    assert (call.args.dw, call.args.cs) == (2, 32 * 32 + 16)
    assert call.scratch_floats(2) == 2 * 64 * (32 * 32 + 16)
    w3 = torch.randn(32, 64, 3, 3) * (torch.rand(32, 64, 3, 3) < 0.2)
    op3 = make_conv2d(w3, None, (2, 2), (1, 1, 1, 1), (1, 1), 1, kernel="masked_direct")
    assert op3.prepared._call_for(64, 64).args.dw == 0
    for n in (1, 2):
        x = torch.randn(n, 64, 64, 64)
        torch.testing.assert_close(op(x), torch.nn.functional.conv2d(x, w1, None, 2), rtol=1e-4, atol=1e-4)


def test_layout_choice_times_both_ways_once_and_keeps_the_faster(monkeypatch) -> None:  # noqa: ANN001
    """The padded-stride copy is taken only where it was timed faster (by the margin), once per key."""
    import time

    from swat_native import layout_choice

    monkeypatch.setenv("SWAT_AUTOTUNE", "1")
    layout_choice.forget()
    calls = {"in_place": 0, "padded": 0}

    def way(name: str, seconds: float):  # noqa: ANN202
        def run() -> None:
            calls[name] += 1
            time.sleep(seconds)
        return run

    assert not layout_choice.padded_wins("slow copy", way("in_place", 0.0), way("padded", 0.01))
    assert calls == {"in_place": 1 + layout_choice.ROUNDS, "padded": 1 + layout_choice.ROUNDS}
    assert not layout_choice.padded_wins("slow copy", way("in_place", 0.0), way("padded", 0.0))  # remembered
    assert calls["padded"] == 1 + layout_choice.ROUNDS
    assert layout_choice.padded_wins("fast copy", way("in_place", 0.01), way("padded", 0.0))
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")
    assert layout_choice.padded_wins("untimed", way("in_place", 0.0), way("padded", 0.01))
    layout_choice.forget()


def test_masked_direct_runs_on_the_thread_count_its_op_was_given(monkeypatch) -> None:  # noqa: ANN001
    """An Op built for one thread (or capped to one by a one-thread Session plan) runs the
    extension's pool on one thread: it once took numba's count (2) whatever the Op said, so a
    one-thread plan was timed and run on two."""
    if not ({"avx2", "avx512"} & set(ISAS)):
        pytest.skip("masked_direct needs AVX2 or AVX-512")
    from swat_deploy.threads import torch_thread_cap
    from swat_native import direct_layer

    seen: list[int] = []
    real = direct_layer.DirectLayerCall.__call__

    def spy(self, x, y, n, res, relu, phases, isa, threads):  # noqa: ANN001, ANN202
        seen.append(threads)
        return real(self, x, y, n, res, relu, phases, isa, threads)

    monkeypatch.setattr(direct_layer.DirectLayerCall, "__call__", spy)
    wt = _block_sparse((16, 16, 3, 3), 0.8, 1, seed=3)
    x = torch.randn(1, 16, 8, 8)
    ref = F.conv2d(x, wt, None, 1, 1)
    one = make_conv2d(wt, None, 1, 1, kernel="masked_direct", threads=1)
    two = make_conv2d(wt, None, 1, 1, kernel="masked_direct", threads=2)
    torch.testing.assert_close(one(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(two(x), ref, rtol=1e-4, atol=1e-4)
    with torch_thread_cap(1):
        two(x)
    assert seen == [1, 2, 1]


@pytest.mark.parametrize("case", [(64, 112, 112, 3, 2, 1, 1), (5, 13, 11, 3, 2, 1, 1), (3, 9, 10, 2, 2, 0, 1),
                                  (4, 17, 15, 3, 3, 1, 2), (2, 8, 8, 5, 1, 2, 1), (3, 7, 9, 3, 1, 1, 1),
                                  (2, 40, 37, 3, 2, 0, 1)],
                         ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_maxpool_matches_torch_and_keeps_nan(case: tuple, threads: int) -> None:
    """The Session's MaxPool (csrc/pool_f32.c): vector rows, stride phases and scalar borders
    against torch, with a NaN (propagates to every window holding it) and infinities."""
    from swat_native import pool

    c, h, w, k, s, p, d = case
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(h * w))
    x[0, 0, 3, 4] = float("nan")
    x[1, -1, 0, 0] = float("inf")
    x[1, 0, h - 1, w - 1] = float("-inf")
    oh, ow = (h + 2 * p - d * (k - 1) - 1) // s + 1, (w + 2 * p - d * (k - 1) - 1) // s + 1
    got = pool.maxpool2d(x, [k, k], [s, s], [d, d], [p, p], [oh, ow], threads)
    want = F.max_pool2d(x, k, s, p, d)
    assert got is not None and got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


@pytest.mark.parametrize("h,w", [(1, 1), (3, 1), (1, 5), (5, 3)])
def test_compiled_maxpool_windows_past_the_input(h: int, w: int) -> None:
    """ceil_mode windows that hang over the input's end and maps with no window fully inside
    (an empty interior once looped forever)."""
    from swat_native import pool

    x = torch.randn(1, 3, h, w)
    want = F.max_pool2d(x, 2, 2, 0, 1, ceil_mode=True)
    got = pool.maxpool2d(x, [2, 2], [2, 2], [1, 1], [0, 0], list(want.shape[2:]), 2)
    assert got is not None and torch.equal(got, want)


@pytest.mark.parametrize("parts", [2, 3])
def test_bit_passes_split_over_threads_match_one_thread(parts: int) -> None:
    """ReLU + bitmask, threshold -> bitmask and gradient masking split over threads (training at
    2+ threads, large activations) give exactly the one-thread result, counts included."""
    from swat_native import bits as B

    code = native.isa_code()
    rng = np.random.default_rng(parts)
    n = 100_003  # ranges cut on bitmask bytes, a ragged end
    x = rng.standard_normal(n).astype(np.float32)
    x[[5, n - 2]] = np.nan
    nb = (n + 7) // 8
    y1, b1, y, b = np.empty_like(x), np.zeros(nb, np.uint8), np.empty_like(x), np.zeros(nb, np.uint8)
    assert B.relu_pack(code, x, y, b, parts) == B.relu_pack(code, x, y1, b1, 1)
    assert np.array_equal(b, b1) and np.array_equal(y.view(np.uint32), y1.view(np.uint32))
    thr = np.array([1.2, 0.8, 1.6], np.float32)
    p1, p = np.zeros(nb, np.uint8), np.zeros(nb, np.uint8)
    assert B.pack_gt(code, x, thr, 777, 3, p, parts) == B.pack_gt(code, x, thr, 777, 3, p1, 1)
    assert np.array_equal(p, p1)
    o1, o = np.empty(n, np.uint32), np.empty(n, np.uint32)
    B.mask_select(code, x.view(np.uint32), b1, o1, 1)
    B.mask_select(code, x.view(np.uint32), b1, o, parts)
    assert np.array_equal(o, o1)

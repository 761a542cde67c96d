"""Kernels against torch's dense conv2d / linear, the factory API, and the autotuner."""
from __future__ import annotations

import json
import warnings

import numba
import pytest
import torch
import torch.nn.functional as F

from swat_deploy import autotune
from swat_deploy.kernels import KERNELS, get_kernel, kernel_names, make_conv2d, make_linear
from swat_deploy.kernels.base import LayerSpec, thread_scope

# Every registered kernel gets the same checks: a new kernel file is tested by registering it.
CONV_KERNELS = [k for k in kernel_names() if get_kernel(k).supports(LayerSpec("conv2d", (4, 4, 3, 3)))]
LINEAR_KERNELS = [k for k in kernel_names() if get_kernel(k).supports(LayerSpec("linear", (4, 4)))]
# every kernel that takes grouped / depthwise convs
GROUPED_CONV_KERNELS = [k for k in kernel_names() if get_kernel(k).supports(LayerSpec("conv2d", (8, 1, 3, 3), groups=8))]


@pytest.fixture(autouse=True)
def _isolated_autotune(tmp_path, monkeypatch):  # noqa: ANN001, ANN202
    monkeypatch.setenv("SWAT_AUTOTUNE_CACHE", str(tmp_path / "autotune.json"))
    monkeypatch.delenv("SWAT_AUTOTUNE", raising=False)


def _sparse(shape: tuple[int, ...], sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w[torch.rand(shape, generator=g) < sparsity] = 0
    return w


def _ref_conv(x, w, b, stride, pad4, dilation, groups):  # noqa: ANN001, ANN202
    top, left, bottom, right = pad4
    return F.conv2d(F.pad(x, (left, right, top, bottom)), w, b, stride, 0, dilation, groups)


# (O, I/g, kh, kw, stride, padding [t, l, b, r], dilation, groups, N, H, W)
CONV_CASES = [
    (8, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1, 9, 9),
    (8, 4, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, 5, 9, 9),
    (8, 4, 3, 3, (1, 1), (2, 2, 2, 2), (2, 2), 1, 1, 10, 7),
    (6, 3, 3, 3, (2, 1), (0, 1, 2, 0), (1, 2), 2, 5, 11, 8),       # asymmetric everything, groups 2
    (8, 1, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 8, 5, 8, 8),        # depthwise
    (8, 1, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 8, 1, 7, 7),        # depthwise, stride 2, odd size
    (16, 8, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, 5, 6, 6),       # 1x1
    (16, 8, 1, 1, (2, 2), (0, 0, 0, 0), (1, 1), 1, 1, 8, 8),       # 1x1 stride 2 (downsample)
    (12, 4, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, 1, 12, 12),     # 5x5
    (12, 4, 5, 5, (2, 2), (2, 2, 2, 2), (1, 1), 1, 5, 13, 11),
    (10, 3, 3, 5, (1, 2), (1, 2, 1, 2), (1, 1), 1, 5, 9, 16),      # non-square kernel and image
    (4, 6, 3, 3, (3, 3), (0, 0, 0, 0), (1, 1), 1, 5, 10, 10),      # stride 3, no padding
    (32, 16, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, 1, 4, 4),      # deep layer on a 4x4 map
    (8, 5, 7, 7, (2, 2), (3, 3, 3, 3), (1, 1), 1, 1, 15, 15),      # stem-like 7x7
]


@pytest.mark.parametrize("kernel", sorted(set(CONV_KERNELS) | set(GROUPED_CONV_KERNELS)))
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:4])) + f"_s{c[4]}_d{c[6]}_g{c[7]}_n{c[8]}")
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_dense(kernel: str, case: tuple, bias: bool) -> None:
    o, ig, kh, kw, stride, pad, dil, groups, n, h, w = case
    spec = LayerSpec("conv2d", (o, ig, kh, kw), stride, pad, dil, groups, bias, 0.8, (n, ig * groups, h, w))
    if not get_kernel(kernel).supports(spec):  # kernels for some layers only (masked_direct)
        pytest.skip(f"{kernel} does not take this layer")
    seed = hash((case, bias)) % 1000
    weight = _sparse((o, ig, kh, kw), 0.8, seed)
    b = torch.randn(o, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    x = torch.randn(n, ig * groups, h, w, generator=torch.Generator().manual_seed(seed + 2))
    op = make_conv2d(weight, b, stride, pad, dil, groups, kernel=kernel)
    assert op.kernel_name == kernel
    y = op(x)
    torch.testing.assert_close(y, _ref_conv(x, weight, b, stride, pad, dil, groups), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", CONV_KERNELS)
@pytest.mark.parametrize("sparsity", [0.0, 0.95, 1.0])
def test_conv_extreme_sparsity(kernel: str, sparsity: float) -> None:
    weight = _sparse((16, 8, 3, 3), sparsity, 3)
    b = torch.randn(16)
    x = torch.randn(2, 8, 6, 6)
    y = make_conv2d(weight, b, 1, 1, kernel=kernel)(x)
    torch.testing.assert_close(y, F.conv2d(x, weight, b, 1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", GROUPED_CONV_KERNELS)
@pytest.mark.parametrize("n,threads", [(1, 1), (1, 2), (64, 2)])
def test_depthwise_conv_matches_torch_and_keeps_nan(kernel: str, n: int, threads: int) -> None:
    weight = torch.randn(24, 1, 3, 3)
    b = torch.randn(24)
    x = torch.randn(n, 24, 13, 13)
    x[0, 3, 5, 5] = float("nan")  # reaches the 3x3 window around it in channel 3 only
    op = make_conv2d(weight, b, 2, 1, 1, 24, kernel=kernel, threads=threads)
    y = op(x)
    want = F.conv2d(x, weight, b, 2, 1, 1, 24)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert y[0, 3].isnan().any() and not y[0, 4].isnan().any()
    torch.testing.assert_close(op(x[:1]), want[:1], rtol=1e-4, atol=1e-4, equal_nan=True)  # batch changes


def test_conv_handles_changing_input_shapes() -> None:
    weight = _sparse((8, 4, 3, 3), 0.7, 4)
    op = make_conv2d(weight, None, 2, 1, kernel="csr_direct", input_shape=(1, 4, 8, 8))
    for shape in [(1, 4, 8, 8), (3, 4, 8, 8), (2, 4, 5, 9), (1, 4, 8, 8)]:
        x = torch.randn(shape)
        torch.testing.assert_close(op(x), F.conv2d(x, weight, None, 2, 1), rtol=1e-4, atol=1e-4)


def test_conv_parallel_path_matches() -> None:
    """threads=2 on a layer big enough to take the prange builds."""
    weight = _sparse((64, 32, 3, 3), 0.5, 5)
    b = torch.randn(64)
    for n in (1, 6):
        x = torch.randn(n, 32, 16, 16)
        op = make_conv2d(weight, b, 1, 1, kernel="csr_direct", threads=2)
        torch.testing.assert_close(op(x), F.conv2d(x, weight, b, 1, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", CONV_KERNELS)
@pytest.mark.parametrize("n,threads", [(1, 1), (1, 2), (5, 1), (5, 2)])
def test_fused_residual_and_relu_match_torch(kernel: str, n: int, threads: int, monkeypatch) -> None:  # noqa: ANN001
    from swat_deploy.kernels import _numba_common

    monkeypatch.setattr(_numba_common, "PARALLEL_MIN_WORK", 1)  # threads=2 takes the prange builds
    weight = _sparse((16, 8, 3, 3), 0.8, 21)
    b = torch.randn(16)
    x = torch.randn(n, 8, 9, 21)  # rows of 21: the 16-lane vector loop and the scalar tail
    op = make_conv2d(weight, b, 1, 1, kernel=kernel, threads=threads)
    ref = F.conv2d(x, weight, b, 1, 1)
    r = torch.randn_like(ref)
    r[0, 0, 0, :2] = r[0, 0, 1, -2:] = float("nan")  # ReLU keeps NaN, as torch does
    for residual, relu in [(None, False), (None, True), (r, False), (r, True), (r[:1, :, :1], True)]:
        want = ref if residual is None else ref + residual
        want = want.relu() if relu else want
        got = op.fused(x, residual, relu)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert torch.equal(x, x.clone()) and r.isnan().sum() == 4  # inputs untouched


LINEAR_CASES = [(10, 512, 1), (10, 512, 5), (7, 33, 17), (64, 48, 1), (64, 48, 64), (3, 1, 2)]


@pytest.mark.parametrize("kernel", LINEAR_KERNELS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("threads", [None, 2])
def test_linear_matches_dense(kernel: str, case: tuple, bias: bool, threads: int | None) -> None:
    o, i, n = case
    weight = _sparse((o, i), 0.8, o * i)
    b = torch.randn(o) if bias else None
    x = torch.randn(n, i)
    op = make_linear(weight, b, kernel=kernel, threads=threads)
    torch.testing.assert_close(op(x), F.linear(x, weight, b), rtol=1e-4, atol=1e-4)


def test_linear_parallel_path_matches() -> None:
    weight = _sparse((512, 1024), 0.6, 6)
    b = torch.randn(512)
    for n in (1, 20):
        x = torch.randn(n, 1024)
        op = make_linear(weight, b, kernel="csr_rows", threads=2)
        torch.testing.assert_close(op(x), F.linear(x, weight, b), rtol=1e-4, atol=1e-4)


def test_op_attributes() -> None:
    weight = _sparse((16, 8, 3, 3), 0.9, 7)
    nnz = int((weight != 0).sum())
    op = make_conv2d(weight, None, 1, 1, kernel="csr_direct")
    assert op.kernel_name == "csr_direct"
    assert op.weight_sparsity == pytest.approx(1 - nnz / weight.numel())
    assert op.nbytes == 4 * (16 + 1) + 8 * nnz
    dense = make_conv2d(weight, None, 1, 1, kernel="dense")
    assert dense.nbytes == 4 * weight.numel()
    lin = make_linear(_sparse((10, 20), 0.5, 8), None, kernel="csr_rows")
    assert lin.kernel_name == "csr_rows" and 0.3 < lin.weight_sparsity < 0.7


def test_kernel_names_and_bad_choices() -> None:
    names = kernel_names()
    assert names[0] == "dense" and {"csr_direct", "csr_rows", "torch_csr"} <= set(names)
    w = torch.randn(4, 2, 3, 3)
    with pytest.raises(ValueError, match="choose one of: dense, .*csr_direct"):
        make_conv2d(w, None, kernel="cusparse")
    with pytest.raises(ValueError, match="does not support.*use one of"):
        make_conv2d(w, None, kernel="csr_rows")
    with pytest.raises(ValueError, match="does not support"):
        make_linear(torch.randn(4, 3), None, kernel="csr_direct")
    with pytest.raises(ValueError, match="4-D"):
        make_conv2d(torch.randn(4, 3), None)
    with pytest.raises(ValueError, match="groups"):
        make_conv2d(w, None, groups=3)
    with pytest.raises(ValueError, match="input_shape"):
        make_conv2d(w, None, input_shape=(1, 3, 8, 8))
    with pytest.raises(ValueError, match="float32"):
        make_conv2d(w, None, kernel="csr_direct")(torch.zeros(1, 2, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="input"):
        make_conv2d(w, None, kernel="csr_direct")(torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="threads"):
        make_linear(torch.randn(4, 3), None, threads=0)


def test_rule_choice_without_timing(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("SWAT_AUTOTUNE", "0")
    sparse, dense = _sparse((32, 16, 3, 3), 0.95, 9), torch.randn(32, 16, 3, 3)
    assert make_conv2d(sparse, None, 1, 1, input_shape=(1, 16, 8, 8)).kernel_name == "csr_direct"
    assert make_conv2d(dense, None, 1, 1, input_shape=(1, 16, 8, 8)).kernel_name == "dense"
    assert make_linear(_sparse((64, 64), 0.95, 10), None).kernel_name == "csr_rows"
    assert make_linear(torch.randn(64, 64), None).kernel_name == "dense"
    assert not autotune.cache_path().exists()  # nothing timed, nothing cached


def test_autotune_picks_a_kernel_and_caches_it(monkeypatch) -> None:  # noqa: ANN001
    weight = _sparse((32, 16, 3, 3), 0.9, 11)
    b = torch.randn(32)
    op = make_conv2d(weight, b, 1, 1, input_shape=(1, 16, 8, 8))
    assert op.kernel_name in kernel_names()
    x = torch.randn(1, 16, 8, 8)
    torch.testing.assert_close(op(x), F.conv2d(x, weight, b, 1, 1), rtol=1e-4, atol=1e-4)
    data = json.loads(autotune.cache_path().read_text())
    entries = data["machines"][autotune.machine_key(None)]
    (key, entry), = entries.items()
    assert entry["kernel"] == op.kernel_name and key.startswith("conv2d|") and "in=1x16x8x8" in key
    times = entry["times_us"]
    assert set(times) <= set(kernel_names()) and "dense" in times
    assert op.threads is None and entry["serial"] is False  # timed and run on the caller's threads
    # the pick follows from the recorded times (fastest, within the dense and thread-pool margins)
    rule = autotune.rule_choice(op.spec, [get_kernel(n) for n in times]).name
    pools = {n: autotune.thread_pool(get_kernel(n)) for n in times}
    assert entry["kernel"] == autotune.pick(times, pools, "dense", rule)

    def no_timing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a cached layer must not be timed again")

    monkeypatch.setattr(autotune, "time_prepared", no_timing)
    again = make_conv2d(weight, b, 1, 1, input_shape=(1, 16, 8, 8))
    assert again.kernel_name == op.kernel_name
    # A cached choice naming a kernel that no longer exists is ignored (re-timed).
    entries[key]["kernel"] = "gone"
    autotune.cache_path().write_text(json.dumps(data))
    monkeypatch.undo()
    monkeypatch.setenv("SWAT_AUTOTUNE_CACHE", str(autotune.cache_path()))
    assert make_conv2d(weight, b, 1, 1, input_shape=(1, 16, 8, 8)).kernel_name in kernel_names()


def test_autotune_cache_separates_threads_and_shapes() -> None:
    weight = _sparse((16, 8, 3, 3), 0.9, 12)
    make_conv2d(weight, None, 1, 1, input_shape=(1, 8, 6, 6), threads=1)
    make_conv2d(weight, None, 1, 1, input_shape=(2, 8, 6, 6), threads=1)
    make_conv2d(weight, None, 1, 1, input_shape=(1, 8, 6, 6), threads=2)
    machines = json.loads(autotune.cache_path().read_text())["machines"]
    assert len(machines[autotune.machine_key(1)]) == 2
    assert len(machines[autotune.machine_key(2)]) == 1


def test_corrupt_cache_is_ignored_with_a_warning() -> None:
    path = autotune.cache_path()
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="autotune cache .* not JSON text.*rewrote the file"):
        op = make_linear(_sparse((64, 64), 0.9, 13), None, input_shape=(4, 64))
    assert op.kernel_name in kernel_names()
    assert json.loads(path.read_text())["version"] == autotune.CACHE_VERSION  # rewritten, valid


def test_autotune_rejects_a_wrong_kernel(monkeypatch) -> None:  # noqa: ANN001
    """A sparse kernel whose output disagrees with dense is never chosen, however fast."""
    from swat_deploy.kernels import csr_rows

    real = csr_rows._CsrLinear.__call__
    monkeypatch.setattr(csr_rows._CsrLinear, "__call__", lambda self, x: real(self, x) + 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        op = make_linear(_sparse((64, 64), 0.99, 14), None, input_shape=(8, 64))
    assert op.kernel_name != "csr_rows"
    assert any("disagrees" in str(w.message) for w in caught)


def test_thread_scope_restores_settings() -> None:
    t0, n0 = torch.get_num_threads(), numba.get_num_threads()
    with thread_scope(1):
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    assert torch.get_num_threads() == t0 and numba.get_num_threads() == n0
    op = make_linear(torch.randn(8, 8), None, kernel="csr_rows", threads=1)
    op(torch.randn(2, 8))
    assert torch.get_num_threads() == t0 and numba.get_num_threads() == n0


def test_numba_threads_tracks_nested_scopes_without_asking_numba() -> None:
    """Kernels read the scope's count from `numba_threads` (numba's own getter takes a lock per
    call); it must agree with numba inside nested scopes and after each one exits."""
    from swat_deploy.threads import numba_threads

    n0 = numba.get_num_threads()
    assert numba_threads() == n0
    with thread_scope(1, torch_threads=False):
        assert numba_threads() == numba.get_num_threads() == 1
        with thread_scope(2, torch_threads=False):
            assert numba_threads() == numba.get_num_threads() == min(2, numba.config.NUMBA_NUM_THREADS)
        assert numba_threads() == numba.get_num_threads() == 1
    assert numba_threads() == numba.get_num_threads() == n0


def test_cache_of_an_older_kernel_version_is_retimed_silently(recwarn) -> None:  # noqa: ANN001
    path = autotune.cache_path()
    stale = {"version": autotune.CACHE_VERSION - 1, "machines": {"m": {"k": {"kernel": "dense"}}}}
    path.write_text(json.dumps(stale))
    make_linear(_sparse((64, 64), 0.9, 14), None, input_shape=(4, 64))
    data = json.loads(path.read_text())
    assert data["version"] == autotune.CACHE_VERSION and "m" not in data["machines"]
    assert not [w for w in recwarn if "autotune" in str(w.message)]


def test_a_cached_pick_that_never_met_a_new_kernel_is_timed_again(monkeypatch) -> None:  # noqa: ANN001
    weight = _sparse((32, 16, 3, 3), 0.9, 12)
    shape = (1, 16, 8, 8)
    make_conv2d(weight, None, 1, 1, input_shape=shape)
    data = json.loads(autotune.cache_path().read_text())
    entries = data["machines"][autotune.machine_key(None)]
    (key, entry), = entries.items()
    newcomer = next(n for n in entry["candidates"] if n != entry["kernel"])
    entry["candidates"].remove(newcomer)  # as if written before that kernel existed
    entry["times_us"].pop(newcomer, None)
    autotune.cache_path().write_text(json.dumps(data))
    calls = []
    real = autotune.time_prepared

    def spy(prepared, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(set(prepared))
        return real(prepared, *args, **kwargs)

    monkeypatch.setattr(autotune, "time_prepared", spy)
    make_conv2d(weight, None, 1, 1, input_shape=shape)
    assert len(calls) == 1 and newcomer in calls[0]
    again = json.loads(autotune.cache_path().read_text())["machines"][autotune.machine_key(None)][key]
    assert newcomer in again["candidates"]
    make_conv2d(weight, None, 1, 1, input_shape=shape)
    assert len(calls) == 1  # complete now: the cached pick holds


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.name)
def test_every_kernel_names_a_known_thread_pool(kernel) -> None:  # noqa: ANN001
    assert autotune.thread_pool(kernel) in {"native", "numba", "torch"}


def test_pick_keeps_to_the_rules_thread_pool_unless_another_wins_by_the_margin() -> None:
    pools = {"dense": "torch", "csr_direct": "native", "masked_direct": "native", "csr_im2col": "numba"}
    t = {"dense": 10.0, "csr_direct": 5.0, "masked_direct": 4.0, "csr_im2col": 3.8}
    # im2col is fastest but within 10 % of masked_direct (the best on the rule's pool)
    assert autotune.pick(t, pools, "dense", "csr_direct") == "masked_direct"
    # kernels on the rule's pool compete on time alone
    assert autotune.pick({**t, "csr_im2col": 9.0}, pools, "dense", "csr_direct") == "masked_direct"
    # a clear win on another pool counts
    assert autotune.pick({**t, "csr_im2col": 3.0}, pools, "dense", "csr_direct") == "csr_im2col"
    # no rule pick: the fastest, but it must still beat dense by DENSE_MARGIN
    assert autotune.pick(t, pools, "dense", None) == "csr_im2col"
    assert autotune.pick({"dense": 10.0, "csr_im2col": 9.9}, pools, "dense", None) == "dense"


def test_cached_choices_are_partitioned_by_kernel_build_and_cpu(monkeypatch) -> None:  # noqa: ANN001
    """A rebuilt kernel set (or another CPU generation behind the same model name) is timed
    afresh: both on-disk caches (inference autotune, training's sparse-vs-dense picks) key their
    machine section by the library's hash and the CPU's family/model."""
    import swat_native
    from training import sparse_choices

    before = (autotune.machine_key(1), sparse_choices.machine_key())
    assert all(f"kernels={swat_native.build_id()}" in k and f"cpu={swat_native.cpu_signature()}" in k for k in before)
    monkeypatch.setattr(swat_native, "build_id", lambda: "rebuilt")
    after = (autotune.machine_key(1), sparse_choices.machine_key())
    assert after[0] != before[0] and after[1] != before[1]
    assert all("kernels=rebuilt" in k for k in after)

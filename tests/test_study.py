"""The study runner: experiment list, resumable store, verdict rules, forward-only ablation."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import study
from training.forward_only import forward_only
from training.topk import topk_weight


def test_experiment_keys_unique_and_cover_the_brief():
    exps = study.experiments()
    keys = [e.key for e in exps]
    assert len(keys) == len(set(keys))
    need = {"dense", "swat-s90", "saw-s80", "forward-s30", "meprop-s70", "saw-s30", "swat-s80-r100",
            "swat-s90-erk", "saw-s90-random", "swat-s50-hw", "swat-s70-chw"}
    assert need <= set(keys)
    # shared runs are not duplicated: saw-s50 serves Fig. 4, Fig. 2 and Fig. 3
    saw50 = next(e for e in exps if e.key == "saw-s50")
    assert {"accuracy", "fwd_bwd", "topk_saw"} <= set(saw50.groups)


def _rec(key: str, acc, n: int = 10000, **kw):
    return {"key": key, "test_accuracy": acc, "test_n": n, "refresh_every": 1, **kw}


def test_margin_rule():
    a, b = _rec("a", 0.5), _rec("b", 0.5)
    se = (2 * 0.25 / 10000) ** 0.5
    assert study.margin(a, b, 0.0) == pytest.approx(max(2 * se, 0.005))
    assert study.margin(a, b, 0.03) == 0.03


def _by_id(ver):
    return {v["id"]: v["verdict"] for v in ver}


def test_verdicts_pass_fail_inconclusive_not_run():
    res = {k: _rec(k, acc) for k, acc in {
        "dense": 0.90, "dense-seed1": 0.90,
        "saw-s70": 0.88, "meprop-s70": 0.50,  # clear win -> PASS
        "saw-s50-chw": 0.85, "saw-s50-hw": 0.849, "saw-s70-chw": 0.84, "saw-s70-hw": 0.80,
        "saw-s90-chw": 0.70, "saw-s90-hw": 0.60,  # one difference inside noise -> INCONCLUSIVE
        "swat-s80": 0.85, "swat-s80-r20": 0.80, "swat-s80-r100": 0.85,  # caching hurts -> FAIL
    }.items()}
    res["meprop-s30"] = None
    ver = _by_id(study.verdicts({k: v for k, v in res.items() if v is not None}, {}))
    assert ver["fig2-meprop"] == "PASS"
    assert ver["fig3-saw-hw"] == "INCONCLUSIVE"
    assert ver["fig6b-refresh"] == "FAIL"
    assert ver["fig3-swat-hw"] == "NOT RUN"
    assert ver["fig2-meprop-all"] == "PASS (partial)"


def test_diverged_run_counts_as_zero_accuracy():
    res = {"saw-s70": _rec("saw-s70", 0.6), "meprop-s70": _rec("meprop-s70", None)}
    assert _by_id(study.verdicts(res, {}))["fig2-meprop"] == "PASS"


def test_store_append_and_torn_line(tmp_path):
    study._append_result(tmp_path, {"key": "a", "x": 1})
    with open(tmp_path / study.RESULTS, "a") as f:
        f.write('{"key": "b", "x"')  # a study killed mid-write
    study._append_result(tmp_path, {"key": "c", "x": 3})
    got = study.load_results(tmp_path)
    assert sorted(got) == ["a", "c"]
    assert all(json.loads(l) for l in (tmp_path / study.RESULTS).read_text().splitlines())


def test_forward_only_sparse_value_dense_gradient():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    forward_only(conv, 0.7)
    x = torch.randn(2, 3, 5, 5)
    y = conv(x)
    w_s = topk_weight(ref.weight, 0.7)
    torch.testing.assert_close(y, F.conv2d(x, w_s, ref.bias, padding=1))
    g = torch.randn_like(y)
    y.backward(g)
    ref(x).backward(g)  # dense backward of the dense layer
    torch.testing.assert_close(conv.weight.grad, ref.weight.grad)
    conv.eval()
    torch.testing.assert_close(conv(x), F.conv2d(x, w_s, ref.bias, padding=1))


def test_forward_only_linear_input_gradient_uses_dense_weight():
    torch.manual_seed(1)
    lin = nn.Linear(6, 3)
    forward_only(lin, 0.5)
    x = torch.randn(4, 6, requires_grad=True)
    lin(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(4, 6))


def test_forward_only_refuses_swat_layers():
    from training.swatify import swatify
    net = swatify(nn.Sequential(nn.Linear(4, 4)), sparsity=0.5)
    with pytest.raises(ValueError, match="unswatify"):
        forward_only(net, 0.5)


def test_run_study_is_resumable(tmp_path, monkeypatch):
    tiny = study.Scale(model="lenet5", dataset="digits", train_limit=64, test_limit=50, epochs=1, batch_size=32,
                       trace_every=1)
    monkeypatch.setitem(study.SCALES, "quick", tiny)
    monkeypatch.setattr(study, "analytic", lambda scale, quick: {"reduction": [], "gaussian_angles": {},
                                                                 "saved_bytes": []})
    calls = []
    real = study.run_experiment
    monkeypatch.setattr(study, "run_experiment", lambda *a, **k: calls.append(a[0].key) or real(*a, **k))
    lines = []
    study.run_study(tmp_path, quick=True, only=["dense", "swat-s70"], log=lines.append)
    assert sorted(calls) == ["dense", "swat-s70"]
    res = study.load_results(tmp_path)
    assert res["swat-s70"]["test_n"] == 50
    trace = res["swat-s70"]["trace"]
    layer = next(iter(trace["thresholds"]))
    assert len(trace["thresholds"][layer]) == 2  # 64 images / batch 32 = 2 steps, one threshold each
    assert trace["angles"][layer]["weight"] and trace["angles"][layer]["grad_output"]
    assert (tmp_path / "study_fig4_accuracy.png").is_file() and (tmp_path / study.SUMMARY).is_file()
    calls.clear()
    study.run_study(tmp_path, quick=True, only=["dense", "swat-s70"], log=lines.append)
    assert calls == []  # everything already done
    with pytest.raises(Exception, match="no such experiment"):
        study.run_study(tmp_path, quick=True, only=["nope"], log=lines.append)

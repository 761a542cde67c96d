"""The study: verdict maths, resumable runner, and the semantics the claims depend on
(random control, hw rounding, weight-threshold caching, forward-only ablation)."""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import study
from training.forward_only import forward_only
from training.study import store, verdicts as V
from training.study.configurations import runs_of
from training.swatify import layer_stats, swatify
from training.topk import keep_count, select_bits
from training.weight_topk import topk_weight


# ------------------------------------------------------------------------ verdict maths
def test_t_interval_matches_textbook_numbers():
    m, lo, hi = V.interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert m == 2.0
    assert lo == pytest.approx(2 - 4.303 / 3 ** 0.5) and hi == pytest.approx(2 + 4.303 / 3 ** 0.5)
    assert V.interval([5.0])[1:] == (None, None)


def _runs(accs: dict[str, list[float]]) -> dict[str, dict]:
    out = {}
    for key, values in accs.items():
        for seed, a in enumerate(values):
            out[store.run_id(key, seed)] = {"key": key, "seed": seed, "test_accuracy": a}
    return out


def _verdict(runs, cid):
    return next(v for v in V.verdicts(runs) if v["id"] == cid)


def test_verdicts_hold_contradict_or_stay_inconclusive():
    # paired by seed: seed effects cancel, so a steady -0.3 pt is "within 1 pt" although the
    # seeds spread by 2 pt
    dense = [0.90, 0.92, 0.88]
    runs = _runs({"dense": dense, "swat-70": [a - 0.003 for a in dense],
                  "swat-90": [a - 0.05 for a in dense],                    # -5 pt: contradicts "within 2.5"
                  "saw-70-chw": [0.85, 0.86, 0.87], "saw-70-hw": [0.86, 0.84, 0.87]})  # noise: inconclusive
    v = _verdict(runs, "swat70-vs-dense")
    assert v["verdict"] == "holds"
    assert v["comparisons"][0]["mean"] == pytest.approx(-0.3)
    assert _verdict(runs, "swat90-vs-dense")["verdict"] == "contradicted"
    assert _verdict(runs, "topk-chw-vs-hw")["verdict"] == "inconclusive"
    assert _verdict(runs, "erk-vs-uniform")["verdict"] == "inconclusive"  # not run
    assert _verdict(runs, "erk-vs-uniform")["comparisons"][0]["n"] == 0


def test_equivalence_claim_and_pairing_over_common_seeds_only():
    base = [0.80, 0.85, 0.90]
    runs = _runs({"swat-50": base, "saw-50": [a + 0.001 for a in base], "swat-70": base,
                  "saw-70": [a + 0.03 for a in base], "swat-80": base, "saw-80": base[:1],
                  "swat-90": base, "saw-90": base})
    v = _verdict(runs, "swat-vs-saw")
    rows = {r["a"]: r for r in v["comparisons"]}
    assert rows["swat-50"]["verdict"] == "holds"
    assert rows["swat-70"]["verdict"] == "contradicted"  # a steady 3 pt gap is outside +-1 pt
    assert rows["swat-80"]["n"] == 1 and rows["swat-80"]["verdict"] == "inconclusive"
    assert v["verdict"] == "contradicted"


def test_diverged_run_counts_as_chance():
    runs = _runs({"saw-70": [0.8, 0.81, 0.79], "swat-70": [0.8, 0.8, 0.8], "meprop-70": [None, None, None]})
    v = _verdict(runs, "saw-swat-vs-meprop")
    assert v["comparisons"][0]["mean"] == pytest.approx(70.0)
    assert v["verdict"] == "holds"


def test_judge_rules():
    assert V.judge(0.5, 1.5, 0.0) == "holds"
    assert V.judge(-1.5, -0.5, 0.0) == "contradicted"
    assert V.judge(-0.5, 0.5, 0.0) == "inconclusive"
    assert V.judge(-0.5, 0.5, 1.0, "~") == "holds"
    assert V.judge(1.2, 2.0, 1.0, "~") == "contradicted"
    assert V.judge(None, None, 0.0) == "inconclusive"


# ------------------------------------------------------------------------ store and runner
def test_store_append_and_torn_line(tmp_path):
    store.append(tmp_path, {"key": "a", "seed": 0})
    with open(tmp_path / store.RUNS, "a") as f:
        f.write('{"key": "b", "seed"')  # a study killed mid-write
    store.append(tmp_path, {"key": "c", "seed": 1})
    got = store.load(tmp_path)
    assert sorted(got) == ["a/seed0", "c/seed1"]


def test_run_order_is_seed_major_with_blocks_last():
    p = study.preset("resnet20")
    plan = runs_of(p)
    seeds = [s for _, s in plan if _.block == 1]
    assert seeds == sorted(seeds)
    blocks = [i for i, (c, _) in enumerate(plan) if c.block != 1]
    assert not blocks or min(blocks) > max(i for i, (c, _) in enumerate(plan) if c.block == 1)
    keys = {c.key for c, _ in plan}
    assert {"dense", "swat-90", "saw-50", "meprop-30", "saw-70-random", "swat-70-r100", "swat-90-erk",
            "fwd-weights-70", "fwd-activations-70"} <= keys
    cmd = study.command(p, next(c for c in p.configs if c.key == "swat-70-r20"), 1, "runs/x")
    assert "--refresh-every 20 --refresh-weights" in cmd and "--schedule thirds" in cmd and "--seed 1" in cmd


FAKE_WORKER = """
import json, sys, pathlib
spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
d = pathlib.Path(spec["run_dir"]); d.mkdir(parents=True, exist_ok=True)
rec = {"key": spec["key"], "seed": spec["train"]["seed"], "config": spec["config"], "test_accuracy": 0.5,
       "layers": [], "wall_seconds": 0.0, "command": spec["command"]}
(d / "study_result.json").write_text(json.dumps(rec))
"""


def test_report_judges_only_claims_whose_configurations_the_preset_has():
    from training.study.report import render

    def claims_in(p):
        text, _ = render(p, {}, [])
        return {cl.id for cl in V.CLAIMS if cl.text in text}

    full = study.preset("tiny")
    no_blocks = replace(full, configs=tuple(c for c in full.configs if c.block == 1))
    assert "blocks-vs-unstructured" in claims_in(full)
    left = claims_in(no_blocks)
    assert "blocks-vs-unstructured" not in left and "swat70-vs-dense" in left


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    from training.study import runner
    fake = tmp_path / "fake_worker.py"
    fake.write_text(FAKE_WORKER)
    started = []
    monkeypatch.setattr(runner, "worker_argv", lambda spec: started.append(spec.name) or [sys.executable, str(fake), str(spec)])
    p = study.preset("tiny")
    only = ["dense", "swat-70", "saw-70"]
    study.run_study(p, tmp_path / "out", tmp_path / "runs", jobs=2, only=only, log=lambda line: None)
    assert len(started) == 6  # 3 configurations x 2 seeds
    # a study killed after 4 runs: drop two lines, leave a torn one
    lines = (tmp_path / "out" / store.RUNS).read_text().splitlines()
    (tmp_path / "out" / store.RUNS).write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    started.clear()
    log: list[str] = []
    done = study.run_study(p, tmp_path / "out", tmp_path / "runs", jobs=2, only=only, log=log.append)
    assert len(started) == 2 and len(done) == 6
    assert "4 already in" in log[0] and sum(l.startswith("[") for l in log) == 2
    assert len(store.load(tmp_path / "out")) == 6
    with pytest.raises(Exception, match="another setup"):  # never mix runs of another scale into the file
        study.run_study(replace(p, epochs=2), tmp_path / "out", tmp_path / "runs", only=only, log=log.append)


@pytest.mark.slow
def test_run_study_is_resumable_and_reports_partial(tmp_path):
    p = replace(study.preset("tiny"), seeds=(0,))
    lines: list[str] = []
    done = study.run_study(p, tmp_path / "out", tmp_path / "runs", jobs=2, only=["dense", "saw-70-random"],
                           log=lines.append)
    assert sorted(done) == ["dense/seed0", "saw-70-random/seed0"]
    rec = done["saw-70-random/seed0"]
    assert rec["command"].startswith("OMP_NUM_THREADS=1 swat train") and "--topk random" in rec["command"]
    assert rec["step_cpu_seconds_median"] > 0 and rec["layers"][0]["macs"] > 0
    assert 0.6 < rec["layers"][0]["weight_sparsity_train"] < 0.8
    assert sum(l.startswith("[") for l in lines) == 2  # one progress line per finished run
    lines.clear()
    study.run_study(p, tmp_path / "out", tmp_path / "runs", jobs=2, only=["dense", "saw-70-random"],
                    log=lines.append)
    assert "0 to run" in lines[0] and not any(l.startswith("[") for l in lines)
    path, term = study.write_report(p, tmp_path / "out", tmp_path / "REPORT.md")
    text = path.read_text()
    assert f"2 of {len(runs_of(p))} planned runs are in" in text and "inconclusive" in text
    assert (tmp_path / "out" / "accuracy_vs_sparsity.png").is_file()


# ------------------------------------------------------------------------ semantics
def test_random_control_keeps_the_count_and_ignores_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(8, 16, 10, 10, generator=g))  # half zeros, like a post-ReLU input
    sel = select_bits(x, 0.7, "random", generator=torch.Generator().manual_seed(1))
    assert sel.count == keep_count(x.numel(), 0.7)  # k of ALL entries, zeros included
    kept = x[sel.mask]
    assert 0.25 < float((kept == 0).float().mean()) < 0.75  # zeros drawn as often as anything
    # not magnitude-biased: the kept entries' mean |x| is the tensor's, not the top's
    assert abs(float(kept.abs().mean()) - float(x.abs().mean())) < 0.05
    stored = select_bits(x, 0.7, "random", generator=torch.Generator().manual_seed(1), drop_zeros=True)
    assert torch.equal(stored.mask, sel.mask & (x != 0))
    w = torch.randn(32, 16, 3, 3, generator=g)
    ws = select_bits(w, 0.9, "random", generator=torch.Generator().manual_seed(2))
    assert ws.count == keep_count(w.numel(), 0.9)
    assert abs(float(w[ws.mask].abs().mean()) - float(w.abs().mean())) < 0.1


def test_hw_on_3x3_kernels_realises_the_requested_sparsity():
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(3))
    for s in (0.5, 0.7, 0.8):
        mask = topk_weight(w, s, "hw") != 0
        assert int(mask.sum()) == keep_count(w.numel(), s), s
        per = mask.reshape(128, 9).sum(1)
        assert int(per.max() - per.min()) <= 1 and int(per.min()) >= 1
    # 90 % would keep 0.9 per slice: every slice keeps one (declared), so 88.9 % is realised
    assert int((topk_weight(w, 0.9, "hw") != 0).sum()) == 128
    # 70 %: 2 per slice + the extra places go to the slices with the largest 3rd entry
    per = (topk_weight(w, 0.7, "hw") != 0).reshape(128, 9).sum(1)
    third = w.abs().reshape(128, 9).sort(1, descending=True).values[:, 2]
    assert third[per == 3].min() >= third[per == 2].max()


def _train_steps(net, steps=4):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        x, y = torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in net.parameters()]


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 64, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("topk", ["nchw", "chw", "hw"])
def test_weight_threshold_caching_at_refresh_1_is_exact(topk):
    torch.manual_seed(4)
    base = _Net()
    a = swatify(copy.deepcopy(base), 0.7, "swat", topk, refresh_every=1, cache_weight_threshold=True).train()
    b = swatify(copy.deepcopy(base), 0.7, "swat", topk, refresh_every=1).train()
    for p, q in zip(_train_steps(a), _train_steps(b)):
        assert torch.equal(p, q)
    # at refresh 5 the cached weight threshold is really used: the kept count drifts from k
    c = swatify(copy.deepcopy(base), 0.7, "swat", topk, refresh_every=5, cache_weight_threshold=True).train()
    _train_steps(c)
    assert c.conv.swat_weight_threshold is not None
    st = layer_stats(c)["conv"]
    assert st["weight_sparsity_train_mean"] != pytest.approx(st["weight_sparsity"], abs=1e-9)


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




def test_thirds_schedule_drops_at_one_and_two_thirds():
    from training.config import TrainConfig
    from training.schedule import lr_at
    paper = TrainConfig(lr=0.1, epochs=150, schedule="thirds")
    assert [round(lr_at(paper, e), 6) for e in (0, 49, 50, 99, 100, 149)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    short = TrainConfig(lr=0.1, epochs=3, schedule="thirds")
    assert [round(lr_at(short, e), 6) for e in range(3)] == [0.1, 0.01, 0.001]

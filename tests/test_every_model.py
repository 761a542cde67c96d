"""Every registered model, swatified, through the deploy path: prune -> ONNX -> our Session, and
the same file in stock onnxruntime, on small inputs. Untrained weights are enough: the question
is whether both runtimes compute the pruned model, not whether it is accurate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models
import swat_deploy
from training import swatify

pytestmark = pytest.mark.usefixtures("one_torch_thread", "isolated_caches")

# The default suite runs the cheapest of each kind (plain CNN, residual, depthwise + 1x1); torch's
# ONNX exporter alone takes 3-16 s of CPU on each of the large ones, which run with -m slow.
FAST = {"lenet5", "resnet20", "mobilenet_v2"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow)
                                  for n in models.names()])
def test_pruned_model_runs_the_same_in_session_and_onnxruntime(name: str, tmp_path: Path) -> None:
    import onnxruntime as ort

    torch.manual_seed(0)
    net = swatify(models.build(name, num_classes=10, in_channels=1, **models.small_input_cfg(name)), 0.7, "swat")
    net.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    path = swat_deploy.export_onnx(net, tmp_path / f"{name}.onnx", example_input=x[:1])
    with torch.no_grad():
        want = net(x).numpy()
    stock = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": x.numpy()})[0]
    ours = swat_deploy.Session(path, threads=1, fallback=False).run(None, {"input": x.numpy()})[0]
    scale = max(1.0, float(np.abs(want).max()))
    assert stock.shape == ours.shape == (2, 10)
    np.testing.assert_allclose(ours, stock, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(stock, want, rtol=0, atol=1e-4 * scale)  # the file is the eval-mode module


def test_ceil_mode_pool_larger_than_its_input_matches_onnxruntime() -> None:
    """VGG-16's last 2x2 ceil_mode pool on a 1x1 map (8x8 images): one window, as in torch and
    onnxruntime (the Session used to refuse it)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["input"], ["logits"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
        "pool", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 1, 1])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, 1, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((1, 3, 1, 1)).astype(np.float32)
    stock = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ours = swat_deploy.Session(model, threads=1, fallback=False).run(None, {"input": x})[0]
    np.testing.assert_array_equal(ours, stock)
    np.testing.assert_array_equal(ours, x)

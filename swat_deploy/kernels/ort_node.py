"""One grouped or depthwise conv run by stock onnxruntime, as a one-node model.

Why: a depthwise conv (MobileNet's, EfficientNet's) has nothing for a sparse kernel to skip
that pays (9 taps a channel), and torch's NCHW depthwise conv is slow at small batches:
MobileNet-V2's depthwise convs took 3.4 ms at batch 1 in torch against 0.75 ms inside
onnxruntime (AMD EPYC, 2 threads), which made the whole Session lose to onnxruntime although
its 1x1 convs run sparse. Running just those layers on onnxruntime keeps the rest of the graph
on our kernels. The autotuner times it against torch like any other kernel, so it is used only
where it wins; its thread pool is onnxruntime's own (``thread_pool``), which the planner counts
as a switch.

Covers: conv2d with more than one group (plain convs have our sparse kernels and torch).
One onnxruntime session per thread count the layer runs with (the Session's one-thread plan
runs it with one), opened on first use; no spinning workers (see :mod:`swat_deploy.ort`).
"""
from __future__ import annotations

import numpy as np
import torch

from .base import LayerSpec


def _conv_model(weight: np.ndarray, bias: np.ndarray | None, spec: LayerSpec) -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["x", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        inputs.append("B")
    top, left, bottom, right = spec.padding
    node = helper.make_node("Conv", inputs, ["y"], strides=list(spec.stride), pads=[top, left, bottom, right],
                            dilations=list(spec.dilation), group=spec.groups,
                            kernel_shape=list(spec.weight_shape[2:]))
    c = spec.in_channels
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", c, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", spec.out_channels, "ho", "wo"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


class _OrtConv:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec) -> None:
        w = weight.detach().float().contiguous().numpy()
        b = None if bias is None else bias.detach().float().contiguous().numpy()
        self._model = _conv_model(w, b, spec)
        self._sessions: dict[int, object] = {}
        self.nbytes = w.size * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # The Op wrapper sets torch's thread count to what this layer may use (the Session's
        # one-thread plan included): onnxruntime gets the same.
        threads = torch.get_num_threads()
        sess = self._sessions.get(threads)
        if sess is None:
            from ..ort import ort_session

            sess = self._sessions[threads] = ort_session(self._model, threads)
        (y,) = sess.run(None, {"x": x.numpy()})
        return torch.from_numpy(y)


class OrtNodeKernel:
    """onnxruntime's Conv on the dense weight, for grouped and depthwise convs."""

    name = "ort_node"
    thread_pool = "onnxruntime"

    def supports(self, spec: LayerSpec) -> bool:
        return spec.kind == "conv2d" and spec.groups > 1 and len(spec.weight_shape) == 4

    def prepare(self, weight: torch.Tensor, bias: torch.Tensor | None, spec: LayerSpec):  # noqa: ANN201
        if not self.supports(spec):
            raise ValueError(f"ort_node runs grouped conv2d layers only, got {spec.kind} with groups={spec.groups}; "
                             "use another kernel")
        return _OrtConv(weight, bias, spec)

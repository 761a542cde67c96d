"""The one conversion of a pruned model to ONNX, for every path that needs a graph.

``swat export`` (which then encodes the weights compactly), a Session opened on a run dir or a
sparse.safetensors, and ``bench`` all run this, so what the Session runs is the graph that is
exported: torch's dynamo exporter at opset 18 - the newest opset every onnxruntime >= 1.14 and
the torch exporter fully support, and the first with BitwiseAnd / reduction axes as inputs,
which compact weight storage uses.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from typing import Any

import torch

OPSET = 18


def torch_to_onnx(sm: Any) -> Any:
    """Run torch's exporter quietly into memory on ``sm`` (a :class:`swat_deploy.prune.SparseModel`);
    the graph it emits uses standard ops only."""
    import onnx

    example = torch.rand(*sm.input_shape)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = os.path.join(tmp, "model.onnx")
        sink = io.StringIO()
        quiet = logging.getLogger("torch.onnx")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # external data: models over 2 GB cannot be one protobuf; loaded back below
                    torch.onnx.export(sm.module, (example,), tmp_path, dynamo=True, opset_version=OPSET,
                                      input_names=["input"], output_names=["logits"],
                                      dynamic_shapes={"input": {0: torch.export.Dim("batch")}},
                                      external_data=True)
        finally:
            quiet.setLevel(level)
        model = onnx.load(tmp_path, load_external_data=True)
    return model

"""Module surgery: turn a model's Conv2d / Linear layers into SWAT layers, in place.

A converted layer is still an ``nn.Conv2d`` / ``nn.Linear`` (its ``__class__`` is swapped to
a subclass) with the very same parameters and ``state_dict`` keys, so optimisers, checkpoints,
``load_state_dict`` and code that walks the model keep working.  Per-layer SWAT state (cached
activation thresholds, step counters, RNG state of ``random``) lives in attributes and a
non-persistent buffer and travels via :func:`swat_state_dict` / :func:`load_swat_state_dict`.

Per mode, a training step (module in train mode, grad enabled) computes:

==========  ==========================  ===================================================
mode        forward                     backward / saved for backward
==========  ==========================  ===================================================
``dense``   the stock layer (no autograd Function at all: a Python Function costs ~16%)
``swat``    conv(a, TopK(W))            grad_in from TopK(W), grad_W from TopK(a); saves both
                                        compactly (values + bitmask)
``saw``     conv(a, W)                  as swat
``meprop``  conv(a, W)                  Top-K of grad_out per sample; saves dense a and W
==========  ==========================  ===================================================

Inference (eval mode or no grad) is ``conv(a, TopK(W))`` for swat and the dense layer for
the other modes, with no activation work: exactly what :func:`training.topk.topk_weight`
and pruning reproduce.

meProp's output layer stays dense (``dense_output``, default on for meprop only): Sun et al.
apply Top-K to hidden layers (their reference code builds the output layer with k = 0).  The
gradient of softmax cross-entropy w.r.t. the logits sums to zero over the classes, which is
what makes it blind to a common shift of all logits; keeping 3 of 10 entries per sample breaks
that (the kept part sums to minus the dropped probabilities), so every step pushes all logits
the same way: the output bias and the common-mode row of W drift steadily (measured: bias
mean 0 -> +2.6 in 110 steps), and that common mode leaks into every hidden layer's gradient.
LeNet-5 on digits at 70 % then sits at chance; with the output layer dense it learns like SAW.

In swat / saw mode ``nn.ReLU`` and ``nn.MaxPool2d`` are swapped too (:mod:`training.memory`),
so the dense ReLU output is not kept alive behind the compact copy.  In every mode ``nn.BatchNorm2d`` becomes
:class:`~training.batchnorm.SwatBatchNorm2d`: the same math, with compiled CPU float32 training
passes (torch's were the largest single cost of a SWAT step once the products were sparse).

Threshold caching (``refresh_every=N``): the K-th magnitude of a layer's input is computed
exactly on every N-th training step of that layer; in between the layer keeps
``|a| >= cached threshold`` (never exact zeros).  Per-group thresholds are cached as their
mean over dim 0 (a threshold belongs to the layer / channel, not to whichever sample happened
to sit at index i): ``chw`` caches one scalar, ``hw`` one value per channel.

Weight threshold caching (``cache_weight_threshold=True``, off by default): as in the paper's
code, the weight's K-th magnitude(s) are refreshed on the same every-N-steps schedule and in
between the layer keeps ``|W| >= cached threshold`` (per filter for ``chw``, per filter and
input channel for ``hw``), so the kept count drifts as the weights move.  Off, the weight Top-K
is exact every step and the training forward equals :func:`training.topk.topk_weight`.  At
``refresh_every=1`` both are the same computation.

``random``: weights *and* activations are drawn at random each step among all entries, at the
Top-K kept count, from the layer's own generator (the paper's null hypothesis; see
:mod:`training.topk` for its inference form).

Blocks (``block=B``, swat / saw): the weight Top-K keeps or drops whole groups of B consecutive
output channels at one input position, ranked by the group's squared L2 norm
(:mod:`training.blocks`), in training (forward for swat, backward for both), eval and pruning
alike; the activation Top-K stays element-wise.  A layer uses gcd(its outputs, B).
"""
from __future__ import annotations

import weakref
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training import blocks, memory
from training.batchnorm import SwatBatchNorm2d
from training.budget import layer_sparsities, match_any, prunable_layers
from training.config import BUDGETS, MODES
from training.functions import ConvGeometry, MePropSpec, meprop_conv2d, meprop_linear, swat_conv2d, swat_linear
from training.topk import Selection, SwatValueError, check_topk, select_bits
from training.weight_topk import topk_weight

__all__ = ["MODES", "swatify", "output_layer", "unswatify", "swat_layers", "layer_table", "layer_stats",
           "swat_state_dict", "load_swat_state_dict", "SwatConv2d", "SwatLinear"]

# (input tensor identity, settings, step) -> weak refs to the compact TopK copy made for it
_SHARED: dict[tuple, tuple] = {}
# the autograd Functions' ``a_outer`` operand, always empty: the activation bitmask is never
# nested in a ReLU's (one shared tensor, saved by many layers, costs nothing)
_NO_OUTER = torch.empty(0, dtype=torch.uint8)

_ATTRS = ("swat_mode", "swat_sparsity", "swat_topk", "swat_refresh_every", "swat_step", "_swat_orig_class",
          "_swat_rng_state", "_swat_act_last", "_swat_act_sum", "_swat_act_n", "_swat_grad_last",
          "_swat_grad_sum", "_swat_grad_n", "swat_cache_weight", "swat_weight_threshold", "_swat_w_sum", "_swat_w_n",
          "swat_block")


class _SwatLayerMixin:
    """Shared state and selection logic of the SWAT Conv2d and Linear layers."""

    _swat_layer = True
    weight: Tensor
    bias: Optional[Tensor]
    training: bool

    def _swat_configure(self, mode: str, sparsity: float, topk: str, refresh_every: int,
                        cache_weight: bool = False, block: int = 1) -> None:
        self.swat_block = int(block)  # output channels sharing one zero pattern (training.blocks)
        self.swat_cache_weight = bool(cache_weight)
        self.swat_weight_threshold: Optional[Tensor] = None
        self._swat_w_sum, self._swat_w_n = 0.0, 0
        self.swat_mode = mode
        self.swat_sparsity = float(sparsity)
        self.swat_topk = topk
        self.swat_refresh_every = int(refresh_every)
        self.swat_step = 0
        self.register_buffer("swat_threshold", None, persistent=False)  # type: ignore[attr-defined]
        self._swat_rng_state: Optional[Tensor] = None
        if topk == "random":
            g = torch.Generator()
            g.manual_seed(int(torch.randint(0, 2 ** 62, (1,)).item()))
            self._swat_rng_state = g.get_state()
        self._swat_act_last: Optional[float] = None
        self._swat_act_sum, self._swat_act_n = 0.0, 0
        self._swat_grad_last: Optional[float] = None
        self._swat_grad_sum, self._swat_grad_n = 0.0, 0

    # ----------------------------------------------------------------- helpers
    def _swat_is_training_step(self, x: Tensor) -> bool:
        return self.training and torch.is_grad_enabled() and (
            x.requires_grad or self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))

    def _swat_weight_topk(self) -> str:
        return "nchw" if self.swat_topk == "random" else self.swat_topk

    def _swat_generator(self) -> torch.Generator:
        g = torch.Generator()
        g.set_state(self._swat_rng_state)
        return g

    def _swat_commit_generator(self, g: torch.Generator) -> None:
        self._swat_rng_state = g.get_state()

    def _swat_weight_selection(self) -> Selection:
        """This training step's weight selection: random draw, cached threshold or exact Top-K."""
        w, s = self.weight, self.swat_sparsity
        if self.swat_block > 1:
            return self._swat_block_selection()
        if self.swat_topk == "random":
            g = self._swat_generator()
            sel = select_bits(w, s, "random", generator=g)
            self._swat_commit_generator(g)
            return sel
        if not getattr(self, "swat_cache_weight", False):
            return select_bits(w, s, self.swat_topk)
        cached = self.swat_weight_threshold
        if cached is None or self.swat_step % self.swat_refresh_every == 0:
            sel = select_bits(w, s, self.swat_topk)
            self.swat_weight_threshold = sel.thresholds.detach().to(device=w.device, dtype=torch.float32).clone()
            return sel
        t = cached.to(dtype=w.dtype)
        a = w.detach().abs()
        mask = (a >= t.view(t.shape + (1,) * (w.dim() - t.dim()))) & (a != 0)
        return Selection(w.shape, int(mask.sum()), cached, mask=mask)

    def _swat_block_selection(self) -> Selection:
        """Block Top-K (:mod:`training.blocks`), exact or on the cached score threshold."""
        w, s, b = self.weight, self.swat_sparsity, self.swat_block
        if not getattr(self, "swat_cache_weight", False):
            return blocks.select_block(w, s, self.swat_topk, b)
        cached = self.swat_weight_threshold
        if cached is None or self.swat_step % self.swat_refresh_every == 0:
            sel = blocks.select_block(w, s, self.swat_topk, b)
            self.swat_weight_threshold = sel.thresholds.detach().to(device=w.device, dtype=torch.float32).clone()
            return sel
        return blocks.select_block_cached(w, b, cached)

    def _swat_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(forward weight, compact values, bitmask) of this step's weight selection."""
        w = self.weight
        sel = self._swat_weight_selection()
        self._swat_w_sum += sel.count / w.numel() if w.numel() else 0.0
        self._swat_w_n += 1
        vals = memory.compact(w, sel.bits, sel.count)
        w_fwd = memory.expand(vals, sel.bits, w.shape) if self.swat_mode == "swat" else w.detach()
        return w_fwd, vals, sel.bits

    def _swat_activation(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Compact TopK(x) for backward: (values, bitmask).

        Refreshes or reuses the cached threshold.  When another layer with the same settings
        already sparsified this very tensor in this step (a ResNet block input feeds conv1 and
        the 1x1 shortcut), its compact copy is reused: one TopK per activation tensor, stored
        once.
        """
        s, topk = self.swat_sparsity, self.swat_topk
        key = None
        if topk != "random":
            key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, str(x.device), s, topk,
                   self.swat_refresh_every, self.swat_step)
            hit = _SHARED.get(key)
            if hit is not None:
                src, vals, bits, density = hit[0](), hit[1](), hit[2](), hit[3]
                if src is x and vals is not None and bits is not None:
                    self._swat_note_density(density)
                    return vals, bits
        if topk == "random":
            g = self._swat_generator()
            sel = select_bits(x, s, "random", drop_zeros=True, generator=g)
            self._swat_commit_generator(g)
        else:
            cached = self.swat_threshold
            fits = cached is not None and tuple(cached.shape) == tuple(x.shape[1:1 + cached.dim()])
            if not fits or self.swat_step % self.swat_refresh_every == 0:
                sel = select_bits(x, s, topk, drop_zeros=True)
                thr = sel.thresholds
                self.swat_threshold = (thr.mean(0) if thr.dim() else thr).to(device=x.device, dtype=torch.float32)
            else:
                sel = select_bits(x, s, topk, threshold=cached)
        density = sel.count / x.numel() if x.numel() else 0.0
        self._swat_note_density(density)
        vals, bits = memory.compact(x, sel.bits, sel.count), sel.bits
        if key is not None:
            if len(_SHARED) > 1024:  # only if callers keep very many graphs alive; sharing is optional
                _SHARED.clear()
            # weak references only: the entry leaves with the graph that keeps the copy alive
            _SHARED[key] = (weakref.ref(x), weakref.ref(vals, lambda _r, k=key: _SHARED.pop(k, None)),
                            weakref.ref(bits), density)
        return vals, bits

    def _swat_note_density(self, density: float) -> None:
        self._swat_act_last = density
        self._swat_act_sum += density
        self._swat_act_n += 1

    def _swat_record_grad(self, density: float) -> None:
        self._swat_grad_last = density
        self._swat_grad_sum += density
        self._swat_grad_n += 1

    def _swat_meprop_spec(self) -> MePropSpec:
        rnd = self.swat_topk == "random"
        return MePropSpec(self.swat_sparsity, "hw" if self.swat_topk == "hw" else "chw", rnd,
                          self._swat_generator if rnd else None, self._swat_commit_generator if rnd else None,
                          self._swat_record_grad)

    def _swat_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Everything a swat/saw training step hands to its autograd Function (advances the step)."""
        w_fwd, w_vals, w_bits = self._swat_weights()
        if self.weight.requires_grad:
            a_vals, a_bits = self._swat_activation(x)
        else:  # frozen weight: grad_W is never computed, so TopK(a) need not be kept
            a_vals = a_bits = x.new_empty(0)
        self.swat_step += 1
        return w_fwd, a_vals, a_bits, _NO_OUTER, w_vals, w_bits

    def extra_repr(self) -> str:
        base = super().extra_repr()  # type: ignore[misc]
        return (f"{base}, swat_mode={self.swat_mode}, sparsity={self.swat_sparsity:g}, topk={self.swat_topk}, "
                f"refresh_every={self.swat_refresh_every}" + (f", block={self.swat_block}" if self.swat_block > 1 else ""))


class SwatConv2d(_SwatLayerMixin, nn.Conv2d):
    """An ``nn.Conv2d`` trained with SWAT / SAW / meProp (see module docstring)."""

    def _swat_prepare(self, x: Tensor) -> tuple[Tensor, ConvGeometry]:
        """Resolve string padding / non-zero padding modes to an explicitly padded input."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            pad: tuple[int, int] = (0, 0)
        elif isinstance(self.padding, str):
            if self.padding == "valid":
                pad = (0, 0)
            else:  # "same": torch pads the extra odd pixel on the bottom / right
                totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size)]
                pad = (totals[0] // 2, totals[1] // 2)
                extra = (totals[0] - 2 * pad[0], totals[1] - 2 * pad[1])
                if any(extra):
                    x = F.pad(x, (0, extra[1], 0, extra[0]))
        else:
            pad = (int(self.padding[0]), int(self.padding[1]))
        geo = ConvGeometry(tuple(self.stride), pad, tuple(self.dilation), self.groups)  # type: ignore[arg-type]
        return x, geo

    def forward(self, x: Tensor) -> Tensor:
        mode = self.swat_mode
        if mode == "dense":
            return self._conv_forward(x, self.weight, self.bias)
        if not self._swat_is_training_step(x):
            if mode == "swat":
                return self._conv_forward(x, topk_weight(self.weight, self.swat_sparsity, self.swat_topk,
                                                         self.swat_block), self.bias)
            return self._conv_forward(x, self.weight, self.bias)
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        x, geo = self._swat_prepare(x)
        if mode == "meprop":
            self.swat_step += 1
            out = meprop_conv2d(x, self.weight, self.bias, geo, self._swat_meprop_spec())
        else:
            out = swat_conv2d(x, self.weight, self.bias, *self._swat_inputs(x), geo, self.swat_block)
        return out.squeeze(0) if unbatched else out


class SwatLinear(_SwatLayerMixin, nn.Linear):
    """An ``nn.Linear`` trained with SWAT / SAW / meProp; inputs may have any leading dims."""

    def forward(self, x: Tensor) -> Tensor:
        mode = self.swat_mode
        if mode == "dense":
            return F.linear(x, self.weight, self.bias)
        if not self._swat_is_training_step(x):
            if mode == "swat":
                return F.linear(x, topk_weight(self.weight, self.swat_sparsity, self.swat_topk, self.swat_block),
                                self.bias)
            return F.linear(x, self.weight, self.bias)
        if mode == "meprop":
            self.swat_step += 1
            return meprop_linear(x, self.weight, self.bias, self._swat_meprop_spec())
        return swat_linear(x, self.weight, self.bias, *self._swat_inputs(x))


# ------------------------------------------------------------------------------ surgery
def _is_swat(m: nn.Module) -> bool:
    return getattr(type(m), "_swat_layer", False) or isinstance(m, (memory.SwatReLU, memory.SwatMaxPool2d,
                                                                     SwatBatchNorm2d))


def unswatify(model: nn.Module) -> nn.Module:
    """Restore plain nn.Conv2d / nn.Linear / nn.ReLU / nn.MaxPool2d (in place; returns model).

    Parameters are untouched, so the result is the dense model with the trained weights
    (the SWAT inference form, TopK(W), is what :func:`training.topk.topk_weight` gives).
    """
    for m in model.modules():
        if not _is_swat(m):
            continue
        orig = getattr(m, "_swat_orig_class", None) or type(m).__mro__[1]
        if getattr(type(m), "_swat_layer", False):
            for a in _ATTRS:
                m.__dict__.pop(a, None)
            m._buffers.pop("swat_threshold", None)
            m._non_persistent_buffers_set.discard("swat_threshold")
        m.__dict__.pop("_swat_orig_class", None)
        m.__class__ = orig
    return model


def _check_choice(what: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise SwatValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")
    return value


def output_layer(model: nn.Module) -> Optional[str]:
    """Name of the layer that produces the model's output (the logits), or None if none.

    Taken as the last convertible Conv2d / Linear in module order: every model in the zoo
    registers its classifier last (tests check that its output *is* the model's output).
    """
    layers = prunable_layers(model)
    return layers[-1][0] if layers else None


def swatify(model: nn.Module, sparsity: float = 0.7, mode: str = "swat", topk: str = "nchw",
            refresh_every: int = 1, exclude: Sequence[str] = (), per_layer: Optional[Mapping[str, float]] = None,
            budget: str = "uniform", dense_output: Optional[bool] = None,
            cache_weight_threshold: bool = False, block: int = 1) -> nn.Module:
    """Convert ``model`` in place for SWAT training; returns the same object.

    Calling it again re-configures from scratch (cached thresholds and step counters reset).
    ``exclude``: module names or fnmatch globs left dense and plain.  ``per_layer``: name ->
    sparsity, merged over the ``budget`` ("uniform" or "erk").  ``dense_output``: leave the
    output layer (:func:`output_layer`) dense and plain, as if excluded; None means "only for
    meprop", whose definition sparsifies hidden layers' gradients, never the logits' (module
    docstring: why it diverges otherwise).  ``cache_weight_threshold``: refresh the weight
    Top-K threshold every ``refresh_every`` steps too, as the paper's code does (default off:
    exact weight Top-K every step; module docstring).  ``block``: B consecutive output channels
    share one weight zero pattern, Top-K over block scores (:mod:`training.blocks`; swat and saw
    modes, topk nchw / chw / hw; a layer uses gcd(its outputs, B)); 1 is unstructured.
    """
    _check_choice("mode", mode, MODES)
    check_topk(topk)
    _check_choice("budget", budget, BUDGETS)
    if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
        raise SwatValueError(f"refresh_every must be an integer >= 1 (1 = exact Top-K every step), "
                             f"got {refresh_every!r}")
    if not isinstance(cache_weight_threshold, bool):
        raise SwatValueError(f"cache_weight_threshold must be True or False, got {cache_weight_threshold!r}")
    blocks.check_block(block)
    if block > 1 and mode not in ("swat", "saw"):
        raise SwatValueError(f"block={block} shapes the weight Top-K of swat and saw modes; mode {mode!r} keeps "
                             f"its weights dense - use block=1 (or mode swat / saw)")
    if block > 1 and topk == "random":
        raise SwatValueError(f"block={block} does not combine with topk 'random' (the unstructured control); "
                             f"use topk nchw, chw or hw with blocks, or block=1")
    if dense_output is not None and not isinstance(dense_output, bool):
        raise SwatValueError(f"dense_output must be True, False or None (None: dense for meprop only), "
                             f"got {dense_output!r}")
    # validate everything before touching the model, so a bad call leaves it as it was
    pats = [exclude] if isinstance(exclude, str) else list(exclude)
    plan_exclude = pats
    keep_out = (mode == "meprop") if dense_output is None else dense_output
    out_name = output_layer(model) if keep_out else None
    if out_name is not None:
        if per_layer and out_name in per_layer:
            raise SwatValueError(f"per_layer names {out_name!r}, the output layer, which {mode} keeps dense here; "
                                 f"drop it from per_layer or pass dense_output=False to sparsify it too")
        plan_exclude = pats + [out_name]
    plan = layer_sparsities(model, sparsity, budget, plan_exclude, per_layer)
    unswatify(model)
    for name, m in prunable_layers(model):
        if name not in plan:
            continue
        orig = type(m)
        m.__class__ = SwatConv2d if isinstance(m, nn.Conv2d) else SwatLinear
        m._swat_orig_class = orig
        m._swat_configure(mode, plan[name], topk, refresh_every, cache_weight_threshold,
                          blocks.layer_block(m.weight.shape[0], block))
    for name, m in model.named_modules():
        if match_any(name, pats):
            continue
        if type(m) is nn.BatchNorm2d:  # every mode: the same math, compiled (training/batchnorm.py)
            m.__class__ = SwatBatchNorm2d
        elif mode not in ("swat", "saw"):
            continue
        elif type(m) is nn.ReLU:
            m.__class__ = memory.SwatReLU
        elif type(m) is nn.MaxPool2d:
            m.__class__ = memory.SwatMaxPool2d
        else:
            continue
        m._swat_orig_class = type(m).__mro__[1]
    return model


def swat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The converted Conv2d / Linear layers, in module order."""
    return [(n, m) for n, m in model.named_modules() if getattr(type(m), "_swat_layer", False)]


def layer_table(model: nn.Module) -> list[dict[str, Any]]:
    """Per converted layer: name, weight shape, inference-form sparsity, topk, mode.

    ``sparsity`` is what the deployed weight has (the realised 1 - kept / numel for swat, 0.0
    otherwise; pruning applies ``train_sparsity``, which keeps exactly that count); the training
    sparsity is ``train_sparsity``.  ``block``: output channels sharing one zero pattern; with
    ``block`` > 1 ``sparsity`` is the realised one, s rounded to the block grid
    (:mod:`training.blocks`), so run.json claims exactly what pruning produces.
    """
    def deployed(m: nn.Module) -> float:
        if m.swat_mode != "swat":
            return 0.0
        if m.swat_block > 1:
            return blocks.block_sparsity(m.weight, m.swat_sparsity, m.swat_topk, m.swat_block)
        # the realised fraction: Top-K keeps at least one entry per group, so at s = 0.999999 a
        # 150-weight layer keeps 1 (0.9933), and that is what the deployed weight has
        n = m.weight.numel()
        return 1.0 - select_bits(m.weight.detach(), m.swat_sparsity, m._swat_weight_topk()).count / n if n else 0.0

    return [{"name": n, "shape": list(m.weight.shape), "sparsity": deployed(m),
             "topk": m.swat_topk, "mode": m.swat_mode, "train_sparsity": m.swat_sparsity, "block": m.swat_block}
            for n, m in swat_layers(model)]


def layer_stats(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per layer, for metrics.jsonl; resets the since-last-call means.

    ``weight_sparsity``: zeros in the weight the layer computes with (TopK(W) for swat/saw).
    ``act_sparsity`` / ``act_sparsity_mean``: realised sparsity of the saved TopK(a_in) on the
    last step / averaged since the last call (drift between refreshes shows here).
    ``weight_sparsity_train_mean``: realised sparsity of the weight the training steps used,
    averaged since the last call (differs from ``weight_sparsity`` with cached weight
    thresholds).  ``act_threshold``: cached K-th magnitude (mean over groups).  meProp reports the realised
    sparsity of the output gradient as ``grad_sparsity`` / ``grad_sparsity_mean``.
    None where a quantity does not apply.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in swat_layers(model):
        w = m.weight.detach()
        if m.swat_mode in ("swat", "saw"):
            kept = (blocks.select_block(w, m.swat_sparsity, m.swat_topk, m.swat_block).count if m.swat_block > 1
                    else select_bits(w, m.swat_sparsity, m._swat_weight_topk()).count)
            wsp = 1.0 - kept / w.numel() if w.numel() else 0.0
        else:
            wsp = float((w == 0).sum()) / w.numel() if w.numel() else 0.0
        thr = m.swat_threshold
        out[name] = {
            "mode": m.swat_mode,
            "steps": m.swat_step,
            "weight_sparsity": wsp,
            "act_sparsity": None if m._swat_act_last is None else 1.0 - m._swat_act_last,
            "act_sparsity_mean": None if not m._swat_act_n else 1.0 - m._swat_act_sum / m._swat_act_n,
            "act_threshold": None if thr is None or thr.numel() == 0 else float(thr.float().mean()),
            "grad_sparsity": None if m._swat_grad_last is None else 1.0 - m._swat_grad_last,
            "grad_sparsity_mean": None if not m._swat_grad_n else 1.0 - m._swat_grad_sum / m._swat_grad_n,
            "weight_sparsity_train_mean": (None if not getattr(m, "_swat_w_n", 0)
                                           else 1.0 - m._swat_w_sum / m._swat_w_n),
        }
        m._swat_w_sum, m._swat_w_n = 0.0, 0
        m._swat_act_sum, m._swat_act_n = 0.0, 0
        m._swat_grad_sum, m._swat_grad_n = 0.0, 0
    return out


def swat_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The per-layer SWAT state a resumed run needs to continue bit for bit.

    ``<layer>.swat_step`` (int64), ``<layer>.swat_threshold`` (float32, when cached),
    ``<layer>.swat_weight_threshold`` (float32, with ``cache_weight_threshold``) and
    ``<layer>.swat_rng`` (uint8 generator state, topk "random" only).  Plain tensors, so the
    dict can go into safetensors.
    """
    state: dict[str, Tensor] = {}
    for name, m in swat_layers(model):
        p = f"{name}." if name else ""
        state[p + "swat_step"] = torch.tensor(m.swat_step, dtype=torch.int64)
        if m.swat_threshold is not None:
            state[p + "swat_threshold"] = m.swat_threshold.detach().clone().contiguous()
        if getattr(m, "swat_weight_threshold", None) is not None:
            state[p + "swat_weight_threshold"] = m.swat_weight_threshold.detach().clone().contiguous()
        if m._swat_rng_state is not None:
            state[p + "swat_rng"] = m._swat_rng_state.clone()
    return state


def load_swat_state_dict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Inverse of :func:`swat_state_dict`, into a model swatified the same way."""
    layers = dict(swat_layers(model))
    if state and not layers:
        raise SwatValueError("model has no SWAT layers; call swatify(model, ...) with the run's settings first")
    for key, value in state.items():
        name, _, field = key.rpartition(".")
        m = layers.get(name)
        if m is None or field not in ("swat_step", "swat_threshold", "swat_rng", "swat_weight_threshold"):
            raise SwatValueError(f"SWAT state key {key!r} does not fit this model; it was saved from a model "
                                 "swatified with different layers (check model name, exclude and mode)")
        if field == "swat_step":
            m.swat_step = int(value.item())
        elif field == "swat_threshold":
            m.swat_threshold = value.detach().to(device=m.weight.device, dtype=torch.float32).clone()
        elif field == "swat_weight_threshold":
            m.swat_weight_threshold = value.detach().to(device=m.weight.device, dtype=torch.float32).clone()
        else:
            if m.swat_topk != "random":
                raise SwatValueError(f"SWAT state key {key!r} holds an RNG state but layer {name!r} uses "
                                     f"topk={m.swat_topk!r}; swatify with topk='random' as the saved run did")
            m._swat_rng_state = value.detach().to("cpu", torch.uint8).clone()

"""An eval-mode view of a model with every BatchNorm folded into the convolution that feeds it.

In eval mode a BatchNorm is a fixed affine map per channel, y = (z − mean)·s + β with s = γ / √(var + ε), so a
convolution whose output goes only into it equals one convolution of weight w·s (per output channel) and bias
(b − mean)·s + β. Attacks run many forward and input-gradient passes of one eval-mode model; the separate
BatchNorm passes are memory-bound, and folding saves them (forward + input gradient on 2 CPU cores, repeated
runs: the resnet18_cpu classifier at batch 64, 32 px 69-86 ms, folded 57-68 ms; the Taskonomy ResNet-18 with one
decoder at batch 8, 256 px 1253 ms, folded 1097 ms; batch 16, 64 px 129 ms, folded 120 ms).

:func:`folded` gives a view that shares every parameter and buffer with the model: its folded weights are
recomputed whenever the model's weights or statistics change (tensor version counters), so one view follows a
model through training. Its outputs equal the model's in eval mode up to float rounding (the folded weights are
rounded once), not bitwise. Pairs are found by tracing each module with ``torch.fx``; a module that does not
trace is searched child by child, and a convolution whose output is also used elsewhere, a module called or
registered twice, a grouped transposed convolution, or a module with hooks, is left as it is.
"""
import copy
import weakref
from collections import Counter

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

_NORMS = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d,
          nn.ConvTranspose1d: nn.BatchNorm1d, nn.ConvTranspose2d: nn.BatchNorm2d, nn.ConvTranspose3d: nn.BatchNorm3d}
_TRANSPOSED = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
               nn.ConvTranspose3d: F.conv_transpose3d}
_VIEWS = weakref.WeakKeyDictionary()  # model -> (its module identities when the view was built, the view)


class FoldedConv(nn.Module):
    """A convolution followed by an eval-mode BatchNorm, computed as one convolution. It holds the two modules
    (not as children: the view shares their tensors, it does not own them) and caches the folded weights until a
    source tensor changes."""

    def __init__(self, conv, norm):
        super().__init__()
        object.__setattr__(self, "conv", conv)
        object.__setattr__(self, "norm", norm)
        self._key, self._folded = None, None

    def _sources(self):
        return [t for t in (self.conv.weight, self.conv.bias, self.norm.weight, self.norm.bias,
                            self.norm.running_mean, self.norm.running_var) if t is not None]

    def weights(self):
        """(weight, bias) of the single convolution, recomputed when a source tensor changed."""
        try:
            key = tuple((t.data_ptr(), t._version) for t in self._sources())
        except RuntimeError:  # inference tensors keep no version counter: recompute every time
            key = None
        if key is None or key != self._key:
            with torch.no_grad():
                conv, norm = self.conv, self.norm
                scale = torch.rsqrt(norm.running_var.float() + norm.eps)
                if norm.weight is not None:
                    scale = scale * norm.weight.float()
                bias = -norm.running_mean.float() * scale
                if conv.bias is not None:
                    bias = bias + conv.bias.float() * scale
                if norm.bias is not None:
                    bias = bias + norm.bias.float()
                # output channels: dimension 0 of a convolution's weight, 1 of a transposed one's (groups == 1)
                shape = (1, -1) if type(conv) in _TRANSPOSED else (-1,)
                shape += (1,) * (conv.weight.dim() - len(shape))
                weight = (conv.weight.float() * scale.view(shape)).to(conv.weight.dtype)
                self._folded = (weight, bias.to(conv.weight.dtype))
            self._key = key
        return self._folded

    def forward(self, x):
        weight, bias = self.weights()
        conv = self.conv
        if type(conv) in _TRANSPOSED:
            return _TRANSPOSED[type(conv)](x, weight, bias, conv.stride, conv.padding, conv.output_padding,
                                           conv.groups, conv.dilation)
        return conv._conv_forward(x, weight, bias)


def _foldable(conv, norm):
    return (type(conv) in _NORMS and type(norm) is _NORMS[type(conv)] and norm.track_running_stats
            and (type(conv) not in _TRANSPOSED or conv.groups == 1)
            and norm.running_mean is not None and not any(
                m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in (conv, norm)))


def _pairs(module, prefix=""):
    """{qualified name of a convolution: qualified name of the BatchNorm it alone feeds} under ``module``."""
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # data-dependent control flow, no forward (containers), ...: search the children
        found = {}
        for name, child in module.named_children():
            found.update(_pairs(child, f"{prefix}{name}."))
        return found
    modules = dict(module.named_modules())
    registered = Counter(id(m) for _, m in module.named_modules(remove_duplicate=False))
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    found = {}
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1
                and len(node.args) == 1 and not node.kwargs and len(source.args) == 1 and not source.kwargs
                # each module called once and registered once: replacing it changes no other use
                and calls[source.target] == calls[node.target] == 1
                and _foldable(modules.get(source.target), modules.get(node.target))
                and registered[id(modules[source.target])] == registered[id(modules[node.target])] == 1):
            found[prefix + source.target] = prefix + node.target
    return found


def _view(module, replaced, name=""):
    """A shallow copy of the module tree with the modules named in ``replaced`` swapped; tensors are shared."""
    if name in replaced:
        return replaced[name]
    view = copy.copy(module)
    view._modules = {child_name: None if child is None else _view(child, replaced,
                                                                  f"{name}.{child_name}" if name else child_name)
                     for child_name, child in module._modules.items()}
    return view


def folded(model):
    """The eval-mode view of ``model`` with its convolution + BatchNorm pairs folded (``model`` itself when it has
    none, or when it already is such a view). Cached per model and rebuilt when its module tree changes."""
    if getattr(model, "is_folded_view", False):
        return model
    identities = tuple(id(m) for m in model.modules())
    cached = _VIEWS.get(model)
    if cached is not None and cached[0] == identities:
        return cached[1]
    modules = dict(model.named_modules())
    pairs = _pairs(model)
    replaced = {}
    for conv, norm in pairs.items():
        replaced[conv] = FoldedConv(modules[conv], modules[norm])
        replaced[norm] = nn.Identity()
    view = model
    if pairs:
        view = _view(model, replaced).eval()
        view.is_folded_view = True
    _VIEWS[model] = (identities, view)
    return view

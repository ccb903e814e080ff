"""Model complexity: parameters and multiply-accumulates (MACs) of one forward pass, for the encoder and each task
head, counted with forward hooks (no extra dependency).

What is counted: convolutions (transposed too) and linear layers, which hold nearly all the arithmetic of the
project's models. A convolution producing an output of N elements costs N · (in_channels / groups) · kernel
elements MACs (a transposed convolution: its *input* elements times out_channels / groups · kernel elements); a
linear layer N_out · in_features. Biases, normalisation, activations, pooling and interpolation are not
counted (each costs about one operation per element, a small fraction of a ResNet's MACs).
"""
import math

import torch
import torch.nn as nn


def layer_macs(module, inputs, output):
    """MACs of one call of a convolution or linear layer (0 for any other module)."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, nn.modules.conv._ConvNd):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def count_macs(module, *inputs):
    """``(total MACs, {submodule name: MACs})`` of ``module(*inputs)`` (per batch: divide by the batch size)."""
    per_name = {}
    names = {m: name for name, m in module.named_modules()}

    def hook(layer, args, output):
        per_name[names[layer]] = per_name.get(names[layer], 0) + layer_macs(layer, args, output)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return sum(per_name.values()), per_name


def parameters(module):
    return sum(p.numel() for p in module.parameters())


def model_complexity(model, size, channels=None):
    """Parameters and MACs per image of a :class:`~mtrobust_fast.models.multitask.MultiTaskModel` on one
    ``size``×``size`` image: ``{"encoder": {...}, "heads": {task: {...}}, "total": {...}}``, each
    ``{"parameters", "macs"}``. A subset of tasks costs the encoder plus its heads (see :func:`set_complexity`)."""
    channels = channels or model.config.get("input_channels", 3)
    was_training = model.training
    model.eval()
    try:
        x = torch.rand(1, channels, size, size, device=next(model.parameters()).device)
        total, per_name = count_macs(model, x)
    finally:
        model.train(was_training)

    def under(prefix):
        return sum(v for name, v in per_name.items() if name == prefix or name.startswith(prefix + "."))

    heads = {name: {"parameters": parameters(head), "macs": under(f"decoders.{name}")}
             for name, head in model.decoders.items()}
    return {"encoder": {"parameters": parameters(model.encoder), "macs": under("encoder")}, "heads": heads,
            "total": {"parameters": parameters(model), "macs": total}}


def set_complexity(complexity, tasks):
    """Parameters and MACs of the model restricted to ``tasks`` (names): the encoder plus those heads."""
    parts = [complexity["encoder"]] + [complexity["heads"][t] for t in tasks]
    return {key: sum(part[key] for part in parts) for key in ("parameters", "macs")}

"""Linear centred kernel alignment (CKA, Kornblith et al., ICML 2019) between two models' representations of the
same images: how similar two encoders' features are, invariant to rotations and isotropic scaling of either.

With X [n, p] and Y [n, q] the features of n images (each image's feature map flattened), and K = XXᵀ, L = YYᵀ
their Gram matrices centred as HKH (H = I − 11ᵀ/n),

    CKA(X, Y) = ⟨HKH, HLH⟩_F / (‖HKH‖_F · ‖HLH‖_F),

which equals ‖YcᵀXc‖²_F / (‖XcᵀXc‖_F · ‖YcᵀYc‖_F) for the column-centred features; the Gram form costs n×n memory
whatever the feature size. 1 for representations equal up to an orthogonal map and a scale; NaN when either
representation is constant over the images.
"""
import torch
from tqdm import tqdm


def gram(features):
    """The centred Gram matrix HKH [n, n] (float64) of features [n, ...]."""
    x = features.detach().double().flatten(1)
    k = x @ x.T
    return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()


def linear_cka(x, y):
    """Linear CKA of two representations of the same n images ([n, ...] each, any feature shapes)."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"x and y must hold the same n >= 2 images, got {x.shape[0]} and {y.shape[0]}")
    return cka_from_grams(gram(x), gram(y))


def cka_from_grams(k, l):
    """CKA of two centred Gram matrices (see :func:`gram`)."""
    denominator = k.norm() * l.norm()
    return float((k * l).sum() / denominator) if denominator > 0 else float("nan")


@torch.no_grad()
def encoder_features(model, loader, device=None, pool=False, progress=False, desc="features"):
    """The encoder's representation of every image of ``loader`` ([n, C·H·W], or [n, C] with ``pool``: global
    average over positions), in loader order, on the CPU in float64. ``progress``: a bar over the batches."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            x = batch[0].to(device)
            features = model.encode(x)
            features = features.mean(dim=(2, 3)) if pool and features.dim() == 4 else features
            chunks.append(features.flatten(1).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(chunks)

"""Training-time data augmentation, applied to whole batches on the training device.

Every spatial target and mask moves with its image, so a dense task stays aligned with its input:

- ``flip``: each sample is mirrored left-right with probability 1/2. A task whose target holds a horizontal
  direction says how its channels change sign under the mirror (``mirror_signs`` of its record: the surface
  normal's x component flips); labels, depths, edges, curvatures and masks are mirrored as they are.
- ``crop``: each sample is enlarged by 1.25 and a random window of the original size is cut from it (GAT's
  CIFAR recipe: resize 32 → 40, random 32 crop, no padding). Images and real-valued targets are resized
  bilinearly, labels and masks by nearest neighbour, so no label is ever blended with another.

Targets without the image's height and width (class labels, multi-label vectors) are left alone, and targets
made from the images by the objective (GAT's rotations, jigsaws, HOG) are made from the augmented ones. The draws
come from torch's global generator, which the trainer re-seeds every epoch, so a resumed run augments exactly as an
uninterrupted one; with ``none`` nothing is drawn.
"""
import torch
import torch.nn.functional as F

AUGMENTS = ("none", "flip", "crop", "crop+flip")
CROP_ZOOM = 1.25


def check(name):
    if name not in AUGMENTS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTS)}, got {name!r}")
    return name


class Augment:
    """``augment(images, targets, masks)`` → the augmented batch (new tensors; the inputs are kept).
    ``records``: {task name: task record} (for ``mirror_signs``)."""

    def __init__(self, name, records):
        self.name = check(name)
        self.flip = "flip" in name
        self.crop = "crop" in name
        self.signs = {n: getattr(r, "mirror_signs", ()) for n, r in records.items()}

    def __bool__(self):
        return self.flip or self.crop

    def __call__(self, images, targets, masks):
        size = images.shape[-2:]

        def spatial(tensor):
            return tensor is not None and tensor.dim() >= 3 and tensor.shape[-2:] == size

        if self.crop:
            count = images.shape[0]
            big = [round(s * CROP_ZOOM) for s in size]
            tops = torch.randint(0, big[0] - size[0] + 1, (count,)).tolist()
            lefts = torch.randint(0, big[1] - size[1] + 1, (count,)).tolist()

            def crop(tensor):
                return _resized_crops(tensor, big, size, tops, lefts) if spatial(tensor) else tensor

            images = crop(images)
            targets = {k: crop(v) for k, v in targets.items()}
            masks = {k: crop(v) for k, v in masks.items()}
        if self.flip:
            mirrored = (torch.rand(images.shape[0]) < 0.5).to(images.device)

            def flip(tensor, signs=()):
                if not spatial(tensor):
                    return tensor
                flipped = tensor.flip(-1)
                if signs:
                    flipped = flipped * torch.tensor(signs, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
                return torch.where(mirrored.view(-1, *[1] * (tensor.dim() - 1)), flipped, tensor)

            images = flip(images)
            targets = {k: flip(v, self.signs.get(k, ())) for k, v in targets.items()}
            masks = {k: flip(v) for k, v in masks.items()}
        return images, targets, masks


def _resized_crops(tensor, big, size, tops, lefts):
    """``tensor`` [B, ..., H, W] enlarged to ``big`` then cut per sample at (``tops``, ``lefts``) back to ``size``.
    Floating tensors are resized bilinearly; integer labels and boolean masks by nearest neighbour."""
    shape, dtype = tensor.shape, tensor.dtype
    flat = tensor.reshape(shape[0], -1, *shape[-2:])
    if dtype.is_floating_point:
        grown = F.interpolate(flat, size=big, mode="bilinear", align_corners=False)
    else:
        grown = F.interpolate(flat.float(), size=big, mode="nearest-exact").to(dtype)
    cut = torch.stack([g[:, t:t + size[0], l:l + size[1]] for g, t, l in zip(grown, tops, lefts)])
    return cut.reshape(*shape[:-2], *size)

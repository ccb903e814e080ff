"""Self-supervised auxiliary tasks of GAT as task records: each makes its own labels from the images.

Every auxiliary task is a task record of the open protocol (see :mod:`mtrobust_fast.tasks.classification`) plus
``transform(images, generator) -> (images, labels)``: the images the task's head sees and its labels.

- ``rotation``: each image turned by k·90°, k in {0, 1, 2, 3}; the k of a batch are balanced (a shuffled list
  holding each value B/4 times, the remainder drawn at random), 4-way cross-entropy.
- ``jigsaw``: the image cut into a g×g grid of tiles and the tiles reordered by one of P fixed permutations
  (permutation 0 is the identity); the label is the permutation's index, drawn uniformly. The permutations are
  drawn from ``seed`` and stored with the model's config, so a checkpoint restores them (the GAT code drew them
  unseeded at start-up and never saved them).
- ``autoencoder``: the head reconstructs its input image; per-sample L1 loss.
- ``hog``: the head draws the image's HOG visualisation (9 orientations, 4-px cells), computed in torch on the
  batch's device (:func:`hog_image`); per-sample L1 loss.
- ``depth``: the head predicts the scene's depth, which comes with the data (the synthetic object set's
  z-depth, encoded as Taskonomy's log depth, masked where there is no geometry); masked per-sample L1. A
  labelled task: ``from_data`` is True, and rotation/jigsaw ``warp`` its maps along with the images.

Images never change at validation or test time: only training objectives call ``transform``.
"""
import functools
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import torch

from mtrobust_fast.tasks import classification
from mtrobust_fast.registry import Registry, Setting, integer
from mtrobust_fast.tasks import dense_scores, dense_stats, l1_loss

AUXILIARY = Registry("auxiliary task")  # every auxiliary task registers itself here


class AuxiliaryTask:
    """What every auxiliary task adds to its record: its ``kind`` (the name it is registered under), ``order``
    (under GAT's shared routing the transforms run in increasing order, because a later task's targets come from
    the images the earlier ones made), the ``settings`` it declares, and how it is built (:meth:`create`, from a
    run's seed and settings) and rebuilt from a model config (:meth:`from_config`)."""

    order = 0
    settings = ()
    from_data = False  # labels that come with the data instead of from the images
    warp = None  # warp(maps, labels): the transform applied to per-pixel maps, for tasks that move pixels

    @property
    def kind(self):
        return type(self).registered_name

    @classmethod
    def create(cls, seed=0, **settings):
        return cls()

    @classmethod
    def from_config(cls, name, config):
        return cls(name)

    def to_config(self):
        return {"kind": self.kind}


def _generator_draws(generator):
    """Keyword arguments drawing on the CPU from ``generator`` (torch's global one when None)."""
    return {"generator": generator} if generator is not None else {}


def balanced_labels(batch, classes, generator=None):
    """``batch`` labels in 0..classes-1, each value ``batch // classes`` times, the rest at random, shuffled."""
    draws = _generator_draws(generator)
    labels = torch.arange(classes).repeat(batch // classes)
    labels = torch.cat([labels, torch.randint(0, classes, (batch - len(labels),), **draws)])
    return labels[torch.randperm(batch, **draws)]


def rotate(images, quarter_turns):
    """Each image turned counter-clockwise by its own number of quarter turns ``[B]``."""
    out = images.clone()
    for k in range(1, 4):
        chosen = (quarter_turns == k).nonzero().flatten().to(images.device)
        if chosen.numel():
            out[chosen] = torch.rot90(images[chosen], k, dims=(-2, -1))
    return out


@AUXILIARY.register("rotation")
@dataclass(frozen=True)
class RotationTask(AuxiliaryTask, classification.ClassificationTask):
    """4-way rotation prediction."""

    name: str = "rotation"
    classes: int = 4
    order = 0

    def transform(self, images, generator=None):
        labels = balanced_labels(images.shape[0], 4, generator)
        return rotate(images, labels), labels.to(images.device)

    def warp(self, maps, labels):
        """The same turns applied to per-pixel maps [B, C, H, W] (labels of the data that must follow)."""
        return rotate(maps, labels)


def jigsaw_permutations(grid, count, seed):
    """``count`` distinct permutations of ``grid**2`` tiles drawn from ``seed``; the first is the identity."""
    tiles = grid * grid
    if count < 2 or count > min(1000, int(np.prod(np.arange(1, tiles + 1)))):
        raise ValueError(f"jigsaw: permutations must be between 2 and {min(1000, int(np.prod(np.arange(1, tiles + 1))))}"
                         f" for a {grid}x{grid} grid, got {count}")
    rng = np.random.default_rng(seed)
    found = [tuple(range(tiles))]
    while len(found) < count:
        candidate = tuple(int(i) for i in rng.permutation(tiles))
        if candidate not in found:
            found.append(candidate)
    return tuple(found)


JIGSAW_PERMUTATIONS = Setting("jigsaw_permutations", integer, 4, low=2, high=1000,
                              help="jigsaw: the number of tile permutations (its classes)")
JIGSAW_GRID = Setting("jigsaw_grid", integer, 2, low=2, help="jigsaw: tiles per side")


@AUXILIARY.register("jigsaw")
@dataclass(frozen=True)
class JigsawTask(AuxiliaryTask, classification.ClassificationTask):
    """Which of ``permutations`` reordered the g×g tiles of the image."""

    name: str = "jigsaw"
    classes: int = 4
    grid: int = 2
    seed: int = 0
    permutations: tuple = field(default=(), compare=False)
    order = 1
    settings = (JIGSAW_PERMUTATIONS, JIGSAW_GRID)

    @classmethod
    def create(cls, seed=0, jigsaw_permutations=4, jigsaw_grid=2):
        """The task of a run: its permutations drawn from the run's ``seed``."""
        return cls(classes=jigsaw_permutations, grid=jigsaw_grid, seed=seed)

    @classmethod
    def from_config(cls, name, config):
        return cls(name=name, classes=int(config["classes"]), grid=int(config["grid"]), seed=int(config["seed"]),
                   permutations=tuple(tuple(p) for p in config["permutations"]))

    def __post_init__(self):
        super().__post_init__()
        if self.grid < 2:
            raise ValueError(f"jigsaw: grid must be at least 2, got {self.grid}")
        if not self.permutations:
            object.__setattr__(self, "permutations", jigsaw_permutations(self.grid, self.classes, self.seed))
        if len(self.permutations) != self.classes or any(sorted(p) != list(range(self.grid ** 2))
                                                         for p in self.permutations):
            raise ValueError(f"jigsaw: needs {self.classes} permutations of {self.grid ** 2} tiles")

    def shuffle(self, images, labels):
        """The images with their tiles reordered by permutation ``labels[b]`` (tile i goes to place p[i])."""
        height, width = images.shape[-2:]
        if height % self.grid or width % self.grid:
            raise ValueError(f"jigsaw: a {height}x{width} image does not split into a {self.grid}x{self.grid} grid")
        th, tw, g = height // self.grid, width // self.grid, self.grid
        tiles = images.reshape(*images.shape[:-2], g, th, g, tw).movedim(-3, -2).flatten(-4, -3)  # [B, C, g*g, th, tw]
        order = torch.tensor(self.permutations, device=images.device)[labels.to(images.device)]  # [B, g*g]
        placed = torch.empty_like(tiles)
        index = order[:, None, :, None, None].expand_as(tiles)
        placed.scatter_(2, index, tiles)
        return placed.unflatten(2, (g, g)).movedim(-2, -3).reshape(images.shape)

    def transform(self, images, generator=None):
        labels = torch.randint(0, self.classes, (images.shape[0],), **_generator_draws(generator))
        return self.shuffle(images, labels), labels.to(images.device)

    def warp(self, maps, labels):
        """The same tile orders applied to per-pixel maps [B, C, H, W]."""
        return self.shuffle(maps, labels)

    def to_config(self):
        return {"kind": self.kind, "classes": self.classes, "grid": self.grid, "seed": self.seed,
                "permutations": [list(p) for p in self.permutations]}


@AUXILIARY.register("autoencoder")
@dataclass(frozen=True)
class AutoencoderTask(AuxiliaryTask):
    """Reconstruct the input image (3 channels in [0, 1]); per-sample L1."""

    name: str = "autoencoder"
    channels: int = 3
    order = 2
    higher_is_better = MappingProxyType({"l1": False, "mse": False})

    def loss(self, output, target, mask=None):
        return l1_loss(output, target, mask)

    def error(self, output, target, mask=None):
        return l1_loss(output, target, mask)

    def divergence(self, output, reference, mask=None):
        return l1_loss(output, reference, mask)

    def metric_stats(self, output, target, mask=None):
        return dense_stats(output, target, mask)

    def metric_scores(self, stats):
        return dense_scores(stats)

    def transform(self, images, generator=None):
        return images, images


def line_pixels(r0, c0, r1, c1):
    """The pixels of the digital straight line from (r0, c0) to (r1, c1), both ends included (Bresenham: step
    along the longer axis, move along the other when the accumulated error says so)."""
    pixels = []
    dr, dc = abs(r1 - r0), abs(c1 - c0)
    sr, sc = (1 if r1 > r0 else -1), (1 if c1 > c0 else -1)
    steep = dr > dc
    if steep:
        r0, c0, r1, c1, dr, dc, sr, sc = c0, r0, c1, r1, dc, dr, sc, sr
    error, r, c = 2 * dr - dc, r0, c0
    for _ in range(dc):
        pixels.append((c, r) if steep else (r, c))
        while error >= 0:
            r += sr
            error -= 2 * dc
        c += sc
        error += 2 * dr
    pixels.append((c1, r1) if steep else (r1, c1))
    return pixels


@functools.lru_cache(maxsize=32)
def _hog_masks(height, width, cell, orientations):
    """[orientations, H, W] 0/1 maps: the pixels of each orientation's line in every cell. Each line runs through
    the cell's centre at the middle angle of its bin, with half-length cell // 2 - 1; its ends are computed as
    ``int(centre ± offset)`` in float64 from the absolute pixel position, as scikit-image draws them."""
    masks = np.zeros((orientations, height, width), dtype=np.float32)
    radius = cell // 2 - 1
    for o in range(orientations):
        angle = np.pi * (o + 0.5) / orientations
        dr, dc = radius * np.sin(angle), radius * np.cos(angle)
        for r in range(height // cell):
            for c in range(width // cell):
                row, col = r * cell + cell // 2, c * cell + cell // 2
                for pr, pc in line_pixels(int(row - dc), int(col + dr), int(row + dc), int(col - dr)):
                    masks[o, pr, pc] = 1
    return torch.from_numpy(masks)


def hog_image(images, orientations=9, cell=4):
    """The HOG visualisation ``[B, 1, H, W]`` of images ``[B, C, H, W]``: central-difference gradients (0 on the
    border rows/columns), per pixel the channel with the largest gradient magnitude, per cell the mean magnitude
    of the pixels whose orientation (in [0°, 180°)) falls in each of ``orientations`` bins, drawn as a line per
    bin weighted by its value (as ``skimage.feature.hog(..., visualize=True)`` draws it)."""
    x = images.detach().float() if images.dtype in (torch.float16, torch.bfloat16) else images.detach()
    g_row, g_col = torch.zeros_like(x), torch.zeros_like(x)
    g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
    g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
    magnitude = torch.hypot(g_row, g_col)
    strongest = magnitude.argmax(1, keepdim=True)
    g_row, g_col, magnitude = (t.gather(1, strongest)[:, 0] for t in (g_row, g_col, magnitude))
    orientation = torch.rad2deg(torch.atan2(g_row, g_col)) % 180
    batch, height, width = magnitude.shape
    rows, cols = height // cell, width // cell
    width_deg = 180 / orientations
    magnitude, orientation = magnitude[:, :rows * cell, :cols * cell], orientation[:, :rows * cell, :cols * cell]
    bins = (orientation // width_deg).clamp_max(orientations - 1).long()
    votes = torch.zeros(batch, orientations, rows * cell, cols * cell, dtype=x.dtype, device=x.device)
    votes.scatter_(1, bins[:, None], magnitude[:, None])
    histogram = votes.reshape(batch, orientations, rows, cell, cols, cell).sum((3, 5)) / (cell * cell)
    per_pixel = histogram.repeat_interleave(cell, 2).repeat_interleave(cell, 3)
    masks = _hog_masks(height, width, cell, orientations).to(device=x.device, dtype=x.dtype)
    out = torch.zeros(batch, 1, height, width, dtype=x.dtype, device=x.device)
    out[:, 0, :rows * cell, :cols * cell] = (per_pixel * masks[:, :rows * cell, :cols * cell]).sum(1)
    return out


@AUXILIARY.register("hog")
@dataclass(frozen=True)
class HogTask(AutoencoderTask):
    """Draw the input's HOG visualisation (1 channel); per-sample L1."""

    name: str = "hog"
    channels: int = 1
    order = 3

    def transform(self, images, generator=None):
        return images, hog_image(images)


@AUXILIARY.register("depth")
@dataclass(frozen=True)
class DepthTask(AutoencoderTask):
    """Predict the depth map that comes with the data (1 channel, masked L1); its labels are not made from the
    images, so ``transform`` is not used: the training objective takes them from the batch."""

    name: str = "depth"
    channels: int = 1
    order = 4
    from_data = True

    def transform(self, images, generator=None):
        raise TypeError("depth labels come with the data, not from the images")


def make_task(kind, **options):
    """The auxiliary task ``kind`` built from its record's own fields (jigsaw: classes, grid, seed)."""
    return AUXILIARY.get(kind)(**options)


def for_run(kind, seed, settings):
    """The auxiliary task ``kind`` of a training run with ``seed``, from the run's ``settings`` (a mapping that
    holds at least the settings the task declares, e.g. a training config's fields)."""
    cls = AUXILIARY.get(kind)
    return cls.create(seed, **{s.name: settings[s.name] for s in cls.settings if settings.get(s.name) is not None})


def from_config(name, config):
    """The record a ``to_config`` dict describes."""
    return AUXILIARY.get(config.get("kind")).from_config(name, config)

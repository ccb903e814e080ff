"""Adversarial-example panels: for one image and one attacked set, the clean and adversarial inputs, the
perturbation, and every task's target and prediction before and after the attack, as one PNG.

How outputs are drawn: segmentation logits (more than 3 channels) as the arg-max class in a fixed 18-colour
palette (class 0, background, black); one-channel outputs (depth, curvature, edges...) with the viridis
colour map on one scale shared by target, clean and adversarial prediction (the target's valid range, or the
clean prediction's when there is no target image); three-channel outputs (surface normals, images) as RGB of
(v + 1)/2 for values in [−1, 1]; a classifier's logits as its top class and probability. The perturbation δ is
shown as 0.5 + δ/(2·max|δ|), so grey is no change and its largest entry reaches black or white.
"""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

# One colour per Taskonomy segmentation class (0: background, 1-16: objects, 17: uncertain).
PALETTE = np.array([
    [0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
    [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 128]], dtype=np.float64) / 255


def _rgb(image):
    """[C, H, W] in [0, 1] -> [H, W, 3] numpy (one channel repeated)."""
    array = image.detach().float().cpu().clamp(0, 1).numpy()
    return np.repeat(array, 3, axis=0).transpose(1, 2, 0) if array.shape[0] == 1 else array[:3].transpose(1, 2, 0)


def perturbation_image(x, adv):
    """The perturbation of one image as [H, W, 3] in [0, 1] (grey = no change) and its largest |δ|."""
    delta = (adv - x).detach().float().cpu()
    top = float(delta.abs().max())
    shown = 0.5 + delta / (2 * top) if top > 0 else torch.full_like(delta, 0.5)
    return _rgb(shown), top


def output_image(output, scale=None):
    """One task's output for one image ([C, H, W] dense, or [K] logits) as (kind, picture): ("image",
    [H, W, 3]) or ("text", str). ``scale``: (low, high) for one-channel outputs."""
    output = output.detach().float().cpu()
    if output.dim() == 1:
        probabilities = output.softmax(0) if output.numel() > 1 else output.sigmoid()
        top = int(probabilities.argmax())
        return "text", f"class {top}\np = {float(probabilities[top]):.2f}"
    channels = output.shape[0]
    if channels > 3:
        return "image", PALETTE[output.argmax(0).numpy() % len(PALETTE)]
    if channels == 3:
        return "image", ((output.clamp(-1, 1) + 1) / 2).numpy().transpose(1, 2, 0)
    low, high = scale if scale is not None else (float(output[0].min()), float(output[0].max()))
    normalised = ((output[0] - low) / (high - low if high > low else 1.0)).clamp(0, 1).numpy()
    return "image", matplotlib.colormaps["viridis"](normalised)[..., :3]


def target_image(target, mask=None):
    """A dense target for one image ([H, W] class labels or [C, H, W] values) as [H, W, 3], invalid pixels grey."""
    target = target.detach().cpu()
    if target.dim() == 2:
        picture = PALETTE[target.long().numpy() % len(PALETTE)]
    else:
        picture = output_image(target.float(), _range(target, mask))[1]
    if mask is not None:
        invalid = ~mask.detach().cpu().bool().reshape(mask.shape[-2:]).numpy()
        picture = picture.copy()
        picture[invalid] = 0.5
    return picture


def _range(values, mask=None):
    values = values.detach().float().cpu()[0]
    if mask is not None:
        values = values[mask.detach().cpu().bool().reshape(values.shape)]
    return (float(values.min()), float(values.max())) if values.numel() else (0.0, 1.0)


def draw(path, x, adv, clean_outputs, adv_outputs, targets, masks=None, title="", dpi=100):
    """Write the panel of one image to ``path``: ``x``/``adv`` [C, H, W] in [0, 1]; ``clean_outputs`` /
    ``adv_outputs`` ``{task: output of this image}``; ``targets``/``masks`` ``{task: this image's target}``."""
    fig = figure(x, adv, clean_outputs, adv_outputs, targets, masks, title)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _class_legend(ax, pictures):
    """A legend of the palette classes present in a segmentation row's pictures."""
    present = sorted({int(c) for picture in pictures for c in picture})
    handles = [Patch(facecolor=PALETTE[c % len(PALETTE)], edgecolor="grey", label=f"class {c}") for c in present]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=6, frameon=False)


def figure(x, adv, clean_outputs, adv_outputs, targets, masks=None, title=""):
    """The panel of one image as a matplotlib figure (see :func:`draw`): one-channel rows and the perturbation
    carry a colour bar of their scale, segmentation rows a legend of the classes they show."""
    masks = masks or {}
    tasks = list(clean_outputs)
    fig, axes = plt.subplots(1 + len(tasks), 3, figsize=(7.5, 2.5 * (1 + len(tasks))), squeeze=False)
    picture, top = perturbation_image(x, adv)
    row = [("clean input", _rgb(x)), ("adversarial input", _rgb(adv)), (f"perturbation (max |δ| {top:.4f})", picture)]
    for ax, (name, image) in zip(axes[0], row):
        ax.imshow(image)
        ax.set_title(name, fontsize=8)
    fig.colorbar(ScalarMappable(Normalize(-max(top, 1e-12), max(top, 1e-12)), "gray"), ax=axes[0][2], fraction=0.046, pad=0.04,
                 label="δ per channel")
    for r, task in enumerate(tasks, start=1):
        clean, adversarial = clean_outputs[task], adv_outputs[task]
        target, mask = targets.get(task), masks.get(task)
        dense_target = target is not None and target.dim() >= 2
        scale = None
        if clean.dim() == 3 and clean.shape[0] == 1:
            scale = _range(target, mask) if dense_target and target.dim() == 3 else _range(clean)
        cells = [("target", ("image", target_image(target, mask)) if dense_target else
                  ("text", "" if target is None else f"label {int(target)}"))]
        cells += [("clean prediction", output_image(clean, scale)), ("adversarial prediction", output_image(adversarial, scale))]
        for ax, (name, (kind, value)) in zip(axes[r], cells):
            if kind == "image":
                ax.imshow(value)
            else:
                ax.text(0.5, 0.5, value, ha="center", va="center", fontsize=10, transform=ax.transAxes)
            ax.set_title(f"{task}: {name}", fontsize=8)
        if scale is not None:  # one channel: the viridis scale shared by the row
            fig.colorbar(ScalarMappable(Normalize(*scale), "viridis"), ax=axes[r][2], fraction=0.046, pad=0.04)
        elif clean.dim() == 3 and clean.shape[0] > 3:  # segmentation: which colour is which class
            classes = [clean.argmax(0).flatten().tolist(), adversarial.argmax(0).flatten().tolist()]
            if target is not None and target.dim() == 2:
                valid = target if mask is None else target[mask.bool().reshape(target.shape)]
                classes.append(valid.flatten().long().tolist())
            _class_legend(axes[r][2], classes)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


class PanelCollector:
    """Keeps the first ``count`` images of an evaluation (inputs, targets, masks, adversarial inputs per
    attacked set) as an :func:`mtrobust_fast.evaluation.evaluate` ``on_batch`` callback, then writes their
    panels with :meth:`write`."""

    def __init__(self, count):
        self.count, self.items, self.sets = count, [], None

    def __call__(self, x, targets, masks, adv, sets):
        self.sets = sets
        for b in range(x.shape[0]):
            if len(self.items) >= self.count:
                return
            self.items.append((x[b].cpu(), {k: v[b].cpu() for k, v in targets.items()},
                               {k: v[b].cpu() for k, v in masks.items()}, adv[:, b].cpu()))

    def write(self, model, folder, label=str, dpi=100):
        """One PNG per kept image and attacked set in ``folder`` (the tasks that have targets); returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        paths = []
        try:
            for index, (x, targets, masks, adv) in enumerate(self.items):
                with torch.no_grad():
                    clean = model(x[None].to(device))
                    adversarial = model(adv.to(device))
                for s, attacked in enumerate(self.sets):
                    name = label(attacked)
                    paths.append(draw(folder / f"image{index:03d}_{name}.png", x, adv[s],
                                      {k: clean[k][0] for k in targets}, {k: adversarial[k][s] for k in targets},
                                      targets, masks, title=f"image {index}, attacked set {name}", dpi=dpi))
        finally:
            model.train(was_training)
        return paths

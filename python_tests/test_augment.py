"""Training augmentation: every dense target and mask moves with its image, normals' x flips sign under a mirror,
labels are never blended, class labels are left alone; bad names are refused."""
import pytest
import torch

from mtrobust_fast import tasks as task_registry
from mtrobust_fast.training import TrainConfig
from mtrobust_fast.training.augment import Augment

RECORDS = {t.name: t for t in task_registry.resolve("sdn")}


def _batch(count=6, size=16):
    """Images whose red channel is a left-to-right ramp; depth equal to the red channel; labels that threshold it;
    normals whose x component is the ramp too; class labels."""
    ramp = torch.linspace(0, 1, size).expand(count, size, size)
    noise = torch.rand(count, 2, size, size)
    images = torch.cat([ramp[:, None], noise], 1)
    targets = {"segment_semantic": (ramp > 0.5).long() + 2, "depth_zbuffer": ramp[:, None].clone(),
               "normal": torch.stack([ramp, torch.zeros_like(ramp), torch.ones_like(ramp)], 1),
               "class": torch.arange(count)}
    masks = {"segment_semantic": (ramp < 0.9)[:, None], "depth_zbuffer": torch.ones(count, 1, size, size, dtype=torch.bool)}
    return images, targets, masks


def test_flip_moves_targets_with_their_image_and_negates_the_normal_x():
    images, targets, masks = _batch()
    kept = images.clone()
    torch.manual_seed(0)
    out_images, out_targets, out_masks = Augment("flip", RECORDS)(images, targets, masks)
    mirrored = out_images[:, 0, 0, 0] > 0.5  # the ramp now falls from the left
    assert 0 < mirrored.sum() < len(mirrored)
    for i, flipped in enumerate(mirrored.tolist()):
        same = (lambda t: t.flip(-1)) if flipped else (lambda t: t)
        assert torch.equal(out_images[i], same(images[i]))
        assert torch.equal(out_targets["segment_semantic"][i], same(targets["segment_semantic"][i]))
        assert torch.equal(out_masks["segment_semantic"][i], same(masks["segment_semantic"][i]))
        sign = torch.tensor([-1.0 if flipped else 1.0, 1.0, 1.0]).view(3, 1, 1)
        assert torch.equal(out_targets["normal"][i], same(targets["normal"][i]) * sign)
    assert torch.equal(out_targets["class"], targets["class"])
    assert torch.equal(images, kept), "the input batch must be kept"


def test_crop_keeps_dense_targets_aligned_and_labels_unblended():
    images, targets, masks = _batch(count=8, size=32)
    torch.manual_seed(1)
    out_images, out_targets, out_masks = Augment("crop+flip", RECORDS)(images, targets, masks)
    assert out_images.shape == images.shape and out_targets["segment_semantic"].dtype == torch.int64
    assert out_masks["segment_semantic"].dtype == torch.bool
    # A target resized like its image stays equal to it, whatever window each sample got.
    assert torch.equal(out_targets["depth_zbuffer"][:, 0], out_images[:, 0])
    # Windows differ between samples (each has its own offset) and zoom in (the ramp's range shrinks).
    spans = out_images[:, 0, 0].amax(1) - out_images[:, 0, 0].amin(1)
    assert (spans < 0.9).all() and len(set(out_images[:, 0, 0, :].sum(1).tolist())) > 1
    # Labels keep their original values and agree with the image they were made from except next to the edge.
    labels = out_targets["segment_semantic"]
    assert set(labels.unique().tolist()) <= {2, 3}
    disagree = (labels != (out_images[:, 0] > 0.5).long() + 2).sum(-1)
    assert (disagree <= 1).all()
    assert torch.equal(out_targets["class"], targets["class"])


def test_none_is_falsy_and_unknown_names_are_refused():
    assert not Augment("none", RECORDS)
    assert Augment("crop", RECORDS) and Augment("flip", RECORDS)
    with pytest.raises(ValueError, match="augment must be one of"):
        Augment("rotate", RECORDS)
    with pytest.raises(ValueError, match="augment must be one of"):
        TrainConfig(data="d", out="o", augment="mirror")

"""The task registry: decoding of the real Taskonomy encodings, per-sample losses/errors, metrics, resolve, weights."""
import io
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from PIL import Image

from mtrobust_fast import tasks
from mtrobust_fast.tasks import TASKS, TaskMeter, get_task, resolve, task_string, task_weights

FAST = settings(max_examples=25, deadline=None)


def png_roundtrip(array):
    """The PIL image Pillow gives back for an array written as PNG (16-bit arrays stay 16-bit)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image


# ---- registry ----

def test_registry_letters_names_tags_channels():
    assert "".join(t.letter for t in TASKS) == "sdDnkKeEprA"
    expected = {
        "s": ("segment_semantic", "segmentsemantic", 18), "d": ("depth_zbuffer", "depth_zbuffer", 1),
        "D": ("depth_euclidean", "depth_euclidean", 1), "n": ("normal", "normal", 3),
        "k": ("keypoints2d", "keypoints2d", 1), "K": ("keypoints3d", "keypoints3d", 1),
        "e": ("edge_texture", "edge_texture", 1), "E": ("edge_occlusion", "edge_occlusion", 1),
        "p": ("principal_curvature", "principal_curvature", 2), "r": ("reshading", "reshading", 1),
        "A": ("autoencoder", "rgb", 3),
    }
    for task in TASKS:
        assert (task.name, task.tag, task.channels) == expected[task.letter]
    assert get_task("A").folder == "rgb"
    assert get_task("s").folder == "segment_semantic"


def test_tasks_are_frozen_and_hashable():
    task = get_task("d")
    with pytest.raises(Exception):
        task.channels = 2
    assert len({task, get_task("depth_zbuffer")}) == 1
    assert pickle.loads(pickle.dumps(task)) is task


def test_resolve_orders_canonically_and_accepts_names():
    assert task_string("Esd") == "sdE"
    assert [t.name for t in resolve(["normal", "s", "edge_occlusion"])] == ["segment_semantic", "normal",
                                                                           "edge_occlusion"]
    assert resolve("normal") == [get_task("n")]
    assert resolve("segmentsemantic") == [get_task("s")]
    assert resolve(get_task("r")) == [get_task("r")]


@FAST
@given(st.lists(st.sampled_from(list("sdDnkKeEprA")), min_size=1, max_size=11, unique=True))
def test_resolve_any_order_gives_canonical_order(letters):
    got = task_string("".join(letters))
    assert sorted(got) == sorted(letters)
    assert got == "".join(c for c in "sdDnkKeEprA" if c in letters)


def test_resolve_errors_name_the_problem():
    with pytest.raises(ValueError, match="'x'"):
        resolve("sdx")
    with pytest.raises(ValueError, match="'S'"):
        resolve("S")  # letters are case-sensitive
    with pytest.raises(ValueError, match="twice"):
        resolve("ss")
    with pytest.raises(ValueError, match="twice"):
        resolve(["s", "segment_semantic"])
    with pytest.raises(ValueError, match="no tasks"):
        resolve("")
    with pytest.raises(ValueError, match="'depth'"):
        resolve(["depth"])


def test_uniform_weights():
    assert task_weights("sdn") == pytest.approx({"segment_semantic": 1 / 3, "depth_zbuffer": 1 / 3, "normal": 1 / 3})
    assert task_weights("sd", main="s") == {"segment_semantic": 0.5, "depth_zbuffer": 0.5}


def test_zamir_weights_follow_the_table():
    assert task_weights("sdnE", main="s", mode="zamir") == {
        "segment_semantic": 1.0, "depth_zbuffer": 0.01, "normal": 0.1, "edge_occlusion": 0.1}
    assert task_weights("dn", main="d", mode="zamir") == {"depth_zbuffer": 1.0, "normal": 0.01}
    assert task_weights("sdn", main="n", mode="zamir") == {"segment_semantic": 0.1, "depth_zbuffer": 0.01,
                                                           "normal": 1.0}
    assert task_weights("sdD", main="depth_euclidean", mode="zamir") == {
        "segment_semantic": 0.1, "depth_zbuffer": 0.01, "depth_euclidean": 1.0}
    assert task_weights("sE", main="E", mode="zamir") == {"segment_semantic": 0.1, "edge_occlusion": 1.0}
    assert task_weights("k", mode="zamir") == {"keypoints2d": 1.0}


def test_weight_errors():
    with pytest.raises(ValueError, match="main="):
        task_weights("sd", mode="zamir")
    with pytest.raises(ValueError, match="keypoints2d"):
        task_weights("sk", main="k", mode="zamir")
    with pytest.raises(ValueError, match="not one of"):
        task_weights("sd", main="n")
    with pytest.raises(ValueError, match="mode"):
        task_weights("sd", mode="equal")


# ---- decoding ----

def test_depth_decode_log_scale_and_holes():
    raw = np.array([[0, 510], [64499, 64500], [65535, 4131]], dtype=np.uint16)
    for letter in "dD":
        target, mask = get_task(letter).decode(raw)
        assert target.dtype == torch.float32 and target.shape == (1, 3, 2)
        assert mask.dtype == torch.bool and mask.shape == (1, 3, 2)
        assert mask[0].tolist() == [[True, True], [True, False], [False, True]]
        assert target[0, 0, 1].item() == pytest.approx(math.log(511) / math.log(65536), rel=1e-6)
        assert target[0, 2, 1].item() == pytest.approx(math.log(4132) / math.log(65536), rel=1e-6)
        assert target[0, 1, 1] == 0 and target[0, 2, 0] == 0  # 0 wherever invalid


def test_sixteen_bit_png_decodes_from_pillow_images():
    raw = np.array([[1000, 65535], [0, 30000]], dtype=np.uint16)
    image = png_roundtrip(raw)
    assert image.mode.startswith("I")
    from_png, _ = get_task("d").decode(image)
    from_array, _ = get_task("d").decode(raw)
    assert torch.equal(from_png, from_array)
    old_pillow_style = Image.fromarray(raw.astype(np.int32))  # mode "I", as older Pillow opens 16-bit PNGs
    assert old_pillow_style.mode == "I"
    assert torch.equal(get_task("d").decode(old_pillow_style)[0], from_array)


def test_normal_decode_and_invalid_grey():
    raw = np.array([[[255, 0, 127], [128, 128, 128]], [[128, 128, 127], [0, 255, 255]]], dtype=np.uint8)
    target, mask = get_task("n").decode(png_roundtrip(raw))
    assert target.shape == (3, 2, 2)
    assert mask[0].tolist() == [[True, False], [True, True]]
    assert target[:, 0, 0].tolist() == pytest.approx([1.0, -1.0, 127 / 127.5 - 1], abs=1e-6)
    assert target[:, 1, 0].tolist() == pytest.approx([128 / 127.5 - 1, 128 / 127.5 - 1, 127 / 127.5 - 1], abs=1e-6)
    assert target[:, 0, 1].tolist() == [0.0, 0.0, 0.0]


def test_curvature_uses_red_and_green_channels():
    raw = np.array([[[127, 127, 0], [0, 0, 0], [200, 50, 0]]], dtype=np.uint8)
    target, mask = get_task("p").decode(raw)
    assert target.shape == (2, 1, 3)
    assert mask[0].tolist() == [[True, False, True]]
    assert target[:, 0, 0].tolist() == pytest.approx([(127 - 123.572) / 31.922, (127 - 120.1) / 21.658], rel=1e-5)
    assert target[:, 0, 2].tolist() == pytest.approx([(200 - 123.572) / 31.922, (50 - 120.1) / 21.658], rel=1e-5)
    assert target[0, 0, 2] != target[1, 0, 2]  # not the source's grayscale read


def test_segmentation_labels_and_uncertain_mask():
    raw = np.array([[0, 1, 17], [5, 0, 2]], dtype=np.uint8)
    target, mask = get_task("s").decode(png_roundtrip(raw))
    assert target.dtype == torch.int64 and target.shape == (2, 3)
    assert target.tolist() == raw.tolist()
    assert mask.shape == (1, 2, 3) and mask[0].tolist() == (raw > 0).tolist()
    with pytest.raises(ValueError, match="0..17"):
        get_task("s").decode(np.array([[18]], dtype=np.uint8))


def test_reshading_one_channel_from_rgb_or_gray():
    raw = np.array([[[0, 0, 0], [255, 255, 255], [51, 51, 51]]], dtype=np.uint8)
    target, mask = get_task("r").decode(raw)
    assert target.shape == (1, 1, 3) and mask.all()
    assert target[0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 255 * 2 - 1], abs=1e-6)
    assert torch.equal(get_task("r").decode(raw[..., 0])[0], target)


@FAST
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=20))
def test_heatmaps_scaled_and_clipped_into_unit_range(values):
    raw = np.array([values], dtype=np.uint16)
    for letter, clip in (("k", 0.005), ("e", 0.08), ("K", 1.0)):
        target, mask = get_task(letter).decode(raw)
        expected = np.clip(raw / 65535.0, 0, clip) / clip * 2 - 1
        np.testing.assert_allclose(target[0].numpy(), expected, atol=1e-6)
        assert mask.all()


def test_edge_occlusion_is_clipped_then_blurred():
    raw = np.zeros((256, 256), dtype=np.uint16)
    raw[128, 128] = 4658  # the sample maximum; unclipped, the source's target reached about 21.7
    target, _ = get_task("E").decode(raw)
    assert target.max() <= 1.0 and target.min() >= -1.0
    # clipped to +1, then blurred with sigma 4 px at 256 x 256: the peak is -1 + 2 / (2 pi 16)
    assert target[0, 128, 128].item() == pytest.approx(-1 + 2 / (2 * math.pi * 16), rel=1e-3)
    assert target[0, 128, 132] > target[0, 128, 140] > -1.0
    assert torch.allclose(target[0], target[0].T, atol=1e-6)
    flat, _ = get_task("E").decode(np.full((16, 16), 200, dtype=np.uint16))
    assert torch.allclose(flat, torch.full_like(flat, 200 / 65535 / 0.00625 * 2 - 1), atol=1e-5)


def test_autoencoder_target_is_the_image_in_unit_range():
    raw = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    target, mask = get_task("A").decode(raw)
    assert torch.equal(target, torch.from_numpy(raw).permute(2, 0, 1).float() / 255)
    assert mask.all() and mask.shape == (1, 4, 5)


def test_extra_validity_is_anded_and_checked():
    raw = np.full((2, 2), 1000, dtype=np.uint16)
    valid = np.array([[True, False], [True, True]])
    target, mask = get_task("K").decode(raw, valid)
    assert mask[0].tolist() == valid.tolist() and target[0, 0, 1] == 0
    with pytest.raises(ValueError, match="does not match"):
        get_task("K").decode(raw, np.ones((3, 2), dtype=bool))


def test_wrong_format_is_refused():
    with pytest.raises(ValueError, match="depth_zbuffer needs 16-bit grayscale pixels, got 8-bit grayscale"):
        get_task("d").decode(np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="normal needs 8-bit RGB pixels"):
        get_task("n").decode(np.zeros((2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="mode"):
        get_task("n").decode(Image.new("RGBA", (2, 2)))


# ---- losses and errors ----

def test_l1_loss_per_sample_normalised_by_valid_count():
    output = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    target = torch.zeros(2, 1, 2, 2)
    mask = torch.tensor([[[[True, False], [True, False]]], [[[False, False], [False, False]]]])
    loss = get_task("d").loss(output, target, mask)
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx([2.0, 0.0])  # (1 + 3) / 2 valid; a sample with nothing valid -> 0
    assert get_task("d").loss(output, target).tolist() == pytest.approx([2.5, 0.0])
    assert get_task("d").error(output, target, mask).tolist() == pytest.approx([5.0, 0.0])


def test_channel_mask_broadcast_counts_every_channel():
    output = torch.arange(12, dtype=torch.float32).view(1, 3, 2, 2)
    mask = torch.tensor([[[[True, False], [False, False]]]])
    assert get_task("n").loss(output, torch.zeros_like(output), mask).item() == pytest.approx((0 + 4 + 8) / 3)


def test_invalid_pixels_cannot_poison_the_loss():
    output = torch.tensor([[[[1.0, float("nan")]]]], requires_grad=True)
    loss = get_task("D").loss(output, torch.zeros(1, 1, 1, 2), torch.tensor([[[[True, False]]]]))
    loss.sum().backward()
    assert loss.item() == 1.0 and torch.isfinite(output.grad).all()


def test_dense_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        get_task("n").loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))


def test_segment_loss_ignores_uncertain_and_masked_pixels():
    torch.manual_seed(0)
    output = torch.randn(2, 18, 2, 3)
    target = torch.tensor([[[0, 1, 2], [3, 4, 0]], [[5, 5, 5], [5, 5, 5]]])
    mask = torch.ones(2, 1, 2, 3, dtype=torch.bool)
    mask[1, 0, 0] = False
    ce = F.cross_entropy(output, target.clamp_min(1), reduction="none")
    expected0 = ce[0][target[0] > 0].mean()
    expected1 = ce[1, 1].mean()
    loss = get_task("s").loss(output, target, mask)
    assert loss.shape == (2,)
    assert loss.tolist() == pytest.approx([expected0.item(), expected1.item()], rel=1e-5)


def reference_balanced_loss(output, target, mask):
    """Per sample: the mean over classes present among valid pixels of the class's mean pixel cross-entropy."""
    values = []
    for i in range(output.shape[0]):
        valid = (target[i] > 0) & mask[i, 0]
        ce = F.cross_entropy(output[i:i + 1].double(), target[i:i + 1].clamp_min(0), reduction="none")[0]
        means = [ce[valid & (target[i] == c)].mean().item() for c in target[i][valid].unique().tolist()]
        values.append(float(np.mean(means)) if means else 0.0)
    return values


@FAST
@given(st.integers(0, 2 ** 31 - 1), st.integers(1, 4))
def test_balanced_segment_loss_weighs_each_present_class_equally(seed, batch):
    rng = np.random.default_rng(seed)
    output = torch.from_numpy(rng.normal(size=(batch, 18, 3, 4)))
    target = torch.from_numpy(rng.integers(0, 5, (batch, 3, 4)))
    mask = torch.from_numpy(rng.random((batch, 1, 3, 4)) > 0.2)
    balanced = tasks.training_record("s", "balanced")
    assert balanced.loss(output, target, mask).tolist() == pytest.approx(reference_balanced_loss(output, target, mask))
    one_class = torch.full_like(target, 3)  # one class everywhere: balanced equals plain cross-entropy
    assert torch.allclose(balanced.loss(output, one_class, mask), get_task("s").loss(output, one_class, mask))


def test_training_record_variants_pickle_and_leave_other_tasks_alone():
    balanced = tasks.training_record("s", "balanced")
    assert balanced.loss is tasks.segment_loss_balanced and balanced.error is get_task("s").error
    assert pickle.loads(pickle.dumps(balanced)).loss is tasks.segment_loss_balanced
    assert pickle.loads(pickle.dumps(get_task("s"))) is get_task("s")
    assert tasks.training_record("d", "balanced") is get_task("d")
    with pytest.raises(ValueError, match="segment_loss must be one of ce, balanced"):
        tasks.training_record("s", "focal")


def one_hot_logits(pred):
    return F.one_hot(pred, 18).permute(0, 3, 1, 2).float()


def test_segment_error_is_one_minus_per_sample_miou():
    target = torch.tensor([[[1, 1], [2, 2]], [[3, 3], [4, 0]], [[0, 0], [0, 0]]])
    pred = torch.tensor([[[1, 2], [2, 2]], [[3, 3], [4, 9]], [[5, 5], [5, 5]]])
    error = get_task("s").error(one_hot_logits(pred), target)
    # sample 0: class 1 IoU 1/2, class 2 IoU 2/3 -> mIoU 7/12; sample 1 perfect on valid pixels;
    # sample 2 has no valid pixel -> 0
    assert error.tolist() == pytest.approx([5 / 12, 0.0, 0.0])
    pred[1, 0, 0] = 7  # a class only in the prediction counts (IoU 0): classes 3, 4, 7 -> (1/2 + 1 + 0) / 3
    assert get_task("s").error(one_hot_logits(pred), target)[1].item() == pytest.approx(1 - 1.5 / 3)
    mask = torch.ones(3, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 0, 1] = False  # drop the one wrong pixel of sample 0
    assert get_task("s").error(one_hot_logits(pred), target, mask)[0].item() == pytest.approx(0.0)


def reference_miou_error(pred, target):
    valid = target > 0
    classes = set(pred[valid].tolist()) | set(target[valid].tolist())
    if not classes:
        return 0.0
    ious = [((pred == c) & (target == c) & valid).sum() / (((pred == c) | (target == c)) & valid).sum()
            for c in classes]
    return 1.0 - float(np.mean(ious))


@FAST
@given(st.integers(0, 2 ** 31 - 1), st.integers(1, 4))
def test_per_sample_losses_do_not_depend_on_the_batch(seed, batch):
    rng = np.random.default_rng(seed)
    output = torch.from_numpy(rng.normal(size=(batch, 18, 3, 4)).astype(np.float32))
    target = torch.from_numpy(rng.integers(0, 4, (batch, 3, 4)))
    mask = torch.from_numpy(rng.random((batch, 1, 3, 4)) > 0.2)
    s = get_task("s")
    for fn in (s.loss, s.error):
        whole = fn(output, target, mask)
        alone = torch.cat([fn(output[i:i + 1], target[i:i + 1], mask[i:i + 1]) for i in range(batch)])
        assert torch.allclose(whole, alone, atol=1e-6)
    pred = output.argmax(1)
    for i in range(batch):
        target_i = torch.where(mask[i, 0], target[i], 0).numpy()
        assert s.error(output, target)[i].item() == pytest.approx(reference_miou_error(pred[i].numpy(), target[i].numpy()))
        assert s.error(output, target, mask)[i].item() == pytest.approx(reference_miou_error(pred[i].numpy(), target_i))


# ---- metrics ----

def test_segment_meter_pools_over_batches():
    meter = TaskMeter("s")
    target = torch.tensor([[[1, 1], [2, 0]]])
    meter.update(one_hot_logits(torch.tensor([[[1, 2], [2, 2]]])), target)
    meter.update(one_hot_logits(torch.tensor([[[1, 1], [1, 3]]])), torch.tensor([[[1, 1], [1, 3]]]))
    scores = meter.compute()
    # class 1: inter 1 + 3, union 2 + 3 -> 4/5; class 2: 1/2; class 3: 1 -> mean 0.7667
    assert scores["miou"] == pytest.approx((4 / 5 + 1 / 2 + 1) / 3)
    assert scores["pixel_acc"] == pytest.approx(6 / 7)
    assert get_task("s").higher_is_better == {"miou": True, "pixel_acc": True}
    meter.reset()
    with pytest.raises(RuntimeError, match="no batch"):
        meter.compute()


def test_dense_meter_pools_valid_elements():
    meter = TaskMeter(get_task("d"))
    meter.update(torch.tensor([[[[1.0, 3.0]]]]), torch.zeros(1, 1, 1, 2), torch.tensor([[[[True, False]]]]))
    meter.update(torch.tensor([[[[2.0, 2.0]]]]), torch.zeros(1, 1, 1, 2))
    assert meter.compute() == pytest.approx({"l1": 5 / 3, "mse": 9 / 3})
    assert get_task("d").higher_is_better == {"l1": False, "mse": False}

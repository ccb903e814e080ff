"""GAT: auxiliary label generators, the GAT objective against plain adversarial training, untouched validation
images, jigsaw permutations restored from checkpoints, the command line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mtrobust_fast.tasks import auxiliary
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.classification import ObjectDataset
from mtrobust_fast.data.synth.objects import synthesize_objects
from mtrobust_fast.models import build_classifier, load_checkpoint
from mtrobust_fast.training import AttackSettings, TaskLosses, make_objective
from mtrobust_fast.training.gat import GAT
from mtrobust_fast.weighting import make_weighting


def _images(n=8, size=8, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_rotation_labels_are_balanced_and_undo():
    images = _images(10)
    rotated, labels = auxiliary.make_task("rotation").transform(images, torch.Generator().manual_seed(1))
    assert sorted(labels.tolist())[:8] == [0, 0, 1, 1, 2, 2, 3, 3] or all(labels.bincount(minlength=4) >= 2)
    back = torch.stack([torch.rot90(r, -int(k), dims=(-2, -1)) for r, k in zip(rotated, labels)])
    assert torch.equal(back, images)
    assert torch.equal(rotated[labels == 0], images[labels == 0])


@pytest.mark.parametrize("grid", [2, 4])
def test_jigsaw_shuffles_tiles_and_the_inverse_permutation_restores_them(grid):
    task = auxiliary.make_task("jigsaw", classes=5, grid=grid, seed=3)
    assert task.permutations[0] == tuple(range(grid * grid)) and len(set(task.permutations)) == 5
    images = _images(6, size=8)
    shuffled, labels = task.transform(images, torch.Generator().manual_seed(2))
    tile = 8 // grid
    for image, out, label in zip(images, shuffled, labels):
        order = task.permutations[int(label)]
        for i, place in enumerate(order):  # tile i of the image is at place order[i]
            r, c, pr, pc = i // grid, i % grid, place // grid, place % grid
            assert torch.equal(out[:, pr * tile:(pr + 1) * tile, pc * tile:(pc + 1) * tile],
                               image[:, r * tile:(r + 1) * tile, c * tile:(c + 1) * tile])
    assert auxiliary.make_task("jigsaw", classes=5, grid=grid, seed=3).permutations == task.permutations
    with pytest.raises(ValueError, match="grid"):
        task.shuffle(torch.rand(1, 3, 9, 9), torch.zeros(1, dtype=torch.long))


def test_autoencoder_targets_its_input():
    images = _images()
    x, target = auxiliary.make_task("autoencoder").transform(images)
    assert x is images and target is images


def test_jigsaw_permutations_are_restored_from_a_checkpoint(tmp_path):
    from mtrobust_fast.models import save_checkpoint

    jigsaw = auxiliary.make_task("jigsaw", classes=6, grid=2, seed=11)
    model = build_classifier("resnet18", classes=10, input_size=16, aux=[jigsaw, auxiliary.make_task("rotation")])
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "gat.pt", model))
    assert loaded.task_records["jigsaw"].permutations == jigsaw.permutations
    assert loaded.evaluated_task_names == ["class"] and set(loaded.task_names) == {"class", "jigsaw", "rotation"}


def _parameters_after_steps(make, steps=1, aux_weight=0.0):
    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=4, input_size=16, aux=[auxiliary.make_task("rotation")])
    losses = TaskLosses([model.task_records["class"]])
    objective = make(model, losses)
    weighting = make_weighting("static", {"class": 1.0, "rotation": aux_weight})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(4)
    model.train()
    for _ in range(steps):
        x, y = torch.rand(6, 3, 16, 16, generator=gen), torch.randint(0, 4, (6,), generator=gen)
        for out in objective.updates(model, x, {"class": y}, {}):
            optimizer.zero_grad()
            task_losses = dict(out.task_losses)
            task_losses.setdefault("rotation", 0.0 * task_losses["class"])
            weighting.backward(task_losses)
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.named_parameters() if not k.startswith("decoders.rotation")}


def test_gat_with_an_unweighted_auxiliary_task_steps_like_adversarial_training():
    """Separate routing, auxiliary weight 0: the main head and the encoder take the madry_mix step exactly. (One
    step: afterwards the auxiliary pass has moved BatchNorm's running statistics and drawn from the random
    stream, so later attacks differ.)"""
    settings = AttackSettings(eps=4 / 255, steps=2)
    plain = _parameters_after_steps(lambda m, l: make_objective("madry_mix", l, settings, ["class"]))

    def gat(model, losses):
        return GAT(make_objective("madry_mix", losses, settings, ["class"]), [model.task_records["rotation"]],
                   routing="separate")

    assert all(torch.equal(plain[k], v) for k, v in _parameters_after_steps(gat).items())
    weighted = _parameters_after_steps(gat, aux_weight=1.0)
    assert not torch.equal(plain["encoder.stem.0.0.weight"], weighted["encoder.stem.0.0.weight"])


def test_shared_routing_feeds_every_head_the_transformed_batch():
    torch.manual_seed(0)
    model = build_classifier("resnet18", classes=4, input_size=16,
                             aux=[auxiliary.make_task("rotation"), auxiliary.make_task("autoencoder")])
    losses = TaskLosses([model.task_records["class"]])
    gat = GAT(make_objective("madry", losses, AttackSettings(eps=0.0, steps=1), ["class"]),
              [model.task_records["autoencoder"], model.task_records["rotation"]], routing="shared")
    images, labels = torch.rand(4, 3, 16, 16), torch.randint(0, 4, (4,))
    torch.manual_seed(5)
    (out,) = gat.updates(model, images, {"class": labels}, {})
    x, targets, _ = out.batch
    torch.manual_seed(5)
    expected_x, _ = auxiliary.make_task("rotation").transform(images)
    assert torch.equal(x, expected_x) and torch.equal(targets["autoencoder"], x)  # rotation first, then the AE
    assert set(out.task_losses) == {"class", "rotation", "autoencoder"}


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    return synthesize_objects(tmp_path_factory.mktemp("gat") / "data", 60, size=16, seed=0, workers=1,
                              progress=False)


def test_gat_command_trains_augmented_and_validates_on_untransformed_images(objects, tmp_path):
    run = tmp_path / "gat"
    assert cli_main(["train", "--data", str(objects), "--out", str(run), "--epochs", "1", "--batch-size", "10",
                     "--lr", "1e-3", "--workers", "0", "--no-progress", "--adversarial", "madry_mix",
                     "--attack-tasks", "main", "--steps", "1", "--aux", "rotation,jigsaw,autoencoder",
                     "--weighting", "mgda", "--curvature", "xi", "--robust-val", "0", "--augment", "crop+flip"]) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(record["train"]["task_losses"]) == {"class", "rotation", "jigsaw", "autoencoder", "curvature"}
    model, meta = load_checkpoint(run / "last.pt")
    assert meta["train_config"]["objective_settings"]["gat"]["routing"] == "shared"
    assert meta["train_config"]["augment"] == "crop+flip"
    val = ObjectDataset(objects, "val")
    with torch.no_grad():
        images = torch.stack([val[i][0] for i in range(len(val))])
        labels = torch.tensor([int(val[i][1]["class"]) for i in range(len(val))])
        accuracy = float((model(images)["class"].argmax(1) == labels).double().mean())
    assert record["val"]["tasks"]["class"]["accuracy"] == pytest.approx(accuracy)
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(objects), "--steps", "1",
                     "--no-progress", "--no-gradients"]) == 0


def test_gat_logs_the_main_task_loss_and_error_undiluted(objects, tmp_path):
    """With two auxiliary heads the class head has a third of the training weight; the validation loss and the
    robust error it logs must still be the class head's own (they were a third of it)."""
    run = tmp_path / "gat"
    assert cli_main(["train", "--data", str(objects), "--out", str(run), "--epochs", "1", "--batch-size", "10",
                     "--lr", "1e-3", "--workers", "0", "--no-progress", "--adversarial", "madry_mix",
                     "--attack-tasks", "main", "--steps", "1", "--aux", "rotation,jigsaw", "--robust-val", "8",
                     "--robust-val-steps", "2"]) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert record["val"]["loss"] == pytest.approx(record["val"]["tasks"]["class"]["loss"])
    robust = record["robust_val"]
    assert robust["error"] == pytest.approx(robust["tasks"]["class"]["adv_error"])
    assert robust["loss"] == pytest.approx(robust["tasks"]["class"]["adv_loss"])


@pytest.mark.parametrize("argv, message", [
    (["--aux", "rotation,colour"], "aux: unknown auxiliary task(s) ['colour']"),
    (["--aux", "rotation", "--aux-routing", "separate", "--curvature", "xi"], "use aux_routing shared"),
])
def test_bad_gat_settings_are_named(objects, tmp_path, capsys, argv, message):
    assert cli_main(["train", "--data", str(objects), "--out", str(Path(tmp_path) / "bad"), "--epochs", "1",
                     "--workers", "0", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


@settings(max_examples=30, deadline=None)
@given(height=st.integers(8, 40), width=st.integers(8, 40), channels=st.sampled_from([1, 3]),
       cell=st.sampled_from([4, 5, 6, 8]), orientations=st.sampled_from([6, 9, 12]), seed=st.integers(0, 2 ** 16))
def test_hog_visualisation_equals_scikit_image(height, width, channels, cell, orientations, seed):
    """Within 1e-6 (scikit-image draws its visualisation in float32), on float64 images."""
    skimage_feature = pytest.importorskip("skimage.feature", reason="scikit-image is the test oracle for HOG")
    assume(height >= cell and width >= cell)
    images = torch.rand(2, channels, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ours = auxiliary.hog_image(images, orientations, cell)
    for b in range(2):
        image = images[b].numpy()
        kwargs = dict(orientations=orientations, pixels_per_cell=(cell, cell), cells_per_block=(1, 1),
                      visualize=True)
        reference = skimage_feature.hog(image.transpose(1, 2, 0), channel_axis=-1, **kwargs)[1] if channels == 3 \
            else skimage_feature.hog(image[0], **kwargs)[1]
        assert np.abs(ours[b, 0].numpy() - reference).max() < 1e-6


def test_line_pixels_are_the_digital_straight_line():
    assert auxiliary.line_pixels(1, 1, 4, 4) == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert auxiliary.line_pixels(3, 0, 3, 3) == [(3, 0), (3, 1), (3, 2), (3, 3)]
    assert auxiliary.line_pixels(0, 0, 3, 1) == [(0, 0), (1, 0), (2, 1), (3, 1)]


def test_domain_head_trains_with_a_negative_weight_and_is_evaluated(objects, tmp_path):
    run = tmp_path / "domain"
    assert cli_main(["train", "--data", str(objects), "--out", str(run), "--epochs", "1", "--batch-size", "10",
                     "--workers", "0", "--no-progress", "--adversarial", "madry_mix", "--attack-tasks", "main",
                     "--steps", "1", "--aux", "rotation", "--domain-labels", "--weights",
                     "class=1,domain=-0.1,rotation=0.5", "--robust-val", "4"]) == 0
    (record,) = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(record["val"]["tasks"]) == {"class", "domain"} and record["robust_val"]["attacked"] == ["class"]
    model, _ = load_checkpoint(run / "last.pt")
    assert model.config["task_weights"] == {"class": 1.0, "domain": -0.1, "rotation": 0.5}


def test_depth_from_the_data_follows_the_shared_transforms(objects):
    train = ObjectDataset(objects, "train", depth=True)
    image, targets, masks = train[0]
    assert targets["depth"].shape == (1, 16, 16) and masks["depth"].dtype == torch.bool
    assert 0 < float(targets["depth"][masks["depth"]].mean()) < 1  # Taskonomy's log depth of a few metres
    rotation, depth = auxiliary.make_task("rotation"), auxiliary.make_task("depth")
    gat = GAT(make_objective("madry", TaskLosses([auxiliary.make_task("rotation")]), AttackSettings(), ["rotation"]),
              [depth, rotation])
    images = torch.stack([train[i][0] for i in range(4)])
    maps = torch.stack([train[i][1]["depth"] for i in range(4)])
    valid = torch.stack([train[i][2]["depth"] for i in range(4)])
    torch.manual_seed(3)
    x, targets, masks = gat.shared_batch(images, {"depth": maps}, {"depth": valid})
    turns = targets["rotation"]
    assert torch.equal(x, auxiliary.rotate(images, turns))
    assert torch.equal(targets["depth"], auxiliary.rotate(maps, turns))
    assert torch.equal(masks["depth"], auxiliary.rotate(valid, turns))
    with pytest.raises(ValueError, match="no depth maps"):
        from mtrobust_fast.data.classification import open_classification
        open_classification(Path(objects).parent / "missing-cifar", depth=True)

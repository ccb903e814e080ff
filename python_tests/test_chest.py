"""Chest X-ray readers (CheXpert and NIH CSV layouts written here), the multi-label and regression heads, their
binned AUC against an exact rank computation, and a one-channel multi-label classifier trained and attacked."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from mtrobust_fast.tasks.classification import MultiLabelTask, RegressionTask, auc_bins, binned_auc
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.chest import AGE_SCALE, CHEXPERT_FINDINGS, ChestXrayDataset, chest_format
from mtrobust_fast.data.classification import is_classification_data, open_classification
from mtrobust_fast.models import load_checkpoint

FINDINGS = ("Cardiomegaly", "Edema")


def _write_image(path, value, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(value))
    Image.fromarray(rng.integers(0, 256, (size, size + 4), dtype=np.uint8)).save(path)


def write_chexpert(root, patients=30):
    """CheXpert-small style: train.csv / valid.csv with paths that start with the folder's name."""
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS]
    values = ["1.0", "0.0", "-1.0", ""]
    for csv_name, split, count in (("train.csv", "train", patients), ("valid.csv", "valid", 4)):
        lines = [",".join(header)]
        for p in range(count):
            relative = f"{root.name}/{split}/patient{p:05d}/study1/view1_frontal.jpg"
            _write_image(root.parent / relative, p)
            labels = [values[(p + i) % 4] for i in range(len(CHEXPERT_FINDINGS))]
            sex = ("Female", "Male", "Unknown")[p % 3]
            lines.append(",".join([relative, sex, "" if p % 5 == 0 else str(20 + p), "Frontal", "PA", *labels]))
        (root / csv_name).write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def chexpert(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    return write_chexpert(root)


def test_chexpert_masks_uncertain_and_blank_labels_and_splits_by_patient(chexpert):
    assert chest_format(chexpert) == "chexpert" and is_classification_data(chexpert)
    train = ChestXrayDataset(chexpert, "train", size=16, domain=True, findings=FINDINGS)
    val = ChestXrayDataset(chexpert, "val", size=16, findings=FINDINGS)
    test = ChestXrayDataset(chexpert, "test", size=16, findings=FINDINGS)
    assert len(train) + len(val) == 30 and len(test) == 4 and len(val) > 0
    train_patients = {r[0].parts[-3] for r in train.records}
    assert not train_patients & {r[0].parts[-3] for r in val.records}
    image, targets, masks = train[0]
    assert image.shape == (1, 16, 16) and 0 <= image.min() and image.max() <= 1
    p = int(train.records[0][0].parts[-3][len("patient"):])
    raw = ["1.0", "0.0", "-1.0", ""]
    for k, finding in enumerate(FINDINGS):
        value = raw[(p + CHEXPERT_FINDINGS.index(finding)) % 4]
        assert bool(masks["class"][k]) == (value in ("1.0", "0.0"))  # -1 (uncertain) and blank are masked
        assert targets["class"][k].item() == (1.0 if value == "1.0" else 0.0)
    for index in range(len(train)):
        _, targets, masks = train[index]
        p = int(train.records[index][0].parts[-3][len("patient"):])
        assert bool(masks["sex"][0]) == (p % 3 != 2) and bool(masks["age"]) == (p % 5 != 0)
        if p % 5:
            assert targets["age"].item() == pytest.approx((20 + p) / AGE_SCALE)
    with pytest.raises(ValueError, match="not chexpert columns"):
        ChestXrayDataset(chexpert, "train", size=16, findings=("Hernia",))


def test_bad_chexpert_values_and_missing_images_are_named(chexpert):
    text = (chexpert / "train.csv").read_text().splitlines()
    text[1] = text[1].rsplit(",", 1)[0] + ",maybe"
    (chexpert / "train.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"train.csv:2: Support Devices is 'maybe'"):
        ChestXrayDataset(chexpert, "train", size=16)
    test = ChestXrayDataset(chexpert, "test", size=16)
    test.records[0][0].unlink()
    with pytest.raises(ValueError, match="cannot read image .*view1_frontal.jpg"):
        test[0]


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "CheXpert-v1.0-small/../../secret.jpg"])
def test_csv_paths_that_leave_the_dataset_are_refused(chexpert, path):
    text = (chexpert / "train.csv").read_text().splitlines()
    text[1] = path + "," + text[1].split(",", 1)[1]
    (chexpert / "train.csv").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match=r"train.csv:2: the path .* leaves the dataset's folder"):
        ChestXrayDataset(chexpert, "train", size=16)


def test_nih_reads_pipe_separated_findings_and_the_official_test_list(tmp_path):
    rows = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"]
    for i in range(40):
        name = f"{i:08d}_000.png"
        _write_image(tmp_path / "images" / name, i)
        finding = ("No Finding", "Edema|Cardiomegaly", "Hernia", "Edema")[i % 4]
        rows.append(f"{name},{finding},0,{i},{30 + i},{'FM'[i % 2]},PA")
    (tmp_path / "Data_Entry_2017_v2020.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "test_list.txt").write_text("00000000_000.png\n00000005_000.png\n")
    assert chest_format(tmp_path) == "nih"
    test = ChestXrayDataset(tmp_path, "test", size=16, findings=FINDINGS)
    assert [r[0].name for r in test.records] == ["00000000_000.png", "00000005_000.png"]
    train = ChestXrayDataset(tmp_path, "train", size=16, domain=True, findings=FINDINGS)
    val = ChestXrayDataset(tmp_path, "val", size=16, findings=FINDINGS)
    assert len(train) + len(val) == 38
    by_name = {r[0].name: r for r in train.records}
    assert by_name["00000001_000.png"][1] == [1.0, 1.0] and by_name["00000003_000.png"][1] == [0.0, 1.0]
    assert by_name["00000002_000.png"][1] == [0.0, 0.0] and all(by_name["00000002_000.png"][2])
    assert by_name["00000001_000.png"][3] == 0.0 and by_name["00000002_000.png"][3] == 1.0  # M, F


def exact_auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.integers(2, 40))
def test_binned_auc_equals_the_exact_rank_auc_up_to_shared_bins(seed, batch):
    rng = np.random.default_rng(seed)
    logits = torch.from_numpy(rng.normal(0, 2, (batch, 3)))
    labels = torch.from_numpy(rng.integers(0, 2, (batch, 3)).astype(np.float64))
    known = torch.from_numpy(rng.random((batch, 3)) > 0.2)
    task = MultiLabelTask("class", 3)
    halves = [task.metric_stats(logits[:batch // 2], labels[:batch // 2], known[:batch // 2]),
              task.metric_stats(logits[batch // 2:], labels[batch // 2:], known[batch // 2:])]
    scores = task.metric_scores(halves[0] + halves[1])  # pooled over batches
    probs = torch.sigmoid(logits).numpy()
    binned = auc_bins(logits).numpy()
    for k in range(3):
        keep = known[:, k].numpy()
        expected = exact_auc(binned[keep, k], labels[keep, k].numpy())  # ties exactly where bins are shared
        got = scores[f"auc_{k}"]
        assert (np.isnan(expected) and np.isnan(got)) or got == pytest.approx(expected, abs=1e-12)
        if not np.isnan(expected):  # only pairs that share a bin can differ from the exact AUC, by half a credit
            pos, neg = binned[keep, k][labels[keep, k].numpy() == 1], binned[keep, k][labels[keep, k].numpy() == 0]
            shared = (pos[:, None] == neg[None]).mean()
            assert abs(got - exact_auc(probs[keep, k], labels[keep, k].numpy())) <= 0.5 * shared + 1e-12
    correct = (((logits > 0) == (labels > 0.5)) & known).sum().item()
    assert scores["accuracy"] == pytest.approx(correct / known.sum().item())
    assert torch.isnan(binned_auc(torch.ones(4), torch.zeros(4)))


@pytest.mark.parametrize("scale", [1, 8, 16, 1000])
def test_the_auc_of_a_confident_model_is_its_rank_auc(scale):
    # A good model made more confident: scaling its logits changes no ranking, so the exact AUC stays put.
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 2, (400, 1)).astype(np.float64))
    logits = (torch.from_numpy(rng.normal(0, 1, (400, 1))) + 3 * (labels - 0.5)) * scale
    expected = exact_auc(logits[:, 0].numpy(), labels[:, 0].numpy())
    task = MultiLabelTask("class", 1)
    assert expected > 0.95
    assert task.metric_scores(task.metric_stats(logits, labels))["auc"] == pytest.approx(expected, abs=1e-3)


def test_multilabel_loss_and_error_ignore_masked_labels_and_regression_masks_unknown_values():
    task = MultiLabelTask("class", 2, ("a", "b"))
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    mask = torch.tensor([[True, False], [True, True]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert task.loss(logits, labels, mask).tolist() == pytest.approx([bce[0, 0].item(), bce[1].mean().item()])
    assert task.error(logits, labels, mask).tolist() == [0.0, 1.0]
    assert task.divergence(logits, logits).abs().max() < 1e-6
    age = RegressionTask("age")
    out = torch.tensor([[0.3], [0.9]])
    assert age.loss(out, torch.tensor([0.5, 0.1]), torch.tensor([True, False])).tolist() == pytest.approx([0.2, 0.0])
    assert age.metric_scores(age.metric_stats(out, torch.tensor([0.5, 0.1]), torch.tensor([True, False]))) == \
        pytest.approx({"mae": 0.2})


def test_a_one_channel_multilabel_classifier_trains_with_domain_heads_and_is_attacked(chexpert, tmp_path):
    run = tmp_path / "run"
    code = cli_main(["train", "--data", str(chexpert), "--out", str(run), "--size", "32", "--epochs", "1",
                     "--batch-size", "4", "--workers", "0", "--no-progress", "--domain-labels", "--aux", "rotation",
                     "--adversarial", "madry", "--steps", "1", "--eps", "2/255", "--robust-val", "0"])
    assert code == 0
    model, meta = load_checkpoint(run / "last.pt")
    assert model.config["input_channels"] == 1 and model.task_names == ["class", "sex", "age", "rotation"]
    assert model.task_records["class"].label_names == CHEXPERT_FINDINGS
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = log[-1]["val"]["tasks"]
    assert {"auc", "accuracy", "auc_Edema"} <= set(val["class"]) and "mae" in val["age"]
    out = tmp_path / "eval"
    assert cli_main(["attack", "--checkpoint", str(run / "last.pt"), "--data", str(chexpert), "--split", "test",
                     "--eps", "2/255", "--steps", "2", "--target", "class", "--no-gradients", "--no-progress",
                     "--workers", "0", "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert {"adv_auc", "adv_accuracy", "adv_auc_Edema"} <= set(summary["attacks"]["class"]["tasks"]["class"])
    assert "auc" in summary["clean"]["class"]
    with pytest.raises(ValueError, match="x must be an image batch of shape \\[B, 1, H, W\\]"):
        model(torch.rand(1, 3, 32, 32))


def test_open_classification_finds_the_chest_reader_and_refuses_depth(chexpert):
    assert isinstance(open_classification(chexpert, "val", 16), ChestXrayDataset)
    with pytest.raises(ValueError, match="no depth maps"):
        open_classification(chexpert, "val", 16, depth=True)


def test_eps_train_attacks_at_the_training_budget_with_apgd_and_refuses_clean_checkpoints(chexpert, tmp_path, capsys):
    common = ["--data", str(chexpert), "--size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0",
              "--no-progress", "--robust-val", "0", "--findings", "Edema,Cardiomegaly"]
    assert cli_main(["train", "--out", str(tmp_path / "adv"), "--adversarial", "madry", "--steps", "1",
                     "--eps", "3/255", "--norm", "l2", *common]) == 0
    out = tmp_path / "eval"
    assert cli_main(["attack", "--checkpoint", str(tmp_path / "adv" / "last.pt"), "--data", str(chexpert),
                     "--split", "test", "--attack", "apgd", "--eps", "train", "--steps", "3", "--no-gradients",
                     "--no-progress", "--out", str(out)]) == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["eps"] == pytest.approx(3 / 255) and config["norm"] == "l2" and config["attack"] == "apgd"
    assert "class auc" in capsys.readouterr().out
    assert cli_main(["train", "--out", str(tmp_path / "clean"), *common]) == 0
    assert cli_main(["attack", "--checkpoint", str(tmp_path / "clean" / "last.pt"), "--data", str(chexpert),
                     "--eps", "train", "--no-progress"]) == 2
    assert "was not adversarially trained" in capsys.readouterr().err

"""Adversarial-example panels: how each kind of output is drawn, and `attack --panels` writes one PNG per image and
attacked set (and logs them to the tracker)."""
import json

import numpy as np
import torch

from mtrobust_fast.analysis import panels


def test_perturbation_image_is_grey_where_nothing_changed_and_reaches_the_extremes():
    x = torch.full((3, 2, 2), 0.5)
    adv = x.clone()
    picture, top = panels.perturbation_image(x, adv)
    assert top == 0 and np.allclose(picture, 0.5)
    adv[0, 0, 0], adv[1, 1, 1] = 0.6, 0.45
    picture, top = panels.perturbation_image(x, adv)
    assert np.isclose(top, 0.1) and np.isclose(picture[0, 0, 0], 1.0) and np.isclose(picture[1, 1, 1], 0.25)


def test_outputs_are_drawn_by_kind():
    logits = torch.zeros(18, 2, 3)
    logits[5] = 1.0
    kind, picture = panels.output_image(logits)
    assert kind == "image" and np.allclose(picture, panels.PALETTE[5])
    kind, picture = panels.output_image(torch.tensor([[[-1.0, 1.0]], [[0.0, 0.0]], [[1.0, -1.0]]]))
    assert np.allclose(picture[0, 0], [0, 0.5, 1]) and np.allclose(picture[0, 1], [1, 0.5, 0])
    kind, picture = panels.output_image(torch.tensor([[[0.0, 2.0, 4.0]]]), scale=(0.0, 2.0))
    assert picture.shape == (1, 3, 3) and np.allclose(picture[0, 1], picture[0, 2])  # clipped at the scale's top
    kind, text = panels.output_image(torch.tensor([0.0, 3.0, 0.0]))
    assert kind == "text" and text.startswith("class 1")
    masked = panels.target_image(torch.tensor([[1, 2]]), mask=torch.tensor([[[True, False]]]))
    assert np.allclose(masked[0, 0], panels.PALETTE[1]) and np.allclose(masked[0, 1], 0.5)


def test_attack_writes_panels_and_logs_them(tmp_path):
    from mtrobust_fast.cli import main as cli_main
    from mtrobust_fast.data.synth.taskonomy import synthesize
    from mtrobust_fast.models import build_model, save_checkpoint

    data = synthesize(tmp_path / "data", 8, size=32, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "sd.pt", build_model("sd", "resnet18", input_size=32), epoch=0)
    out = tmp_path / "out"
    assert cli_main(["attack", "--checkpoint", str(checkpoint), "--data", str(data), "--steps", "1", "--no-progress",
                     "--target", "d,sd", "--limit", "3", "--batch-size", "2", "--panels", "3", "--tracker", "local",
                     "--out", str(out), "--no-gradients"]) == 0
    written = sorted(p.name for p in (out / "panels").iterdir())
    assert written == [f"image{i:03d}_{s}.png" for i in range(3) for s in ("d", "sd")]
    for name in written:
        assert (out / "panels" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = [json.loads(line) for line in (out / "tracking" / "figures.jsonl").read_text().splitlines()]
    assert len(logged) == 6
    assert (out / "tracking" / "metrics.jsonl").stat().st_size > 0


def test_panels_and_tracker_need_out(tmp_path, capsys):
    from mtrobust_fast.cli import main as cli_main

    assert cli_main(["attack", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path), "--panels", "2"]) == 2
    assert "--panels needs --out" in capsys.readouterr().err


def test_a_panel_has_colour_bars_and_a_class_legend():
    """One-channel rows and the perturbation carry colour bars; a segmentation row names its classes."""
    torch.manual_seed(0)
    x = torch.rand(3, 8, 8)
    adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    seg_clean, seg_adv = torch.randn(18, 8, 8), torch.randn(18, 8, 8)
    depth = torch.rand(1, 8, 8)
    fig = panels.figure(x, adv, {"s": seg_clean, "d": depth}, {"s": seg_adv, "d": depth + 0.1},
                        {"s": torch.randint(0, 3, (8, 8)), "d": torch.rand(1, 8, 8)})
    colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colour_bars) == 2  # the perturbation and the depth row
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 1
    shown = {text.get_text() for text in legends[0].get_texts()}
    expected = {f"class {c}" for c in set(seg_clean.argmax(0).flatten().tolist()) | set(seg_adv.argmax(0).flatten().tolist())
                | {0, 1, 2}}
    assert shown <= expected and len(shown) >= 3

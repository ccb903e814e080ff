"""MAC and parameter counts: single layers by hand, a model's parts add up, and the command prints the table."""
import torch
import torch.nn as nn

from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.models import build_model
from mtrobust_fast.models.complexity import count_macs, model_complexity, set_complexity


def test_macs_of_a_convolution_a_transposed_convolution_and_a_linear_layer_by_hand():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16x16 -> 8x8 output, 8 channels; each output: 3*3*3 MACs
    assert count_macs(conv, torch.rand(2, 3, 16, 16))[0] == 2 * 8 * 8 * 8 * 27
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)  # each output reads 2 channels * 9
    assert count_macs(grouped, torch.rand(1, 8, 5, 5))[0] == 8 * 5 * 5 * 18
    up = nn.ConvTranspose2d(4, 6, 2, stride=2)  # each input element spreads to 6 * 2 * 2 outputs
    assert count_macs(up, torch.rand(1, 4, 3, 3))[0] == 4 * 3 * 3 * 24
    linear = nn.Linear(10, 7)
    assert count_macs(linear, torch.rand(5, 10))[0] == 5 * 7 * 10
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 4))
    total, parts = count_macs(net, torch.rand(1, 3, 16, 16))
    assert parts == {"0": 8 * 8 * 8 * 27, "3": 512 * 4} and total == sum(parts.values())


def test_a_models_parts_add_up_and_a_task_set_costs_the_encoder_and_its_heads():
    model = build_model("sd", "resnet18", input_size=32)
    counted = model_complexity(model, 64)
    heads = counted["heads"]
    assert counted["total"]["macs"] == counted["encoder"]["macs"] + sum(h["macs"] for h in heads.values())
    assert counted["total"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert set_complexity(counted, ["segment_semantic"])["macs"] == counted["encoder"]["macs"] + \
        heads["segment_semantic"]["macs"]
    # MACs grow with the image area (every layer is convolutional): 4x the pixels, 4x the MACs.
    assert model_complexity(model, 128)["total"]["macs"] == 4 * counted["total"]["macs"]


def test_the_complexity_command(capsys, tmp_path):
    assert cli_main(["complexity", "--encoders", "resnet18", "--tasks", "sd", "--size", "64",
                     "--out", str(tmp_path / "c.csv")]) == 0
    printed = capsys.readouterr().out
    assert "resnet18  sd" in printed and (tmp_path / "c.csv").read_text().count("\n") == 4  # header + s, d, sd
    assert cli_main(["complexity", "--tasks", "sd", "--sets", "n"]) == 2
    assert "--sets: the model has tasks sd" in capsys.readouterr().err
    assert cli_main(["complexity", "--size", "50"]) == 2
    assert "--size" in capsys.readouterr().err

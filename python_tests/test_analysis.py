"""ICML'23-style analyses: linear CKA (1 for a representation with itself, invariant to orthogonal maps and scale,
equal to the feature-space formula) and input-space loss landscapes (the centre is the clean loss, the
adversarial direction raises the loss to first order), and both commands end to end."""
import json

import pytest
import torch
import torch.nn as nn

from mtrobust_fast import tasks
from mtrobust_fast.analysis import landscape
from mtrobust_fast.analysis.cka import linear_cka
from mtrobust_fast.cli import main as cli_main


def test_cka_of_a_representation_with_itself_is_one_and_invariant_to_rotation_and_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 3, 4, 4, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))
    rotated = 3.5 * x.flatten(1) @ q
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, rotated) == pytest.approx(1.0, abs=1e-12)
    y = torch.randn(20, 7, generator=gen, dtype=torch.float64)
    assert linear_cka(rotated, y) == pytest.approx(linear_cka(x, y), abs=1e-12)


def test_cka_equals_the_feature_space_formula_and_refuses_bad_input():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(15, 6, generator=gen, dtype=torch.float64), torch.randn(15, 9, generator=gen, dtype=torch.float64)
    y[:, :3] += 2 * x[:, :3]
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm())
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-12)
    assert 0 < linear_cka(x, y) < 1
    assert linear_cka(torch.ones(5, 3), x[:5]) != linear_cka(torch.ones(5, 3), x[:5])  # NaN: constant features
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:4])


class TwoHeads(nn.Module):
    task_names = ["depth_zbuffer", "normal"]

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh())
        self.heads = nn.ModuleDict({"depth_zbuffer": nn.Conv2d(6, 1, 1), "normal": nn.Conv2d(6, 3, 1)})

    def forward(self, x):
        h = self.trunk(x)
        return {k: head(h) for k, head in self.heads.items()}


def test_the_landscape_is_the_clean_loss_at_its_centre_and_rises_along_the_adversarial_direction():
    torch.manual_seed(0)
    model = TwoHeads().double()
    gen = torch.Generator().manual_seed(2)
    x = 0.25 + 0.5 * torch.rand(3, 3, 5, 5, generator=gen, dtype=torch.float64)  # away from the box edges
    targets = {"depth_zbuffer": torch.rand(3, 1, 5, 5, generator=gen, dtype=torch.float64),
               "normal": torch.rand(3, 3, 5, 5, generator=gen, dtype=torch.float64)}
    records = [tasks.BY_NAME[n] for n in model.task_names]
    result = landscape.landscape(model, x, targets, {}, records, attacked=["normal"], radius=1e-4, points=5)
    with torch.no_grad():
        clean = {r.name: float(r.loss(model(x)[r.name], targets[r.name], None).mean()) for r in records}
    for name in clean:
        assert result["adversarial"][name][2] == pytest.approx(clean[name], rel=1e-12)
        assert result["surface"][name][2][2] == pytest.approx(clean[name], rel=1e-12)
        assert len(result["surface"][name]) == 5 and len(result["random"][name]) == 5
    normal = result["adversarial"]["normal"]
    assert normal[3] > normal[2] and normal[4] > normal[3] and normal[1] < normal[2]  # the L1 loss's sign-step
    with pytest.raises(ValueError, match="odd"):
        landscape.landscape(model, x, targets, {}, records, points=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from mtrobust_fast.data.synth.taskonomy import synthesize
    from mtrobust_fast.models import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("analysis")
    data = synthesize(root / "data", 8, size=32, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    a = save_checkpoint(root / "a.pt", build_model("sd", "resnet18", input_size=32), epoch=0)
    torch.manual_seed(1)
    b = save_checkpoint(root / "b.pt", build_model("d", "resnet18", input_size=32), epoch=0)
    return root, data, a, b


def test_the_cka_command_writes_a_symmetric_matrix_with_a_unit_diagonal(checkpoints, tmp_path, capsys):
    root, data, a, b = checkpoints
    assert cli_main(["analyze", "cka", "--checkpoints", f"{a},{b},{a}", "--data", str(data), "--out", str(tmp_path),
                     "--device", "cpu"]) == 0
    rows = [line.split(",") for line in (tmp_path / "cka.csv").read_text().splitlines()[1:]]
    matrix = [[float(v) for v in row[1:]] for row in rows]
    assert all(matrix[i][i] == pytest.approx(1.0) for i in range(3))
    assert matrix[0][2] == pytest.approx(1.0) and matrix[0][1] == pytest.approx(matrix[1][0])
    assert (tmp_path / "cka.png").stat().st_size > 1000
    assert "features 3/3" in capsys.readouterr().err  # a progress bar per model
    assert cli_main(["analyze", "cka", "--checkpoints", f"{a},{b}", "--data", str(data), "--out", str(tmp_path),
                     "--device", "cpu", "--no-progress"]) == 0
    assert "features" not in capsys.readouterr().err
    assert cli_main(["analyze", "cka", "--checkpoints", f"{a},{root / 'none.pt'}", "--data", str(data),
                     "--out", str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_the_landscape_command_writes_curves_and_a_figure(checkpoints, tmp_path, capsys):
    root, data, a, b = checkpoints
    assert cli_main(["analyze", "landscape", "--checkpoint", str(a), "--data", str(data), "--out", str(tmp_path),
                     "--points", "3", "--limit", "2", "--target", "d", "--device", "cpu"]) == 0
    result = json.loads((tmp_path / "landscape.json").read_text())
    assert result["images"] == 2 and result["attacked"] == ["depth_zbuffer"] and len(result["a"]) == 3
    assert set(result["surface"]) == {"segment_semantic", "depth_zbuffer"}
    assert (tmp_path / "landscape.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "/15 [" in capsys.readouterr().err  # the bar counts every forward pass: 2·3 for the curves + 3·3
    assert cli_main(["analyze", "landscape", "--checkpoint", str(a), "--data", str(data), "--out", str(tmp_path),
                     "--target", "n"]) == 2
    assert "--target" in capsys.readouterr().err

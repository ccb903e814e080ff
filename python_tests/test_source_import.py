"""Checkpoints of the MTRobust / AAAI'22 Taskonomy code: a file written here in the source's layout (every name
and shape, random weights) imports, and the imported model equals a forward pass of the source architecture
written below from the state dict alone (float64); bad files get clear errors; attack and sweep accept them."""
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.data.synth.taskonomy import synthesize
from mtrobust_fast.models import load_checkpoint, read_checkpoint

LAYERS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
DECODER_WIDTHS = (256, 128, 64, 48, 32)
SOURCE_TASKS = {"segmentsemantic": 18, "depth_zbuffer": 1, "normal": 3}


def source_state_dict(arch, tasks=SOURCE_TASKS, seed=0):
    """Every tensor the source's ``ResNet(tasks=...)`` holds, named as its DataParallel-wrapped state dict names
    them, with random float32 values like a real file (He-scaled weights, BatchNorm statistics away from the
    identity)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    def conv(name, out_c, in_c, k, bias=False, transposed=False):
        shape = (in_c, out_c, k, k) if transposed else (out_c, in_c, k, k)
        state[f"module.{name}.weight"] = rand(*shape, scale=(2.0 / (in_c * k * k)) ** 0.5)
        if bias:
            state[f"module.{name}.bias"] = rand(out_c, scale=0.1)

    def bn(name, c):
        state[f"module.{name}.weight"] = 1 + rand(c, scale=0.1)
        state[f"module.{name}.bias"] = rand(c, scale=0.1)
        state[f"module.{name}.running_mean"] = rand(c, scale=0.1)
        state[f"module.{name}.running_var"] = 0.5 + torch.rand(c, generator=gen)
        state[f"module.{name}.num_batches_tracked"] = torch.tensor(1000)

    kind, layers = LAYERS[arch]
    expansion = 1 if kind == "basic" else 4
    conv("encoder.conv1", 64, 3, 7)
    bn("encoder.bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for block in range(blocks):
            stride = 2 if layer > 1 and block == 0 else 1
            prefix = f"encoder.layer{layer}.{block}"
            if kind == "basic":
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            else:
                convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            for i, (out_c, in_c, k) in enumerate(convs, start=1):
                conv(f"{prefix}.conv{i}", out_c, in_c, k)
                bn(f"{prefix}.bn{i}", out_c)
            if stride != 1 or inplanes != planes * expansion:
                conv(f"{prefix}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{prefix}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    for task, channels in tasks.items():
        prefix, previous = f"task_to_decoder.{task}", inplanes
        for i, width in enumerate(DECODER_WIDTHS):
            conv(f"{prefix}.upconv{i}", width, previous, 2, bias=True, transposed=True)
            bn(f"{prefix}.bn_upconv{i}", width)
            if i < 4:
                conv(f"{prefix}.conv_decode{i}", width, width, 3, bias=True)
                bn(f"{prefix}.bn_decode{i}", width)
            previous = width
        conv(f"{prefix}.conv_decode4", channels, 32, 3, bias=True)
    return state


def source_forward(state, arch, images):
    """The source model's forward, written from its module description: [0, 1] images scaled to [-1, 1], the
    ResNet trunk, then each decoder (up-convolution, BN, ReLU, refinement, BN, ReLU; last: up, BN, ReLU, conv)."""
    s = {k[len("module."):]: v.double() for k, v in state.items()}

    def bn(x, name):
        return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                            s[f"{name}.bias"], False, 0.0, 1e-5)

    kind, layers = LAYERS[arch]
    x = F.relu(bn(F.conv2d(images * 2 - 1, s["encoder.conv1.weight"], stride=2, padding=3), "encoder.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for layer, blocks in enumerate(layers, start=1):
        for block in range(blocks):
            p = f"encoder.layer{layer}.{block}"
            stride = 2 if layer > 1 and block == 0 else 1
            if kind == "basic":
                out = F.relu(bn(F.conv2d(x, s[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
                out = bn(F.conv2d(out, s[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
            else:
                out = F.relu(bn(F.conv2d(x, s[f"{p}.conv1.weight"]), f"{p}.bn1"))
                out = F.relu(bn(F.conv2d(out, s[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                out = bn(F.conv2d(out, s[f"{p}.conv3.weight"]), f"{p}.bn3")
            identity = x
            if f"{p}.downsample.0.weight" in s:
                identity = bn(F.conv2d(x, s[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
            x = F.relu(out + identity)
    outputs = {}
    for task in SOURCE_TASKS:
        p, y = f"task_to_decoder.{task}", x
        for i in range(5):
            y = F.conv_transpose2d(y, s[f"{p}.upconv{i}.weight"], s[f"{p}.upconv{i}.bias"], stride=2)
            y = F.relu(bn(y, f"{p}.bn_upconv{i}"))
            if i < 4:
                y = F.relu(bn(F.conv2d(y, s[f"{p}.conv_decode{i}.weight"], s[f"{p}.conv_decode{i}.bias"], padding=1),
                              f"{p}.bn_decode{i}"))
        outputs[task] = F.conv2d(y, s[f"{p}.conv_decode4.weight"], s[f"{p}.conv_decode4.bias"], padding=1)
    return outputs


def _write(path, state, arch="resnet18", **extra):
    torch.save({"epoch": 150, "arch": arch, "state_dict": state, "best_prec1": 0, **extra}, path)
    return path


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_imported_model_equals_the_source_forward(tmp_path, arch):
    state = source_state_dict(arch)
    path = _write(tmp_path / "checkpoint_150.pth.tar", state, arch)
    model, meta = load_checkpoint(path)
    assert model.config["tasks"] == "sdn" and model.config["encoder"] == arch and meta["epoch"] == 150
    assert meta["imported_from"]["arch"] == arch
    model = model.double().eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = source_forward(state, arch, images)
    with torch.no_grad():
        ours = model(images)
    names = {"segmentsemantic": "segment_semantic", "depth_zbuffer": "depth_zbuffer", "normal": "normal"}
    for source, name in names.items():
        assert ours[name].shape == expected[source].shape
        assert torch.allclose(ours[name], expected[source], rtol=1e-9, atol=1e-9), name


def test_bad_source_files_get_clear_errors(tmp_path):
    state = source_state_dict("resnet18", {"segmentsemantic": 18})
    with pytest.raises(ValueError, match=r"does not match architecture resnet50 .* missing .*encoder\.layer1\.0\.conv3"
                                         r".* unexpected"):
        read_checkpoint(_write(tmp_path / "a.tar", state, arch="resnet50"))
    no_decoder = {k: v for k, v in state.items() if "task_to_decoder" not in k}
    with pytest.raises(ValueError, match="no task decoder"):
        read_checkpoint(_write(tmp_path / "b.tar", no_decoder))
    with pytest.raises(ValueError, match=r"1 unexpected \(encoder\.fc\.weight\)"):
        read_checkpoint(_write(tmp_path / "c.tar", {**state, "module.encoder.fc.weight": torch.zeros(3, 512)}))
    without = dict(state)
    del without["module.task_to_decoder.segmentsemantic.bn_decode2.running_var"]
    with pytest.raises(ValueError, match=r"1 missing \(task_to_decoder\.segmentsemantic\.bn_decode2\.running_var\)"):
        read_checkpoint(_write(tmp_path / "d.tar", without))
    reshaped = {**state, "module.encoder.conv1.weight": torch.zeros(64, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"encoder\.conv1\.weight has shape \(64, 3, 3, 3\)"):
        read_checkpoint(_write(tmp_path / "e.tar", reshaped))
    with pytest.raises(ValueError, match="only ResNet-18, ResNet-50, ResNet-152 and Wide-ResNet-50-2"):
        read_checkpoint(_write(tmp_path / "f.tar", state, arch="xception"))
    classifier = {**state, "module.task_to_decoder.class_object.fc.weight": torch.zeros(1000, 512)}
    with pytest.raises(ValueError, match="class_object"):
        read_checkpoint(_write(tmp_path / "g.tar", classifier))
    good = _write(tmp_path / "h.tar", state)
    (tmp_path / "truncated.tar").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="weights_only failed"):
        read_checkpoint(tmp_path / "truncated.tar")


def test_old_files_without_batchnorm_counters_import(tmp_path):
    state = {k: v for k, v in source_state_dict("resnet18", {"depth_zbuffer": 1}).items()
             if not k.endswith("num_batches_tracked")}
    model, _ = load_checkpoint(_write(tmp_path / "old.tar", state))
    assert int(model.encoder.stem[0][1].num_batches_tracked) == 0


def test_import_command_and_attack_on_the_source_file(tmp_path, capsys):
    source = _write(tmp_path / "checkpoint_150.pth.tar", source_state_dict("resnet18", {"segmentsemantic": 18,
                                                                                       "depth_zbuffer": 1}))
    out = tmp_path / "ours.pt"
    assert cli_main(["import-checkpoint", str(source), "--out", str(out)]) == 0
    assert "resnet18 with tasks sd (epoch 150)" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)
    assert payload["meta"]["imported_from"]["path"] == str(source) and payload["config"]["input_size"] == 256
    assert cli_main(["import-checkpoint", str(source), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["import-checkpoint", str(source), "--out", str(tmp_path / "x.pt"), "--arch", "xception"]) == 2
    assert "cannot be imported" in capsys.readouterr().err

    data = synthesize(tmp_path / "data", 12, size=32, seed=0, workers=1, progress=False)
    assert cli_main(["attack", "--checkpoint", str(source), "--data", str(data), "--size", "32", "--steps", "2",
                     "--limit", "2", "--no-progress", "--no-gradients", "--target", "s,sd",
                     "--out", str(tmp_path / "res")]) == 0
    summary = json.loads((tmp_path / "res" / "results.json").read_text())
    assert summary["config"]["model"] == "sd" and summary["summary"]["samples"] == 2


def test_sweep_takes_source_checkpoints_at_their_path_template(tmp_path):
    run = tmp_path / "resnet18_taskonomy_sd_sd" / "savecheckpoint"
    run.mkdir(parents=True)
    _write(run / "checkpoint_150.pth.tar", source_state_dict("resnet18", {"segmentsemantic": 18, "depth_zbuffer": 1}))
    data = synthesize(tmp_path / "data", 12, size=32, seed=0, workers=1, progress=False)
    assert cli_main(["sweep", "--out", str(tmp_path / "out"), "--data", str(data),
                     "--checkpoint", str(run / "checkpoint_150.pth.tar"), "--steps", "1",
                     "--size", "32", "--limit", "2", "--sets", "main", "--no-progress", "--no-gradients"]) == 0
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert set(table["model"]) == {"resnet18_taskonomy_sd_sd_checkpoint_150"} and set(table["model_tasks"]) == {"sd"}

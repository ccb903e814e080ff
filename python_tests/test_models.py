"""Multi-task models: encoders × task sets, input checks, registry errors, checkpoint round-trips."""
import os

import pytest
import torch

from mtrobust_fast import tasks
from mtrobust_fast.models import (
    FORMAT,
    TaskonomyDecoder,
    build_model,
    list_encoders,
    load_checkpoint,
    save_checkpoint,
)

SMALL_ENCODERS = ["resnet18", "resnet18_cpu", "resnet50", "xception_small"]
BIG_ENCODERS = ["resnet152", "resnet50_dilated", "wide_resnet50_2"]
TASK_SETS = ["s", "dnE", "DpA"]  # every channel count (18, 1, 3, 2) appears



@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def _check_outputs(model, task_string, size):
    x = torch.rand(1, 3, size, size)
    with torch.no_grad():
        out = model(x)
        rep = model.encode(x)
    resolved = tasks.resolve(task_string)
    assert list(out) == [t.name for t in resolved]
    for t in resolved:
        assert out[t.name].shape == (1, t.channels, size, size), t.name
        assert torch.isfinite(out[t.name]).all()
    stride = model.encoder.stride
    assert rep.shape == (1, model.encoder.out_channels, size // stride, size // stride)


@pytest.mark.parametrize("task_string", TASK_SETS)
@pytest.mark.parametrize("encoder", SMALL_ENCODERS)
def test_forward_shapes(encoder, task_string):
    model = build_model(task_string, encoder, input_size=64).eval()
    for size in (64, 96):
        _check_outputs(model, task_string, size)


@pytest.mark.slow
@pytest.mark.parametrize("encoder", BIG_ENCODERS)
def test_forward_shapes_big_encoders(encoder):
    model = build_model("sn", encoder, input_size=64).eval()
    for size in (64, 96):
        _check_outputs(model, "sn", size)


def test_all_encoders_are_covered():
    assert sorted(SMALL_ENCODERS + BIG_ENCODERS) == list_encoders()


def test_encoder_channels_and_source_parameter_counts():
    # ResNet-18 trunk of the source: 11,176,512 parameters; its decoder: 1,504,512 + 289·C.
    model = build_model("sn", "resnet18", input_size=64)
    assert model.encoder.out_channels == 512
    assert sum(p.numel() for p in model.encoder.parameters()) == 11_176_512
    for name, channels in (("segment_semantic", 18), ("normal", 3)):
        assert sum(p.numel() for p in model.decoders[name].parameters()) == 1_504_512 + 289 * channels
    assert build_model("s", "xception_small", input_size=64).encoder.out_channels == 256
    assert TaskonomyDecoder(2048, 2).in_channels == 2048


def test_model_normalises_pixels_to_minus_one_one():
    model = build_model("d", "resnet18", input_size=64).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode(x), model.encoder(x * 2 - 1))


def test_config_records_the_recipe():
    model = build_model("Eds", "resnet18", input_size=96, task_weights={"s": 1.0, "d": 0.01, "E": 0.1})
    assert model.config["tasks"] == "sdE"
    assert model.config["encoder"] == "resnet18"
    assert model.config["input_size"] == 96
    assert model.config["task_weights"] == {"segment_semantic": 1.0, "depth_zbuffer": 0.01, "edge_occlusion": 0.1}
    uniform = build_model("sd", "resnet18", input_size=64).config["task_weights"]
    assert uniform == {"segment_semantic": 0.5, "depth_zbuffer": 0.5}


@pytest.mark.parametrize("shape", [(1, 3, 64, 80), (1, 3, 50, 64), (1, 3, 16, 16)])
def test_input_not_divisible_by_32_errors(shape):
    model = build_model("s", "resnet18", input_size=64)
    with pytest.raises(ValueError, match="divisible by 32"):
        model(torch.rand(*shape))


def test_bad_input_shape_and_dtype_error():
    model = build_model("s", "resnet18", input_size=64)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="floating"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_unknown_encoder_lists_choices():
    with pytest.raises(ValueError, match="unknown encoder 'resnet9'") as info:
        build_model("s", "resnet9")
    for name in list_encoders():
        assert name in str(info.value)


def test_source_encoder_aliases():
    assert build_model("s", "xception", input_size=64).config["encoder"] == "xception_small"


@pytest.mark.parametrize("size", [0, 100, 64.0, True])
def test_bad_input_size_errors(size):
    with pytest.raises(ValueError, match="input_size"):
        build_model("s", "resnet18", input_size=size)


def test_bad_task_weights_error():
    with pytest.raises(ValueError, match="task_weights"):
        build_model("sd", "resnet18", input_size=64, task_weights={"s": 1.0})
    with pytest.raises(ValueError, match="task_weights"):
        build_model("sd", "resnet18", input_size=64, task_weights={"s": 1.0, "d": 0.1, "n": 0.1})


def _trained_like(model):
    """Perturb BN running statistics so a round-trip that dropped buffers would be noticed."""
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))
    return model.eval()


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = _trained_like(build_model("sdE", "resnet18", input_size=64, task_weights={"s": 1, "d": 0.01, "E": 0.1}))
    path = save_checkpoint(tmp_path / "ck.pt", model, epoch=3, metrics={"val_loss": 0.5}, note="hello")
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left behind
    loaded, meta = load_checkpoint(path)
    assert meta == {"epoch": 3, "metrics": {"val_loss": 0.5}, "note": "hello"}
    assert loaded.config == model.config
    assert not loaded.training
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    for name in expected:
        assert torch.equal(expected[name], got[name])


def test_checkpoint_round_trip_xception_with_encoder_kwargs(tmp_path):
    model = build_model("n", "xception_small", input_size=64, middle_blocks=1, out_channels=64).eval()
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "x.pt", model))
    assert loaded.encoder.out_channels == 64
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["normal"], loaded(x)["normal"])


def test_checkpoint_is_plain_data_for_weights_only_load(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", build_model("s", "resnet18", input_size=64), epoch=1)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == FORMAT
    assert set(payload) == {"format", "config", "state_dict", "meta"}


def test_checkpoint_refuses_pickled_modules(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "model": build_model("s", "resnet18", input_size=64)}, path)
    with pytest.raises(ValueError, match=r"cannot be read as a checkpoint \(torch.load weights_only failed: "
                                         r"WeightsUnpickler error: Unsupported global"):
        load_checkpoint(path)


def test_checkpoint_rejects_foreign_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"epoch": 1, "state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not an mtrobust-fast checkpoint"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        load_checkpoint(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_state_dict_mismatch_errors(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", build_model("sd", "resnet18", input_size=64))
    payload = torch.load(path, weights_only=True)
    payload["config"]["tasks"] = "sn"  # the decoders in the file no longer match the config
    payload["config"]["task_weights"] = {"segment_semantic": 0.5, "normal": 0.5}
    torch.save(payload, path)
    with pytest.raises(ValueError, match="does not match") as info:
        load_checkpoint(path)
    assert "missing" in str(info.value) and "unexpected" in str(info.value)

    payload["config"]["tasks"] = "sd"
    payload["config"]["task_weights"] = {"segment_semantic": 0.5, "depth_zbuffer": 0.5}
    payload["config"]["encoder"] = "resnet50"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(path)

    payload["config"]["encoder"] = "resnet9"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="cannot rebuild"):
        load_checkpoint(path)


def test_checkpoint_rejects_non_plain_metadata(tmp_path):
    model = build_model("s", "resnet18", input_size=64)
    with pytest.raises(TypeError, match=r"metadata\['opt'\]"):
        save_checkpoint(tmp_path / "ck.pt", model, opt=torch.optim.SGD(model.parameters(), lr=0.1))
    assert not os.listdir(tmp_path)


def test_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(tmp_path):
    model = build_model("d", "resnet18", input_size=32)
    with torch.no_grad():
        model.decoders["depth_zbuffer"][0].weight[0, 0, 0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "nan.pt", model)
    with pytest.raises(ValueError, match=r"tensor decoders\.depth_zbuffer\.0\.weight holds NaN or Inf"):
        load_checkpoint(path)
    truncated = tmp_path / "truncated.pt"
    with open(path, "rb") as f:
        truncated.write_bytes(f.read(4096))
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        load_checkpoint(truncated)


@pytest.mark.parametrize("damage, message", [
    ("int64", r"tensor decoders\.depth_zbuffer\.0\.weight is stored as torch\.int64 .* truncate its values"),
    ("negative_var", r"BatchNorm variance .*running_var has negative entries"),
    ("epoch_text", r"its meta 'epoch' must be an integer >= 0, got '3'"),
])
def test_damaged_checkpoints_are_refused_not_loaded_wrong(tmp_path, damage, message):
    from mtrobust_fast.models.checkpoint import load_plain
    model = build_model("d", "resnet18", input_size=32)
    path = save_checkpoint(tmp_path / "ok.pt", model, epoch=3)
    payload = load_plain(path)
    state = payload["state_dict"]
    if damage == "int64":
        state["decoders.depth_zbuffer.0.weight"] = (state["decoders.depth_zbuffer.0.weight"] * 100).long()
    elif damage == "negative_var":
        name = next(k for k in state if k.endswith("running_var"))
        state[name] = state[name] - 2
    else:
        payload["meta"]["epoch"] = "3"
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message):
        load_checkpoint(tmp_path / "bad.pt")
    assert load_checkpoint(path)[1]["epoch"] == 3


def test_cpu_encoder_decodes_from_stride_16_and_a_trained_tiny_model_beats_its_trivial_predictor():
    from mtrobust_fast import tasks
    from mtrobust_fast.evaluation import baselines
    from mtrobust_fast.models import build_model
    from mtrobust_fast.models.decoders import DenseHead
    torch.manual_seed(0)
    model = build_model("sn", encoder="resnet18_cpu", input_size=32)
    assert model.encoder.stride == 16 and all(isinstance(d, DenseHead) for d in model.decoders.values())
    normal = tasks.get_task("n")
    x = torch.rand(8, 3, 32, 32)
    # a learnable target: each pixel's normal is a fixed function of its colour
    target = torch.stack([x[:, 0] * 2 - 1, x[:, 1] - x[:, 2], x[:, 0] * x[:, 1]], 1)
    mask = torch.ones(8, 1, 32, 32, dtype=torch.bool)
    assert (model(x)[normal.name] == 0).all()  # the zero-initialised output layer predicts 0 at first
    optimizer = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(60):
        loss = normal.loss(model(x)[normal.name], target, mask).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        mse = normal.metric_scores(normal.metric_stats(model(x)[normal.name], target, mask))["mse"]
    batch = (x, {normal.name: target}, {normal.name: mask})
    trivial = baselines.trivial_scores([normal], [batch], [batch])[normal.name]
    assert mse < 0.7 * trivial["mse"], (mse, trivial)


def test_cpu_encoder_classifies_32_px_images_with_the_small_input_stem():
    from mtrobust_fast.models import build_classifier
    model = build_classifier("resnet18_cpu", classes=10, input_size=32)
    assert model.encoder.stride == 8 and model.encoder.out_channels == 128  # stride-1 stem, quarter width
    assert model(torch.rand(2, 3, 32, 32))["class"].shape == (2, 10)

"""The one registry mechanism: declared settings reach the CLI, the sweep and the results table; a new attack
with one option, registered in this file alone, is usable from `attack`, `sweep` and `report`; the library
does not import the CLI."""
import ast
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

import mtrobust_fast
from mtrobust_fast.attacks import ATTACKS, PGD
from mtrobust_fast.cli import main as cli_main
from mtrobust_fast.cli.settings import flag
from mtrobust_fast.data.synth.taskonomy import synthesize
from mtrobust_fast.models import build_model, save_checkpoint
from mtrobust_fast.registry import Registry, Setting, SettingValueError, number
from mtrobust_fast.sweep import plan

SIZE = 32


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    data = synthesize(root / "data", 4, size=SIZE, seed=0, workers=1, progress=False)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "sd.pt", build_model("sd", "resnet18", input_size=SIZE), epoch=0)
    return root, data, checkpoint


def _help(capsys, *command):
    with pytest.raises(SystemExit):
        cli_main([*command, "--help"])
    return capsys.readouterr().out


def test_every_declared_attack_setting_is_a_flag_of_attack_and_every_sweep_key_one_of_sweep(capsys):
    attack_help, sweep_help = _help(capsys, "attack"), _help(capsys, "sweep")
    for name, setting in ATTACKS.settings().items():
        assert flag(setting) in attack_help, name
        assert (flag(setting) in sweep_help) == bool(setting.sweep), name
    for name in ATTACKS:
        assert name in attack_help


# A value away from the default of every sweep key the attacks declare; a new sweep key must add one here.
SAMPLES = {"alpha": "1/255", "steps": 1, "dense_loss": "js", "normalize_task_grads": True, "grid_weights": "0,1",
           "grid_task": "d", "early_exit": False}


def test_every_sweep_key_is_accepted_by_the_sweep_and_lands_in_the_table(setup, tmp_path):
    root, data, checkpoint = setup
    keys = plan.attack_keys()
    assert set(keys) == set(SAMPLES), "give every declared sweep key a sample value"
    takers = {name: ATTACKS.takers(name) for name in keys}
    attacks = sorted({taker for names in takers.values() for taker in names[:1]} | {"wgd", "grid"})
    settings = {"data": str(data), "models": [str(checkpoint)], "attacks": attacks, "sets": ["sd"], "limit": 1,
                "batch_size": 1, "gradients": False, **SAMPLES}
    cells = plan.expand(settings, tmp_path)
    for cell in cells:  # each key reaches the cells of the attacks that take it, and only those
        for name in keys:
            value = getattr(cell, name) if name in ("alpha", "steps") else cell.options.get(name)
            assert (value is not None) == (cell.attack in takers[name]), (cell.attack, name)
    argv = ["sweep", "--out", str(tmp_path / "out"), "--data", str(data), "--checkpoint", str(checkpoint),
            "--attack", ",".join(attacks), "--sets", "sd", "--limit", "1", "--batch-size", "1", "--no-gradients",
            "--no-progress", *(item for name, value in SAMPLES.items() for item in
                               ((flag(keys[name]),) if value is False and keys[name].default is True  # a --no- switch
                                else (flag(keys[name]), str(value).lower()) if isinstance(value, bool)
                                else (flag(keys[name]), str(value))))]
    assert cli_main(argv) == 0
    table = pd.read_parquet(tmp_path / "out" / "results.parquet")
    wgd = table[table["attack"] == "wgd"]
    assert set(wgd["normalize_task_grads"]) == {"true"} and set(wgd["dense_loss"]) == {"js"}
    grid = table[table["attack"] == "grid"]
    assert set(grid["grid_weights"]) == {"0,1"} and set(grid["grid_task"]) == {"d"}
    assert set(table["steps"]) == {1}
    assert set(wgd["attack_options"]) == {"normalize_task_grads=true dense_loss=js early_exit=false"}
    assert set(wgd["early_exit"]) == {"false"}
    for name in keys:
        assert name in table.columns, name


def test_new_sweep_keys_leave_the_ids_of_cells_that_do_not_set_them(setup, tmp_path):
    root, data, checkpoint = setup
    settings = {"data": str(data), "models": [str(checkpoint)], "attacks": ["pgd", "wgd"]}
    plain = {c.attack: c.cell_id for c in plan.expand(settings, tmp_path)}
    explicit = {c.attack: c.cell_id for c in plan.expand({**settings, "normalize_task_grads": [False]}, tmp_path)}
    assert plain == explicit  # False is WGD's default: the same computation, the same cell
    both = plan.expand({**settings, "normalize_task_grads": [False, True], "dense_loss": ["none", "segpgd"]},
                       tmp_path)
    assert len(both) == 2 + 4 and {c.cell_id for c in both} >= set(plain.values())


# ---- a new attack with one option, declared and registered here alone ----

TOY_SCALE = Setting("toy_scale", number, 1.0, low=0, high=4, sweep="grid",
                    help="multiplies the step size of the toy attack")


class ToyPGD(PGD):
    """PGD whose step size is ``toy_scale`` times PGD's."""

    settings = PGD.settings + (TOY_SCALE,)

    def __init__(self, model, tasks=None, *, toy_scale=1.0, **kwargs):
        super().__init__(model, tasks, **kwargs)
        self.toy_scale = TOY_SCALE.parse(toy_scale)
        self.alpha = self.alpha * self.toy_scale


@pytest.fixture
def toy():
    ATTACKS.register("toy")(ToyPGD)
    yield ToyPGD
    ATTACKS.unregister("toy")


def test_a_toy_attack_registered_in_one_file_is_usable_from_attack_sweep_and_report(toy, setup, tmp_path, capsys):
    root, data, checkpoint = setup
    common = ["--data", str(data), "--checkpoint", str(checkpoint), "--limit", "1", "--no-gradients",
              "--no-progress"]
    assert "--toy-scale" in _help(capsys, "attack") and "--toy-scale" in _help(capsys, "sweep")
    assert cli_main(["attack", *common, "--attack", "toy", "--toy-scale", "0.5", "--steps", "2",
                     "--out", str(tmp_path / "attack")]) == 0
    config = json.loads((tmp_path / "attack" / "results.json").read_text())["config"]
    assert config["toy_scale"] == 0.5 and config["attack_options"] == "toy_scale=0.5"
    assert config["alpha"] == pytest.approx(0.5 * 2.5 * (8 / 255) / 2)
    capsys.readouterr()
    assert cli_main(["attack", *common, "--attack", "pgd", "--toy-scale", "0.5"]) == 2
    assert "--toy-scale: pgd does not take it" in capsys.readouterr().err

    out = tmp_path / "sweep"
    assert cli_main(["sweep", "--out", str(out), *common, "--attack", "toy,pgd", "--toy-scale", "0.5,1",
                     "--steps", "1", "--sets", "sd"]) == 0
    table = pd.read_parquet(out / "results.parquet")
    assert sorted(table.groupby("attack")["cell_id"].nunique().items()) == [("pgd", 1), ("toy", 2)]
    assert set(table[table["attack"] == "toy"]["attack_options"]) == {"toy_scale=0.5", ""}
    assert set(table[table["attack"] == "toy"]["toy_scale"]) == {"0.5", "1"}

    assert cli_main(["report", str(out / "results.parquet"), "--out", str(tmp_path / "report")]) == 0
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "toy_scale=0.5" in summary


def test_a_bad_value_of_a_declared_setting_is_refused_at_parsing(toy, setup, capsys):
    root, data, checkpoint = setup
    with pytest.raises(SystemExit):
        cli_main(["attack", "--data", str(data), "--checkpoint", str(checkpoint), "--attack", "toy",
                  "--toy-scale", "9"])
    assert "argument --toy-scale: must be <= 4" in capsys.readouterr().err


def test_the_registry_refuses_a_second_name_and_a_conflicting_declaration():
    registry = Registry("widget")

    @registry.register("a")
    class A:
        settings = (Setting("size", number, 1.0),)

    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(A)

    class B:
        settings = (Setting("size", number, 2.0),)

    with pytest.raises(ValueError, match="declares setting 'size' differently"):
        registry.register("b")(B)
    with pytest.raises(ValueError, match="unknown widget 'c'; choose one of a"):
        registry.get("c")
    assert A.registered_name == "a" and registry.takers("size") == ["a"]


def test_setting_errors_name_the_setting():
    setting = Setting("scale", number, 1.0, low=0, choices=None)
    assert setting.parse("8/255") == pytest.approx(8 / 255) and setting.parse(None) is None
    for bad in ("x", -1, float("nan"), True):
        with pytest.raises(SettingValueError, match="^scale: ") as caught:
            setting.parse(bad)
        assert caught.value.setting == "scale"


def test_no_module_outside_cli_imports_the_cli():
    package = Path(mtrobust_fast.__file__).parent
    offenders = []
    for path in package.rglob("*.py"):
        if "cli" in path.relative_to(package).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "mtrobust_fast":
                names = [f"mtrobust_fast.{alias.name}" for alias in node.names]
            if any(name == "mtrobust_fast.cli" or name.startswith("mtrobust_fast.cli.") for name in names):
                offenders.append(str(path.relative_to(package)))
    assert offenders == []


def test_training_components_declare_their_settings_once_for_config_flags_and_resume(capsys):
    """Every setting an adversarial objective or an auxiliary task declares is a training-config field with the
    declared default and check, a `train` flag, and a setting a resume must not change."""
    from mtrobust_fast.tasks.auxiliary import AUXILIARY
    from mtrobust_fast.training.adversarial import OBJECTIVES
    from mtrobust_fast.training.config import RESUME_FIXED, TrainConfig

    declared = {**OBJECTIVES.settings(), **AUXILIARY.settings()}
    assert {"beta", "replays", "jigsaw_permutations", "jigsaw_grid"} <= set(declared)
    config = TrainConfig(data="d", out="o")
    train_help = _help(capsys, "train")
    for name, setting in declared.items():
        assert getattr(config, name) == setting.default and name in RESUME_FIXED
        assert flag(setting) in train_help
    with pytest.raises(ValueError, match="^replays: must be >= 1"):
        TrainConfig(data="d", out="o", replays=0)


def test_a_reader_registered_in_one_file_is_detected_and_opened(tmp_path):
    from torch.utils.data import TensorDataset

    from mtrobust_fast.data.classification import is_classification_data, open_classification
    from mtrobust_fast.data.readers import READERS

    class ToyReader:
        priority = -1
        settings = ()

        @staticmethod
        def detect(root):
            return (Path(root) / "toy.txt").is_file()

        @classmethod
        def open(cls, root, split, size):
            return TensorDataset(torch.zeros(3, 3, 4, 4))

    (tmp_path / "toy.txt").write_text("x")
    assert not is_classification_data(tmp_path)
    READERS.register("toy")(ToyReader)
    try:
        assert is_classification_data(tmp_path) and len(open_classification(tmp_path, "val")) == 3
        with pytest.raises(ValueError, match=f"domain_labels: {tmp_path} holds no .*readers that have them: "):
            open_classification(tmp_path, "val", domain=True)
    finally:
        READERS.unregister("toy")


def test_one_budget_rule_for_every_front_end():
    """A budget is refused above 1 pixel unit whichever units it was given in (the attack and sweep commands
    accepted 300 grey levels, eps = 1.18, which training refused)."""
    from mtrobust_fast import budgets

    assert budgets.to_pixels(8, 255) == pytest.approx(8 / 255) and budgets.to_pixels(0.5) == 0.5
    with pytest.raises(ValueError, match="300 grey levels is more than the whole range"):
        budgets.to_pixels(300, 255)
    with pytest.raises(ValueError, match="eps: 8 is above 1"):
        budgets.to_pixels(8)


def test_grey_levels_above_the_range_are_refused_by_attack_and_sweep(setup, tmp_path, capsys):
    root, data, checkpoint = setup
    common = ["--data", str(data), "--checkpoint", str(checkpoint), "--eps-units", "255", "--eps", "300"]
    assert cli_main(["attack", *common, "--limit", "1"]) == 2
    assert "--eps: 300 grey levels is more than the whole range" in capsys.readouterr().err
    assert cli_main(["sweep", "--out", str(tmp_path), *common]) == 2
    assert "eps[0]: 300 grey levels" in capsys.readouterr().err

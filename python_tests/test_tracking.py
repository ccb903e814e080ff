"""Tracking: local files hold what was logged; the Comet offline archive holds the metrics but never the key."""
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from mtrobust_fast.tracking import REDACTED, make_tracker, scrub

FAKE_KEY = "fakeCometKey0123456789abcdefXYZ"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_local_files_hold_logged_values(tmp_path, monkeypatch):
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    fig = tmp_path / "fig.png"
    fig.write_bytes(b"\x89PNG fake")
    with make_tracker("local", tmp_path / "run") as tr:
        tr.log_parameters({"model": "resnet18", "eps": 8 / 255})
        tr.log_metrics({"acc": 0.5, "loss": 1.25}, step=3, prefix="cell0")
        tr.log_curve("cell0/pgd_loss", [1.0, 2.0, 3.0])
        tr.log_figure(fig)
    d = tmp_path / "run" / "tracking"
    assert read_jsonl(d / "parameters.jsonl") == [{"model": "resnet18", "eps": 8 / 255}]
    assert read_jsonl(d / "metrics.jsonl") == [{"step": 3, "metrics": {"cell0/acc": 0.5, "cell0/loss": 1.25}}]
    assert read_jsonl(d / "curves.jsonl") == [{"name": "cell0/pgd_loss", "values": [1.0, 2.0, 3.0]}]
    assert read_jsonl(d / "figures.jsonl") == [{"path": str(fig.resolve())}]
    with pytest.raises(FileNotFoundError):
        make_tracker("local", tmp_path / "run").log_figure(tmp_path / "missing.png")


def test_secret_looking_parameters_are_scrubbed(tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_API_KEY", FAKE_KEY)
    params = {"comet_api_key": "x", "hf_token": "y", "client_secret": "z", "apiKey": "w", "note": f"k={FAKE_KEY}",
              "nested": {"password": "p", "lr": 0.1, "copy": FAKE_KEY}, "eps": 0.03}
    assert scrub(params) == {"comet_api_key": REDACTED, "hf_token": REDACTED, "client_secret": REDACTED,
                             "apiKey": REDACTED, "note": REDACTED,
                             "nested": {"password": REDACTED, "lr": 0.1, "copy": REDACTED}, "eps": 0.03}
    make_tracker("local", tmp_path).log_parameters(params)
    assert FAKE_KEY not in (tmp_path / "tracking" / "parameters.jsonl").read_text()


def test_online_without_key_fails_before_any_network(tmp_path, monkeypatch):
    monkeypatch.delenv("COMET_API_KEY", raising=False)
    # A comet_ml stand-in that fails on use: the error must come before Comet is even touched.
    monkeypatch.setitem(sys.modules, "comet_ml", None)
    with pytest.raises(RuntimeError, match="COMET_API_KEY"):
        make_tracker("comet", tmp_path)
    with pytest.raises(ValueError, match="unknown tracker"):
        make_tracker("wandb", tmp_path)


OFFLINE_SCRIPT = textwrap.dedent("""
    import sys
    from mtrobust_fast.tracking import make_tracker
    run_dir = sys.argv[1]
    with make_tracker("comet-offline", run_dir, project=sys.argv[3], experiment_name="probe") as tr:
        tr.log_parameters({"model": "resnet18", "comet_api_key": "leak?"})
        tr.log_metrics({"vulnerability": 0.4321}, step=0, prefix="cell0")
        tr.log_curve("cell0/pgd_loss", [0.25, 0.5, 0.75])
        tr.log_figure(sys.argv[2])
""")


@pytest.mark.parametrize("project", ["mtrobust-test", "key"])  # "key": the API key given as the project by mistake
def test_comet_offline_archive_has_metrics_not_key(tmp_path, project):
    pytest.importorskip("comet_ml", reason="comet_ml is not installed (pip install comet_ml)")
    fig = tmp_path / "heatmap.png"
    fig.write_bytes(b"\x89PNG fake image bytes")
    run_dir = tmp_path / "run"
    env = dict(os.environ, COMET_API_KEY=FAKE_KEY, HOME=str(tmp_path))  # HOME: no ~/.comet.config is read
    # A subprocess with a timeout: a Comet version that reaches for the network cannot hang the suite, and its
    # console output can be checked for the key too.
    project = FAKE_KEY if project == "key" else project
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT, str(run_dir), str(fig), project], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert FAKE_KEY not in proc.stdout + proc.stderr
    archives = list((run_dir / "comet").glob("*.zip"))
    assert len(archives) == 1
    with zipfile.ZipFile(archives[0]) as z:
        contents = {name: z.read(name) for name in z.namelist()}
    assert all(FAKE_KEY.encode() not in data for data in contents.values())
    messages = [json.loads(line) for line in contents["messages.json"].decode().splitlines()]
    metrics = {(m["payload"]["metric"]["metricName"], m["payload"]["metric"]["step"]):
               m["payload"]["metric"]["metricValue"] for m in messages if m["type"] == "metric_msg"}
    assert metrics[("cell0/vulnerability", 0)] == pytest.approx(0.4321)
    assert [metrics[("cell0/pgd_loss", i)] for i in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    params = {m["payload"]["param"]["paramName"]: m["payload"]["param"]["paramValue"]
              for m in messages if m["type"] == "parameter_msg"}
    assert params["model"] == "resnet18" and params["comet_api_key"] == REDACTED
    assert any(data == fig.read_bytes() for data in contents.values())  # the figure went into the archive
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert read_jsonl(run_dir / "tracking" / "metrics.jsonl")[0]["metrics"] == {"cell0/vulnerability": 0.4321}

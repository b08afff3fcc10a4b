"""The train stage as a real process: killed with -9 or SIGTERM and rerun, an MLflow server that goes
away mid-run, a run that fails, and two processes under torchrun (gloo on the CPU)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, free_port, make_dataset, stop_server, wait_http
from deepfake_detector.heads import load_checkpoint

pytestmark = pytest.mark.slow  # every test here trains in real processes, some of them twice

EPOCHS = 3
# Big enough that an epoch takes a noticeable time (a signal lands inside a run), small enough for CI.
# With a moving average of the weights, so that its state is resumed and gathered too.
SMALL = ["-S", "model.arch=cnn", "-S", "model.pretrained=none", "-S", "model.channels=[16,32,64]",
         "-S", "model.hidden=16",
         "-S", f"train.epochs={EPOCHS}", "-S", "train.batch_size=16", "-S", "train.lr=0.003", "-S", "train.device=cpu",
         "-S", "train.ema_epochs=1", "-S", "seed=7"]


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """Synthetic faces at 48 px, 192 training images."""
    from deepfake_detector import preprocess
    from deepfake_detector.params import BlurParams, NoiseParams, PreprocessParams

    root = tmp_path_factory.mktemp("resume-data")
    make_dataset(root / "raw", per_class=96, size=48)
    params = PreprocessParams(image_size=48, min_source_size=16, blur=BlurParams(prob=0.3),
                              noise=NoiseParams(prob=0.3))
    preprocess.run(root / "raw", root / "processed", params, seed=0, workers=1, progress=False)
    return root / "processed"


def env(tracking: str | None = None) -> dict[str, str]:
    e = dict(os.environ, PYTHONUNBUFFERED="1", CI="true", OMP_NUM_THREADS="1")
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e.pop("MLFLOW_TRACKING_URI", None)
    if tracking:
        e["MLFLOW_TRACKING_URI"] = tracking
    return e


def train_cmd(processed: Path, out: Path, *extra: str, tracking: bool = True) -> list[str]:
    return [sys.executable, "-m", "deepfake_detector.cli", "train", "--params", str(ROOT / "params.yaml"),
            "--data", str(processed), "--out", str(out), *SMALL, "-S", f"mlflow.enabled={str(tracking).lower()}",
            "-S", "mlflow.experiment=resume-tests", *extra]


def run_train(cmd: list[str], cwd: Path, tracking: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env(tracking), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def start_until(cmd: list[str], cwd: Path, line: str,
                tracking: str | None = None) -> tuple[subprocess.Popen, list[str]]:
    """Start ``cmd`` and read its output until a line starting with ``line``; returns the process and lines."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(tracking), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = []
    for out in proc.stdout:
        seen.append(out)
        if out.startswith(line):
            return proc, seen
    proc.wait()
    pytest.fail(f"never printed {line!r} (exit {proc.returncode}):\n{''.join(seen)}")


def same_weights(a: Path, b: Path) -> bool:
    ma, _ = load_checkpoint(a)
    mb, _ = load_checkpoint(b)
    return all(torch.equal(x, y) for x, y in zip(ma.state_dict().values(), mb.state_dict().values()))


def history(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(processed, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "models"
    run_train(train_cmd(processed, out, tracking=False), out.parent)
    return out


def runs(db: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("resume-tests")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def test_kill_9_after_epoch_1_then_rerun_matches_an_uninterrupted_run(processed, uninterrupted, tmp_path):
    out = tmp_path / "models"
    db = tmp_path / "mlflow.db"
    tracking = f"sqlite:///{db}"
    proc, _ = start_until(train_cmd(processed, out), tmp_path, "epoch 1:", tracking)
    proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "model.pt").exists() and list((out / ".ckpt").glob("epoch-*.pt"))
    first_run = runs(db)[0].info.run_id
    result = run_train(train_cmd(processed, out), tmp_path, tracking)
    assert "resuming from" in result.stdout
    assert "epoch 1:" not in result.stdout  # epoch 1 came from the checkpoint
    assert same_weights(out / "model.pt", uninterrupted / "model.pt")
    assert history(out / "history.csv") == history(uninterrupted / "history.csv")
    # The same MLflow run went on, and has every epoch; the checkpoints are gone once the stage succeeded.
    (run,) = runs(db)
    assert run.info.run_id == first_run and run.info.status == "FINISHED"
    import mlflow

    steps = [m.step for m in mlflow.MlflowClient(tracking_uri=tracking).get_metric_history(first_run, "valid_auc")]
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
    assert not (out / ".ckpt").exists()


def test_sigterm_checkpoints_mid_run_ends_killed_and_resumes_bit_identical(processed, uninterrupted, tmp_path):
    out = tmp_path / "models"
    db = tmp_path / "mlflow.db"
    proc, _ = start_until(train_cmd(processed, out), tmp_path, "epoch 1:", f"sqlite:///{db}")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait() == 128 + signal.SIGTERM, rest
    assert "a rerun resumes from the checkpoint" in rest
    assert runs(db)[0].info.status == "KILLED"
    # Stopped inside epoch 2 (or at its first step, if the signal came during validation).
    assert list((out / ".ckpt").glob("epoch-0002-step-*.pt")) or list((out / ".ckpt").glob("epoch-0001-step-*.pt"))
    run_train(train_cmd(processed, out), tmp_path, f"sqlite:///{db}")
    assert same_weights(out / "model.pt", uninterrupted / "model.pt")
    assert history(out / "history.csv") == history(uninterrupted / "history.csv")
    assert [r.info.status for r in runs(db)] == ["FINISHED"]


def test_checkpoint_for_other_params_is_ignored(processed, tmp_path):
    out = tmp_path / "models"
    proc, _ = start_until(train_cmd(processed, out, tracking=False), tmp_path, "epoch 1:")
    proc.kill()
    proc.wait()
    result = run_train(train_cmd(processed, out, "-S", "train.lr=0.001", tracking=False), tmp_path)
    assert "made for other train params or data" in result.stdout and "epoch 1:" in result.stdout


def test_failing_stage_leaves_its_run_failed(processed, tmp_path):
    import shutil

    broken = tmp_path / "processed"
    shutil.copytree(processed, broken)
    index = broken / "valid" / "index.csv"
    index.write_text("".join(index.read_text().splitlines(keepends=True)[:-3]))  # 3 labels short
    db = tmp_path / "mlflow.db"
    result = subprocess.run(train_cmd(broken, tmp_path / "models"), cwd=tmp_path, env=env(f"sqlite:///{db}"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "labels" in result.stderr
    assert [r.info.status for r in runs(db)] == ["FAILED"]


def test_mlflow_server_down_mid_run_loses_no_metric(processed, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                  "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"]

    def start_server() -> subprocess.Popen:
        log = tmp_path / "server.log"
        server = subprocess.Popen(server_cmd, stdout=log.open("a"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        wait_http(f"{url}/health", server, log)
        return server

    server = start_server()
    try:
        proc, seen = start_until(train_cmd(processed, tmp_path / "models", "-S", "train.epochs=4"), tmp_path,
                                 "epoch 1:", url)
        os.killpg(server.pid, signal.SIGKILL)  # the server and its workers vanish without a goodbye
        server.wait()
        for line in proc.stdout:  # training goes on without the server
            seen.append(line)
            if line.startswith("epoch 2:"):
                break
        server = start_server()
        seen.append(proc.stdout.read())
        assert proc.wait(timeout=300) == 0, "".join(seen)
        log = "".join(seen)
        assert log.count("MLflow did not take the metrics") == 1, log
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=url)
        (run,) = client.search_runs([client.get_experiment_by_name("resume-tests").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("valid_auc", "train_loss", "lr"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4], key
    finally:
        stop_server(server, group=True)


def test_torchrun_two_processes_train_once_with_one_run(processed, tmp_path):
    from deepfake_detector.batches import Batches
    from deepfake_detector.distributed import SINGLE, train_command
    from deepfake_detector.heads import load_checkpoint as load
    from deepfake_detector.metrics import compute_metrics
    from deepfake_detector.preprocess import load_split
    from deepfake_detector.train import validate

    out = tmp_path / "models"
    db = tmp_path / "mlflow.db"
    overrides = [*SMALL[1::2], "mlflow.enabled=true", "mlflow.experiment=resume-tests"]  # train_cmd's -S values
    result = subprocess.run(train_command(2, ROOT / "params.yaml", processed, out, overrides=overrides), cwd=tmp_path,
                            env=env(f"sqlite:///{db}"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.startswith("epoch ")] == [
        f"epoch {e}" for e in range(1, EPOCHS + 1)]  # rank 0 alone reports
    (run,) = runs(db)
    assert run.info.status == "FINISHED" and run.data.params["train.epochs"] == str(EPOCHS)
    assert not (out / ".ckpt").exists()
    with (out / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    # The valid metrics gathered over both ranks are those of one process scoring every image once.
    model, ckpt = load(out / "model.pt")
    images, labels = load_split(processed, "valid")
    p_fake = validate(model, Batches(images, labels, torch.device("cpu"), False), 32, SINGLE)
    single = compute_metrics(labels, p_fake)
    best = rows[ckpt["epoch"] - 1]
    assert float(best["valid_auc"]) == pytest.approx(single["roc_auc"], abs=1e-6)
    assert float(best["valid_loss"]) == pytest.approx(single["log_loss"], abs=1e-5)

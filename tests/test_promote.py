"""`deepfake promote` against a real `mlflow server` on loopback: gates, tags, dry run, force."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, stop_server, wait_http
from deepfake_detector.params import ParamsError, PromoteParams, from_dict
from deepfake_detector.promote import decide, robustness_drop

NAME = "deepfake-detector"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real MLflow tracking server and registry, started for these tests and stopped after."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "artifacts"),
         "--workers", "1"],
        stdout=(root / "server.log").open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", proc, root / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=server)
    client.create_registered_model(NAME)
    return client


def challenger(client, auc: float, worst_robust_auc: float) -> str:
    """A run with evaluation metrics, registered as a new version and aliased challenger."""
    experiment = client.get_experiment_by_name("promote-tests") or client.get_experiment(
        client.create_experiment("promote-tests"))
    run = client.create_run(experiment.experiment_id)
    for key, value in {"test_roc_auc": auc, "test_robustness.jpeg_q30.auc": worst_robust_auc,
                       "test_robustness.blur_s1.auc": auc - 0.01}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    source = f"{run.info.artifact_uri}/model"  # promotion reads metrics, never the weights
    version = client.create_model_version(NAME, source, run_id=run.info.run_id).version
    client.set_registered_model_alias(NAME, "challenger", version)
    return str(version)


def promote(server: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MLFLOW_TRACKING_URI=server)
    return subprocess.run([sys.executable, "-m", "deepfake_detector.cli", "promote", "--params",
                           str(ROOT / "params.yaml"), *args], env=env, capture_output=True, text=True, timeout=120)


def champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, "champion").version)


@pytest.mark.slow
def test_promotion_moves_champion_only_through_the_gates(server, client):
    # 1. No champion yet: a good challenger is promoted, and the version records why.
    v1 = challenger(client, auc=0.95, worst_robust_auc=0.85)
    result = promote(server)
    assert result.returncode == 0, result.stderr
    assert champion(client) == v1
    tags = client.get_model_version(NAME, v1).tags
    assert tags["promotion.decision"] == "promoted" and "no champion" in tags["promotion.reasons"]

    # 2. Worse than the champion by more than max_auc_drop: rejected, champion stays, tags say why.
    v2 = challenger(client, auc=0.90, worst_robust_auc=0.85)
    result = promote(server)
    assert result.returncode == 1 and "@champion unchanged" in result.stdout
    assert champion(client) == v1
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.compared_with"] == v1
    assert "FAIL: test AUC 0.9000 < champion's 0.9500" in tags["promotion.reasons"]

    # 3. A dry run reports but changes nothing.
    v3 = challenger(client, auc=0.96, worst_robust_auc=0.90)
    result = promote(server, "--dry-run")
    assert result.returncode == 0
    assert f"dry run, nothing changed: {NAME} version {v3} would become @champion" in result.stdout
    assert champion(client) == v1 and "promotion.decision" not in client.get_model_version(NAME, v3).tags

    # 4. Too fragile under perturbations: rejected even though its clean AUC is the best.
    client.set_registered_model_alias(NAME, "challenger", v3)
    v4 = challenger(client, auc=0.97, worst_robust_auc=0.60)
    result = promote(server)
    assert result.returncode == 1 and champion(client) == v1
    assert "FAIL: worst robustness AUC drop 0.3700" in client.get_model_version(NAME, v4).tags["promotion.reasons"]

    # 5. --force promotes past the gates, and says so.
    result = promote(server, "--force")
    assert result.returncode == 0 and champion(client) == v4
    assert client.get_model_version(NAME, v4).tags["promotion.decision"] == "forced"


@pytest.mark.slow
def test_a_registry_that_does_not_answer_is_a_clear_error():
    start = time.monotonic()
    result = promote(f"http://127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 60
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "deepfake promote: error: cannot" in result.stderr


def evaluated(sd_auc: float | None, utk_fpr: float | None = None) -> dict[str, float]:
    """Run metrics as the evaluate stage logs them (flattened), with per-source AUCs unless ``sd_auc`` is
    None, and the real sources' false positive rates (stylegan's reals 0.08, utk's) unless ``utk_fpr`` is."""
    metrics = {"test_roc_auc": 0.95, "test_robustness.jpeg_q30.auc": 0.92, "test_robustness.blur_s0.5.auc": 0.9,
               # A row's per-source figures, even of a source named "auc", are not robustness rows.
               "test_robustness.blur_s0.5.sources.sd": 0.1, "test_robustness.jpeg_q30.sources.auc": 0.1,
               "test_robustness.jpeg_q30.source_fpr.auc": 0.1}
    if sd_auc is not None:
        metrics |= {"test_per_source.stylegan.roc_auc": 0.97, "test_per_source.stylegan.recall": 0.1,
                    "test_per_source.sd.roc_auc": sd_auc, "test_per_source.sd.n_fake": 40.0}
    if utk_fpr is not None:
        metrics |= {"test_per_source.stylegan.false_positive_rate": 0.08, "test_per_source.stylegan.n_real": 100.0,
                    "test_per_source.utk.false_positive_rate": utk_fpr, "test_per_source.utk.real_roc_auc": 0.6,
                    "test_robustness.jpeg_q30.source_fpr.utk": 0.9}
    return metrics


def test_robustness_drop_reads_only_the_rows_auc():
    assert robustness_drop(evaluated(0.9, utk_fpr=0.1)) == pytest.approx(0.95 - 0.9)


def test_the_worst_source_gates_promotion():
    gates = PromoteParams(min_source_auc=0.8)
    passed, reasons = decide(evaluated(0.6), None, gates)
    assert not passed and "FAIL: worst source sd's test AUC 0.6000 < min_source_auc 0.8" in reasons
    assert sum(r.startswith("FAIL") for r in reasons) == 1  # the other gates pass
    passed, reasons = decide(evaluated(0.85), None, gates)
    assert passed and "pass: worst source sd's test AUC 0.8500 >= min_source_auc 0.8" in reasons
    passed, reasons = decide(evaluated(float("nan")), None, gates)  # undefined: no reals in the test split
    assert not passed and "FAIL: worst source sd's test AUC nan < min_source_auc 0.8" in reasons
    passed, reasons = decide(evaluated(None), None, gates)  # a run from before sources were named
    assert passed and "pass: no per-source metrics (one source)" in reasons


UTK = "worst real source utk's test false positive rate"


def test_the_worst_real_source_s_false_positive_rate_gates_promotion():
    gates = PromoteParams(max_source_fpr=0.2)
    passed, reasons = decide(evaluated(0.9, utk_fpr=0.35), None, gates)
    assert not passed and reasons[-1] == f"FAIL: {UTK} 0.3500 > max_source_fpr 0.2"
    assert sum(r.startswith("FAIL") for r in reasons) == 1  # the other gates pass
    passed, reasons = decide(evaluated(0.9, utk_fpr=0.2), None, gates)  # at the limit
    assert passed and reasons[-1] == f"pass: {UTK} 0.2000 <= max_source_fpr 0.2"
    passed, reasons = decide(evaluated(0.9, utk_fpr=0.01), None, gates)  # stylegan's reals are now the worst
    assert passed and "worst real source stylegan's test false positive rate 0.0800" in reasons[-1]
    passed, reasons = decide(evaluated(0.9, utk_fpr=float("nan")), None, gates)  # undefined counts as worst
    assert not passed and reasons[-1].startswith(f"FAIL: {UTK} nan")
    for older in (evaluated(0.9), evaluated(None)):  # evaluated before real sources were reported
        passed, reasons = decide(older, None, gates)
        assert passed and reasons[-1] == ("pass: no per-source false positive rates "
                                          "(evaluated before real sources were reported)")
    with pytest.raises(ParamsError, match="promote.max_source_fpr must be between 0 and 1, got 1.5"):
        from_dict({"promote": {"max_source_fpr": 1.5}})

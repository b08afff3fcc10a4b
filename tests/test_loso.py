"""Leave one source out on a tiny two-source set: the subset folders, the matrix, the MLflow run."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ONE_ROBUSTNESS_ROW, ROOT, TINY_RUN, make_dataset, one_class_source
from deepfake_detector import cli, loso
from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, with_overrides
from deepfake_detector.preprocess import load_split
from deepfake_detector.stages import download, preprocess

PER_CLASS = 8  # per split: source a has 8 real and 8 fake, source b 8 fake


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory) -> tuple[Params, Path]:
    """Params naming sources a (real and fake) and b (fakes only), downloaded and preprocessed."""
    root = tmp_path_factory.mktemp("loso")
    a = make_dataset(root / "a", per_class=PER_CLASS, size=32, nested=False)
    b = one_class_source(root / "b", 1, PER_CLASS, 5000)  # fakes alone, unlike source a's
    p = with_overrides(Params(), [f"data.source={{a: {a}, b: {b}}}", *TINY_RUN])
    download.run(p, root / "raw")
    preprocess.run(p, root / "raw", root / "processed", workers=1)
    return p, root / "processed"


def index_rows(processed: Path, split: str) -> list[dict]:
    with (processed / split / "index.csv").open() as f:
        return list(csv.DictReader(f))


def test_leave_out_drops_only_that_sources_fakes_from_train_and_valid(two_sources, tmp_path):
    _, processed = two_sources
    counts = loso.leave_out(processed, tmp_path / "without-b", "b")
    out = tmp_path / "without-b"
    assert counts["removed"] == {"train": PER_CLASS, "valid": PER_CLASS, "test": 0}
    for split in ("train", "valid"):
        rows, kept = index_rows(processed, split), index_rows(out, split)
        expected = [r for r in rows if not (r["label"] == "1" and r["source"] == "b")]
        assert kept == expected
        assert counts["splits"][split] == {"images": 2 * PER_CLASS, "real": PER_CLASS, "fake": PER_CLASS}
        images, labels = load_split(out, split)  # a valid .npy, memmappable, labels matching
        original, _ = load_split(processed, split)
        keep = [i for i, r in enumerate(rows) if r in expected]
        assert np.array_equal(np.asarray(images), np.asarray(original)[keep])
        assert labels.tolist() == [int(r["label"]) for r in expected]
        assert {r["source"] for r in kept if r["label"] == "0"} == {"a"}  # a's reals stay
    # The test split is the whole one, byte for byte.
    assert index_rows(out, "test") == index_rows(processed, "test")
    assert (out / "test" / "images.npy").read_bytes() == (processed / "test" / "images.npy").read_bytes()
    assert counts["splits"]["test"] == {"images": 3 * PER_CLASS, "real": PER_CLASS, "fake": 2 * PER_CLASS}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["left_out"]["source"] == "b" and meta["sources"] == ["a", "b"]
    assert meta["splits"]["train"]["fake"] == PER_CLASS and meta["splits"]["test"]["fake"] == 2 * PER_CLASS

    # Leaving out a keeps a's reals and b's fakes.
    counts = loso.leave_out(processed, tmp_path / "without-a", "a")
    assert [(r["label"], r["source"]) for r in index_rows(tmp_path / "without-a", "train")] == \
        [("0", "a")] * PER_CLASS + [("1", "b")] * PER_CLASS
    with pytest.raises(UserError, match="no source 'c'"):
        loso.leave_out(processed, tmp_path / "without-c", "c")


@pytest.mark.slow
def test_run_gives_the_matrix_and_logs_one_mlflow_run(two_sources, tmp_path, monkeypatch):
    import mlflow  # before chdir, as the other MLflow tests

    p, processed = two_sources
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) land here
    p = with_overrides(p, [f"mlflow.tracking_uri={uri}", "mlflow.experiment=loso-test"])
    out = tmp_path / "loso"
    import torch

    result = loso.run(p, processed, out, torch.device("cpu"))

    assert result["sources"] == ["a", "b"] and result["test_sources"] == ["a", "b"]
    assert set(result["matrix"]) == {"a", "b"}
    for left, row in result["matrix"].items():
        assert set(row) == {"a", "b"}
        for cell in row.values():
            assert 0 <= cell["roc_auc"] <= 1 and 0 <= cell["recall"] <= 1 and cell["n_fake"] == PER_CLASS
            # The familiarity head (TINY_RUN keeps the default): a fake caught or flagged is one of either.
            assert max(cell["recall"], cell["flagged"]) <= cell["caught_or_flagged"] <= cell["recall"] + cell["flagged"]
        assert result["held_out"][left] == row[left]["roc_auc"]
        assert result["held_out_caught_or_flagged"][left] == row[left]["caught_or_flagged"]
        assert result["fits"][left]["counts"]["splits"]["train"]["fake"] == PER_CLASS
        assert (out / "fits" / left / "model" / "model.pt").is_file()
        assert not (out / "fits" / left / "data").exists()  # the subset is deleted once scored
    assert json.loads((out / "loso.json").read_text())["matrix"]["a"]["b"]["n_fake"] == PER_CLASS
    md = (out / "loso.md").read_text()
    assert "| trained without | a | b |" in md
    row = result["matrix"]["a"]
    assert f"| a | **{row['a']['roc_auc']:.3f}** | {row['b']['roc_auc']:.3f} |" in md
    assert f"| a | **{row['a']['caught_or_flagged']:.3f}** | {row['b']['caught_or_flagged']:.3f} |" in md
    held = result["held_out_caught_or_flagged"]
    assert f"Held-out fakes caught or flagged: a {held['a']:.3f}, b {held['b']:.3f}." in md
    assert json.loads((out / "loso.json").read_text())["held_out_caught_or_flagged"] == pytest.approx(held)

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("loso-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == result["run_id"] and run.info.run_name == "leave-one-source-out"
    assert run.info.status == "FINISHED" and run.data.tags["check"] == "leave-one-source-out"
    assert run.data.params["model.arch"] == "cnn" and run.data.params["loso.sources"] == "a,b"
    assert "a:" in run.data.params["data.source"] and "b:" in run.data.params["data.source"]
    for left in "ab":
        for test in "ab":
            for key in ("roc_auc", "recall", "flagged", "caught_or_flagged"):
                value = run.data.metrics[f"loso.{left}.{test}.{key}"]
                assert math.isclose(value, result["matrix"][left][test][key])
        # a's reals: the real sources' matrix, under the same run (keys apart from the fakes')
        fpr = run.data.metrics[f"loso.{left}.a.false_positive_rate"]
        assert math.isclose(fpr, result["real_matrix"][left]["a"]["false_positive_rate"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "loso")}
    assert {"loso/loso.json", "loso/loso.md"} <= artifacts


def test_one_fake_source_is_a_clear_error(two_sources, tmp_path, capsys):
    p, processed = two_sources
    only_a = tmp_path / "only-a"
    loso.leave_out(processed, only_a, "b")  # train's fakes are all a's now
    with pytest.raises(UserError, match=r"needs at least two fake sources; data.source has 2 \(a, b\) and only a"):
        loso.run(p, only_a, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()
    # The same through the command line: one line, status 2.
    code = cli.main(["loso", "--params", str(ROOT / "params.yaml"), "--data", str(only_a), "--out",
                     str(tmp_path / "out"), "-S", "mlflow.enabled=false"])
    assert code == 2
    assert "deepfake loso: error: leave-one-source-out needs at least two fake sources" in capsys.readouterr().err


def test_a_spectrum_only_source_stays_in_every_fold(two_sources, tmp_path, capsys):
    """The spectrum branch's own family (model.spectrum_only, the twins) is no generator to find and,
    left out, would leave the branch nothing to fit: the CNN's sources are left out in turn, it never."""
    import torch

    from deepfake_detector.detector import Decision, Detector
    from deepfake_detector.metrics import compute_metrics

    p, _ = two_sources
    root = tmp_path / "data"
    a = make_dataset(root / "a", per_class=PER_CLASS, size=32, nested=False)
    b = one_class_source(root / "b", 1, PER_CLASS, 5000)
    c = one_class_source(root / "c", 1, PER_CLASS, 9000)
    p = with_overrides(p, [f"data.source={{a: {a}, b: {b}, c: {c}}}", "model.spectrum=true",
                           "model.spectrum_only=[c]", "mlflow.enabled=false"])
    download.run(p, root / "raw")
    preprocess.run(p, root / "raw", root / "processed", workers=1)
    result = loso.run(p, root / "processed", tmp_path / "loso", torch.device("cpu"))
    assert result["sources"] == ["a", "b"] and result["never_left_out"] == ["c"]
    assert set(result["matrix"]) == {"a", "b"} and result["test_sources"] == ["a", "b", "c"]
    assert all(fit["counts"]["splits"]["train"]["fake"] == 2 * PER_CLASS for fit in result["fits"].values())
    assert "Never left out: c (model.spectrum_only" in (tmp_path / "loso" / "loso.md").read_text()
    # Each fold's headline leaves c's fakes out, as evaluate's does: against the fold's own model.
    x, y = load_split(root / "processed", "test")
    not_c = np.array([r["source"] != "c" or r["label"] == "0" for r in index_rows(root / "processed", "test")])
    for left, fit in result["fits"].items():
        detector = Detector.from_checkpoint(tmp_path / "loso" / "fits" / left / "model" / "model.pt", Decision(),
                                            torch.device("cpu"))
        expected = compute_metrics(y[not_c], detector.predict(x)[not_c], fit["threshold"])
        assert not_c.sum() == 3 * PER_CLASS
        assert [fit[f"test_{k}"] for k in ("roc_auc", "accuracy", "recall")] == \
            pytest.approx([expected[k] for k in ("roc_auc", "accuracy", "recall")])
    # With one source for the CNN, there is nothing to leave out: a clear error that names the branch's.
    only_a = tmp_path / "only-a"
    loso.leave_out(root / "processed", only_a, "b")
    code = cli.main(["loso", "--params", str(ROOT / "params.yaml"), "--data", str(only_a), "--out",
                     str(tmp_path / "out"), "-S", "mlflow.enabled=false", "-S", "model.spectrum=true",
                     "-S", "model.spectrum_only=[c]"])
    assert code == 2
    assert "and only a has fake images in the train split besides c (model.spectrum_only" in capsys.readouterr().err


def test_a_source_of_reals_alone_is_left_out_as_an_unseen_camera(two_sources, tmp_path, capsys):
    """A real-only source (a camera) is left out in turn too: its reals and their twins out of train
    and valid, its false-positive rate on test the held-out figure, in loso.json, loso.md and the
    CLI's output."""
    import torch

    from deepfake_detector.detector import Decision, Detector
    from deepfake_detector.sources import twin_origin
    from deepfake_detector.stages import twins

    p, _ = two_sources
    root = tmp_path / "data"
    a = make_dataset(root / "a", per_class=PER_CLASS, size=32, nested=False)
    b = one_class_source(root / "b", 1, PER_CLASS, 5000)
    u = one_class_source(root / "u", 0, PER_CLASS, 7000)
    overrides = [f"data.source={{a: {a}, b: {b}, u: {u}}}", "mlflow.enabled=false", "twins.enabled=true",
                 "twins.epochs=1", "twins.crop=16", "twins.device=cpu", "model.spectrum=true",
                 "model.spectrum_only=[twins]"]
    p = with_overrides(p, overrides)
    download.run(p, root / "raw")
    twins.run(p, root / "raw", root / "twins")
    preprocess.run(p, root / "raw", root / "processed", workers=1, twins=root / "twins")
    processed = root / "processed"
    assert loso.real_only_sources(processed) == ["u"]

    counts = loso.leave_out(processed, tmp_path / "without-u", "u")
    assert counts["class"] == "real"  # u's reals and their twins go; a's twins stay
    meta = json.loads((tmp_path / "without-u" / "meta.json").read_text())
    assert meta["left_out"]["class"] == "real"
    for split in ("train", "valid"):
        rows, kept = index_rows(processed, split), index_rows(tmp_path / "without-u", split)
        twins_of = {o: [r for r in rows if r["source"] == "twins" and twin_origin(r["path"]) == o] for o in "au"}
        assert len(twins_of["u"]) == len(twins_of["a"]) == PER_CLASS
        assert kept == [r for r in rows if r["source"] != "u" and r not in twins_of["u"]]
        assert counts["removed"][split] == 2 * PER_CLASS
        assert counts["splits"][split] == {"images": 4 * PER_CLASS, "real": PER_CLASS, "fake": 3 * PER_CLASS}
        assert meta["splits"][split]["sources"]["u"]["real"] == 0
        assert meta["splits"][split]["sources"]["twins"]["fake"] == PER_CLASS

    code = cli.main(["loso", "--params", str(ROOT / "params.yaml"), "--data", str(processed), "--out",
                     str(tmp_path / "loso"), *[a for o in [*TINY_RUN, *overrides] for a in ("-S", o)]])
    assert code == 0
    result = json.loads((tmp_path / "loso" / "loso.json").read_text())
    assert result["sources"] == ["a", "b"] and result["real_only"] == ["u"] and result["never_left_out"] == ["twins"]
    assert set(result["matrix"]) == set(result["real_matrix"]) == {"a", "b", "u"}
    assert result["test_real_sources"] == ["a", "u"] and set(result["held_out"]) == {"a", "b"}
    assert result["fits"]["u"]["counts"]["splits"]["train"]["real"] == PER_CLASS  # a's reals alone
    # The held-out figure: the share of u's test reals that the fold's own model calls fake.
    x, y = load_split(processed, "test")
    mine = np.array([r["source"] == "u" for r in index_rows(processed, "test")])
    detector = Detector.from_checkpoint(tmp_path / "loso" / "fits" / "u" / "model" / "model.pt", Decision(),
                                        torch.device("cpu"))
    expected = float(np.mean(detector.predict(x[mine]) >= result["fits"]["u"]["threshold"]))
    cell = result["real_matrix"]["u"]["u"]
    assert cell["n_real"] == PER_CLASS and cell["false_positive_rate"] == pytest.approx(expected)
    assert result["held_out_false_positive_rate"] == {"u": cell["false_positive_rate"]}
    md = (tmp_path / "loso" / "loso.md").read_text()
    a_cell = result["real_matrix"]["u"]["a"]["false_positive_rate"]
    assert "## False-positive rate per real source" in md
    assert f"| u | {a_cell:.3f} | **{cell['false_positive_rate']:.3f}** |" in md
    assert f"Held-out reals called fake: u {cell['false_positive_rate']:.3f}." in md
    out = capsys.readouterr().out
    assert "test false-positive rate of each real source" in out and f"{cell['false_positive_rate']:.3f}*" in out


def test_training_logs_each_sources_valid_auc_per_epoch(two_sources, tmp_path):
    import torch

    from deepfake_detector.detector import Decision, Detector
    from deepfake_detector.metrics import per_source
    from deepfake_detector.preprocess import read_index
    from deepfake_detector.train import fit

    p, processed = two_sources
    fit(processed, tmp_path, p.model, p.train, torch.device("cpu"), p.seed, progress=False)
    history = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert [k for k in history[0] if k.startswith("valid_auc")] == ["valid_auc", "valid_auc.a", "valid_auc.b"]
    # One epoch: the saved model is that epoch's, so scoring valid again gives the logged figures.
    x, y = load_split(processed, "valid")
    p_fake = Detector.from_checkpoint(tmp_path / "model.pt", Decision(), torch.device("cpu")).predict(x)
    expected = per_source(y, p_fake, [r["source"] for r in read_index(processed, "valid")[1]], 0.5)
    for name in "ab":
        assert math.isclose(float(history[0][f"valid_auc.{name}"]), expected[name]["roc_auc"], abs_tol=1e-6)


def test_spectrum_only_sources_fit_the_branch_but_never_the_cnn(two_sources, tmp_path):
    import torch

    from deepfake_detector.heads import load_checkpoint
    from deepfake_detector.train import fit

    p, processed = two_sources
    cpu = torch.device("cpu")
    model = p.model.__class__(**{**p.model.__dict__, "spectrum": True, "spectrum_only": ("b",)})
    summary = fit(processed, tmp_path / "both", model, p.train, cpu, p.seed, progress=False)
    # The CNN sees what it would with b's fakes left out of the data: the same weights, bit for bit.
    without_b = tmp_path / "without-b"
    loso.leave_out(processed, without_b, "b")
    fit(without_b, tmp_path / "cnn", p.model, p.train, cpu, p.seed, progress=False)
    fused, _ = load_checkpoint(tmp_path / "both" / "model.pt")
    cnn, _ = load_checkpoint(tmp_path / "cnn" / "model.pt")
    # Only the CNN: the heads fit after training (the familiarity head too) see every source.
    for key, value in cnn.state_dict().items():
        if not key.startswith("heads."):
            assert torch.equal(fused.state_dict()[key], value), key
    assert torch.isfinite(fused.heads["spectrum"].shift) and set(summary["spectrum"]) == {"train_auc", "valid_auc"}
    history = list(csv.DictReader((tmp_path / "both" / "history.csv").open()))
    assert not any(k.startswith("valid_auc.") for k in history[0])  # the CNN validated on source a alone

    def fails(spectrum: bool, only: tuple[str, ...], message: str) -> None:
        bad = p.model.__class__(**{**p.model.__dict__, "spectrum": spectrum, "spectrum_only": only})
        with pytest.raises(UserError, match=message):
            fit(processed, tmp_path / "bad", bad, p.train, cpu, p.seed, progress=False)

    fails(True, ("c",), r"model.spectrum_only: no source named c in the data \(its sources: a, b\)")
    fails(False, ("b",), "set model.spectrum true")
    fails(True, ("a", "b"), "leaves the CNN no fake train images")


def test_evaluate_measures_the_spectrum_only_fakes_apart(two_sources, tmp_path):
    """The twins are left out of the test figures as they are of the threshold: the headline, the
    per-source rows the promote gates read, the robustness rows and predictions.csv hold the other
    sources alone (in benchmarks/real_sources.py too), and the twins' own figures stand apart under
    spectrum_only."""
    import torch

    from deepfake_detector import evaluate
    from deepfake_detector.detector import Decision, Detector
    from deepfake_detector.metrics import compute_metrics
    from deepfake_detector.preprocess import read_index
    from deepfake_detector.train import fit

    p, processed = two_sources
    cpu = torch.device("cpu")
    fit(processed, tmp_path / "m", p.model.__class__(**{**p.model.__dict__, "spectrum": True, "spectrum_only": ("b",)}),
        p.train, cpu, p.seed, progress=False)
    params = with_overrides(p, ONE_ROBUSTNESS_ROW).evaluate
    metrics = evaluate.run(processed, tmp_path / "m" / "model.pt", tmp_path / "eval", params, cpu, p.seed)

    x, y = load_split(processed, "test")
    sources = np.array([r["source"] for r in read_index(processed, "test")[1]])
    p_fake = Detector.from_checkpoint(tmp_path / "m" / "model.pt", Decision(), cpu).predict(x)
    a = sources == "a"
    expected = compute_metrics(y[a], p_fake[a], metrics["threshold"])
    assert (metrics["tp"] + metrics["fn"], metrics["tn"] + metrics["fp"]) == (PER_CLASS, PER_CLASS)
    assert metrics["roc_auc"] == pytest.approx(expected["roc_auc"])
    assert list(metrics["per_source"]) == ["a"] and list(metrics["robustness"]["jpeg_q50"]["sources"]) == ["a"]
    b = metrics["spectrum_only"]["b"]
    assert b["n_fake"] == PER_CLASS and b["recall"] == pytest.approx(np.mean(p_fake[~a] >= metrics["threshold"]))
    with (tmp_path / "eval" / "plots" / "predictions.csv").open() as f:
        assert {row["source"] for row in csv.DictReader(f)} == {"a"}
    # benchmarks/real_sources.py measures as the stage does: the same threshold, headline and sources.
    subprocess.run([sys.executable, "benchmarks/real_sources.py", "--model", f"m={tmp_path / 'm'}:{processed}",
                    "--data", str(processed), "--out", str(tmp_path / "rs")], cwd=ROOT, check=True, timeout=600)
    (row,) = json.loads((tmp_path / "rs" / "real_sources.json").read_text())
    assert row["threshold"] == pytest.approx(metrics["threshold"]) and list(row["per_source"]) == ["a"]
    assert row["test_auc"] == pytest.approx(metrics["roc_auc"])
    # Without spectrum_only sources nothing is set apart.
    fit(processed, tmp_path / "plain", p.model, p.train, cpu, p.seed, progress=False)
    plain = evaluate.run(processed, tmp_path / "plain" / "model.pt", tmp_path / "eval-plain", params, cpu, p.seed)
    assert "spectrum_only" not in plain and list(plain["per_source"]) == ["a", "b"]


def test_loso_md_has_a_caught_or_flagged_table_with_a_familiarity_head_only():
    def cell(caught_or_flagged: float | None = None) -> dict:
        figures = {"roc_auc": 0.9, "recall": 0.5, "n_fake": PER_CLASS}
        return figures if caught_or_flagged is None else {**figures, "flagged": 0.25,
                                                          "caught_or_flagged": caught_or_flagged}

    def result(a: float | None, b: float | None) -> dict:
        made = {"test_sources": ["a", "b"],
                "matrix": {"a": {"a": cell(a), "b": cell(b)}, "b": {"a": cell(b), "b": cell(a)}},
                "held_out_roc_auc_mean": 0.9, "held_out_roc_auc_min": 0.9,
                "fits": {"a": {"threshold": 0.5}, "b": {"threshold": 0.5}}}
        return made if a is None else {**made, "held_out_caught_or_flagged": {"a": a, "b": a}}

    without = loso.markdown(result(None, None))  # a model without the head: loso.json as before
    assert "caught or flagged" not in without.lower() and "| a | **0.900** | 0.900 |" in without
    md = loso.markdown(result(0.625, 1.0))
    assert "## Caught or flagged unfamiliar" in md
    assert "| a | **0.625** | 1.000 |" in md and "| b | 1.000 | **0.625** |" in md
    assert "Held-out fakes caught or flagged: a 0.625, b 0.625." in md

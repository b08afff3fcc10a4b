"""Where the project is, as seen from a DVC temporary clone (no data needed: runs without faces-mini)."""

from __future__ import annotations


def test_project_root_sees_through_dvc_temporary_clones(tmp_path, monkeypatch):
    from deepfake_detector.params import project_root, resolve

    clone = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpab12"
    clone.mkdir(parents=True)
    (tmp_path / "repo" / "faces").mkdir()
    monkeypatch.setenv("DVC_ROOT", str(clone))
    monkeypatch.chdir(clone)
    assert project_root() == tmp_path / "repo"
    assert resolve("faces") == str(tmp_path / "repo" / "faces") and resolve("elsewhere") == "elsewhere"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert project_root() == tmp_path / "repo"

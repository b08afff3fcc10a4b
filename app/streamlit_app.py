"""Upload faces, see real or fake with P(fake), a Grad-CAM heatmap, a warning where the face is unlike
those the model was trained on, and which model answered.

    make app        # or: .venv/bin/streamlit run app/streamlit_app.py

Configuration (environment): MLFLOW_TRACKING_URI (default: params.yaml's, the repo's sqlite store),
DEEPFAKE_MODEL_URI (default models:/deepfake-detector@champion), DEEPFAKE_MODEL_PATH (a folder with
model.pt, used when the registry has no such model; default models), DEEPFAKE_SAMPLES (a dataset
folder to offer samples from; default data/raw).
"""

from __future__ import annotations

import os
from pathlib import Path

import streamlit as st

from deepfake_detector.data import CLASSES, DataError, find_data_root, iter_files
from deepfake_detector.detector import familiar
from deepfake_detector.errors import UserError
from deepfake_detector.params import Params, load_params
from deepfake_detector.predict import FACE_CROPPED, FACE_NOT_FOUND, overlay
from deepfake_detector.preprocess import IMAGE_SUFFIXES
from deepfake_detector.scoring import load_detector

ROOT = Path(__file__).resolve().parents[1]


@st.cache_resource(show_spinner="Loading the model...")
def detector_for(model_uri: str, local_path: str):
    """(Detector, None), or (None, why not): the registry first, then the local path.

    One Detector serves every session: it is never modified, and its Grad-CAM uses no hooks.
    """
    params_file = ROOT / "params.yaml"
    params = load_params(params_file) if params_file.exists() else Params()
    problems = []
    for source in (model_uri, local_path):
        if not source:
            continue
        if source == local_path and not Path(local_path).exists():
            problems.append(f"{local_path}: no such folder (no local model.pt)")
            continue
        try:
            return load_detector(params, source), None
        except (UserError, OSError) as exc:
            problems.append(f"{source}: {exc}")
    return None, "; ".join(problems) or "no model configured"


def samples(folder: Path, per_class: int = 3) -> dict[str, Path]:
    """A few test-split images of the downloaded dataset, if it is there."""
    try:
        root, is_split = find_data_root(folder)
    except DataError:
        return {}
    test = root / "test" if is_split else root
    return {f"{cls} #{i + 1}": path for cls in CLASSES if (test / cls).is_dir()
            for i, path in enumerate(list(iter_files(test / cls))[:per_class])}


def show(name: str, data: bytes, detector) -> None:
    st.subheader(name)
    try:
        prepared = detector.prepare(data)
    except ValueError as exc:
        st.error(f"{name}: {exc}")
        return
    p_fake, unfamiliarity = (float(v[0]) for v in detector.assess(prepared.array[None]))
    st.markdown(f"**{detector.label(p_fake).upper()}**: P(fake) {p_fake:.3f} (threshold {detector.threshold:.3f})")
    st.progress(p_fake, text=f"P(fake) = {p_fake:.1%}")
    if familiar(unfamiliarity) is False:  # None: a model without a familiarity head gives no verdict
        st.warning("Unlike the faces this model was trained on: its answer is unreliable.")
    left, right = st.columns(2)
    left.image(prepared.shown, caption="face crop the model scored" if prepared.face_box else "image the model scored",
               width="stretch")
    right.image(overlay(prepared.array, detector.explain(prepared.array)), width="stretch",
                caption="Grad-CAM: regions that pushed towards 'fake'")
    if prepared.face == FACE_CROPPED:
        st.caption(f"Face found: the largest face, box {prepared.face_box}, was cropped and scored.")
    elif prepared.face == FACE_NOT_FOUND:
        st.warning("No face found: the whole picture was scored, and the model only learned from faces. "
                   "Its answer means little here.")


def main() -> None:
    st.set_page_config(page_title="Deepfake face detector", page_icon=":mag:")
    st.title("Real or GAN-generated face?")
    model_uri = os.environ.get("DEEPFAKE_MODEL_URI", "models:/deepfake-detector@champion")
    detector, problem = detector_for(model_uri, os.environ.get("DEEPFAKE_MODEL_PATH", str(ROOT / "models")))
    if detector is None:
        st.error(f"No model to answer with ({problem}). Train one with `make pipeline`, promote it with "
                 "`.venv/bin/deepfake promote`, or set DEEPFAKE_MODEL_URI / DEEPFAKE_MODEL_PATH.")
        return
    st.caption(f"Model: {detector.source}, threshold {detector.threshold:.3f} ({detector.decision.rule}), "
               f"input {detector.image_size} px")
    uploads = st.file_uploader("Upload face images", type=sorted(IMAGE_SUFFIXES), accept_multiple_files=True)
    offered = samples(Path(os.environ.get("DEEPFAKE_SAMPLES", str(ROOT / "data" / "raw"))))
    picked = st.selectbox("...or pick a sample", ["(none)", *offered]) if offered else "(none)"
    for upload in uploads or []:
        show(upload.name, upload.getvalue(), detector)
    if picked != "(none)":
        show(f"sample: {picked}", offered[picked].read_bytes(), detector)


main()

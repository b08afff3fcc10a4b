"""The served model, logged from code (MLflow models-from-code): base64 image files in; P(fake),
the label at the logged threshold, the familiarity verdict (``unfamiliarity``, and ``familiar``
false for a face unlike those the model was trained on; both null for a model without a
familiarity head), what the face search found and, for a row that is not a usable image, the
reason out (``p_fake``, ``predicted``, ``unfamiliarity`` and ``familiar`` then null: JSON has no NaN).

MLflow records this file as the model's code and runs it when serving (`mlflow models serve`);
nothing is pickled. It scores through the same :class:`~deepfake_detector.detector.Detector` as
``deepfake predict`` and the app, with the checkpoint and ``detector.json`` logged beside it. A bad
row does not fail the request: it gets its reason in ``error`` and no score.
"""

from __future__ import annotations

import base64

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from deepfake_detector.detector import Decision, Detector, familiar
from deepfake_detector.predict import box_text


def decode(value: str) -> bytes:
    """A request row's base64 image; binascii.Error (a ValueError) or TypeError when it is not one."""
    return base64.b64decode(value, validate=True)


class ImageModel(PythonModel):
    def load_context(self, context) -> None:
        self.detector = Detector.from_checkpoint(context.artifacts["checkpoint"],
                                                 Decision.read(context.artifacts["decision"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        scored = self.detector.score(list(model_input["image"]), read=decode)
        ok = [not e for e in scored.errors]
        verdicts = [familiar(u) for u in scored.unfamiliarity]  # None: no head, or not scored
        unfamiliarity = [None if v is None else float(u) for u, v in zip(scored.unfamiliarity, verdicts)]
        # Object columns holding None: the scoring server writes them as null, where a float NaN
        # would come out as the bare token NaN, which JSON parsers refuse.
        return pd.DataFrame({
            "p_fake": pd.Series([float(p) if s else None for p, s in zip(scored.p_fake, ok)], dtype=object),
            "predicted": pd.Series([self.detector.label(p) if s else None for p, s in zip(scored.p_fake, ok)],
                                   dtype=object),
            "unfamiliarity": pd.Series(unfamiliarity, dtype=object), "familiar": pd.Series(verdicts, dtype=object),
            "face": [face for face, _ in scored.faces], "face_box": [box_text(box) for _, box in scored.faces],
            "error": scored.errors})


mlflow.models.set_model(ImageModel())

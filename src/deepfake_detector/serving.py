"""The served model, logged from code (MLflow models-from-code): base64 image files in; P(fake),
the label at the logged threshold and, for a row that is not a usable image, the reason out.

MLflow records this file as the model's code and runs it when serving (`mlflow models serve`);
nothing is pickled. It scores through the same :class:`~deepfake_detector.detector.Detector` as
``deepfake predict`` and the app, with the checkpoint and ``detector.json`` logged beside it. A bad
row does not fail the request: it gets its reason in ``error`` and no score.
"""

from __future__ import annotations

import base64

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from deepfake_detector.detector import Decision, Detector


def decode(value: str) -> bytes:
    """A request row's base64 image; binascii.Error (a ValueError) or TypeError when it is not one."""
    return base64.b64decode(value, validate=True)


class ImageModel(PythonModel):
    def load_context(self, context) -> None:
        self.detector = Detector.from_checkpoint(context.artifacts["checkpoint"],
                                                 Decision.read(context.artifacts["decision"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        p_fake, errors = self.detector.score(list(model_input["image"]), read=decode)
        labels = [self.detector.label(p) if not e else "" for p, e in zip(p_fake, errors)]
        return pd.DataFrame({"p_fake": p_fake.astype(np.float64), "label": labels, "error": errors})


mlflow.models.set_model(ImageModel())

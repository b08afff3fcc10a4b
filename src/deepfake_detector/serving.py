"""The served model, logged from code (MLflow models-from-code): base64 image files in; P(fake),
the label at the logged threshold and, for a row that is not a usable image, the reason out.

MLflow records this file as the model's code and runs it when serving (`mlflow models serve`);
nothing is pickled. It scores through the same :class:`~deepfake_detector.detector.Detector` as
``deepfake predict`` and the app, with the checkpoint and ``detector.json`` logged beside it. A bad
row does not fail the request: it gets its reason in ``error`` and no score.
"""

from __future__ import annotations

import base64
import binascii

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from deepfake_detector.detector import Decision, Detector


class ImageModel(PythonModel):
    def load_context(self, context) -> None:
        self.detector = Detector.from_checkpoint(context.artifacts["checkpoint"],
                                                 Decision.read(context.artifacts["decision"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        arrays, kept, errors = [], [], [""] * len(model_input)
        for i, value in enumerate(model_input["image"]):
            try:
                arrays.append(self.detector.prepare(base64.b64decode(value, validate=True)).array)
                kept.append(i)
            except (ValueError, TypeError, binascii.Error) as exc:
                errors[i] = str(exc) or type(exc).__name__
        p_fake = np.full(len(model_input), np.nan)
        if arrays:
            p_fake[kept] = self.detector.predict(np.stack(arrays))
        labels = [self.detector.label(p) if not e else "" for p, e in zip(p_fake, errors)]
        return pd.DataFrame({"p_fake": p_fake, "label": labels, "error": errors})


mlflow.models.set_model(ImageModel())

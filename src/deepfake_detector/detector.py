"""The inference object: a trained model with everything needed to score a face the way it was evaluated.

A :class:`Detector` holds the weights, the input size, the decision settings (threshold and the
rule that chose it, face-crop policy, minimum source size) and the preprocessing. ``deepfake
predict``, the app, the served pyfunc and ``evaluate --data`` all score through it, so the same
image gets the same label whichever way the model was loaded. Evaluation builds on it, not the
other way round: nothing here imports metrics, plots or MLflow.

The decision settings are the evaluate stage's output (``eval/detector.json``): train's
``model.pt`` is never rewritten. They are read beside the checkpoint (a registered model carries
``detector.json`` next to ``model.pt``), else from the pipeline workspace's ``eval/`` next to the
model folder; with neither, the threshold is 0.5 and a notice says so.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from deepfake_detector.backends import DECISION_FILE, METADATA, ONNX_FILE, OnnxBackend, open_onnx, scoring_metadata
from deepfake_detector.errors import UserError
from deepfake_detector.params import EvaluateParams
from deepfake_detector.predict import Prepared, prepare

if TYPE_CHECKING:
    import torch

    from deepfake_detector.model import DeepfakeNet

URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")  # models:/, runs:/, s3://...: a model URI, not a path
Face = tuple[str, tuple[int, int, int, int] | None]  # what the face search found (predict.FACE_*) and the crop box
PREPARE_THREADS = 4  # images read and prepared at once while the model scores


def read_file(path: Path | str) -> bytes:
    return Path(path).read_bytes()


class Scored(NamedTuple):
    """What :meth:`Detector.score` answers for each item."""

    p_fake: np.ndarray  # float32, NaN where not scored
    unfamiliarity: np.ndarray  # float32, 1 or more: unlike the training data; NaN where not scored or no head
    errors: list[str]  # why an item was not scored; "" where scored
    faces: list[Face]  # what the face search found, and the crop box


def familiar(unfamiliarity: float) -> bool | None:
    """Whether an image is like the faces the model was trained on (its unfamiliarity below 1); None
    where there is no verdict (a model without a familiarity head, or an image not scored)."""
    return None if np.isnan(unfamiliarity) else bool(unfamiliarity < 1)


def verdict_text(unfamiliarity: float) -> tuple[str, str]:
    """The ``unfamiliarity`` and ``familiar`` cells of a per-image CSV row: empty where there is no verdict."""
    verdict = familiar(unfamiliarity)
    return ("", "") if verdict is None else (f"{unfamiliarity:.6f}", str(verdict).lower())


@dataclass(frozen=True)
class Decision:
    """How P(fake) becomes a label, and which images are scored at all."""

    threshold: float = 0.5  # P(fake) at or above which an image is called fake
    rule: str = "default"  # how the threshold was chosen (evaluate.threshold_rule), or "default"
    crop_faces: bool = True  # crop the largest face of a photo that is not a tight face crop
    min_source_size: int = 1  # images smaller than this (either side, before any crop) are refused

    @classmethod
    def chosen(cls, threshold: float, params: EvaluateParams, min_source_size: int) -> Decision:
        """The settings the evaluate stage hands on: ``threshold`` chosen on valid by
        ``params.threshold_rule``, its face-crop policy, and the data's ``min_source_size``."""
        return cls(threshold, params.threshold_rule, params.crop_faces, min_source_size)

    @classmethod
    def read(cls, path: Path) -> Decision:
        return cls(**json.loads(Path(path).read_text()))

    def write(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")


def decision_file(checkpoint: Path) -> Path | None:
    """The decision settings of ``checkpoint``: ``detector.json`` beside it (the evaluate stage keeps a
    copy with the model, and a registered model carries one), else in the pipeline workspace's
    ``eval/`` next to the model folder; None when there is neither."""
    candidates = (checkpoint.parent / DECISION_FILE, checkpoint.parent.parent / "eval" / DECISION_FILE)
    return next((c for c in candidates if c.is_file()), None)


class Detector:
    """One model, ready to score images; safe to share between threads (it is never modified).

    ``model`` is the network as trained (Grad-CAM explains it), or its checkpoint, loaded when first
    needed. Scores come from ``backend`` (:mod:`~deepfake_detector.backends`): ONNX Runtime's
    session, else the torch inference graph of ``model``. ``device`` None is CUDA when present, else
    the CPU. Without torch scoring or Grad-CAM, torch is never imported.
    """

    def __init__(self, model: DeepfakeNet | Path, decision: Decision, source: str, device: torch.device | None = None,
                 batch_size: int = 64, fit: str = "resize", backend: OnnxBackend | None = None,
                 image_size: int | None = None) -> None:
        self.decision, self.source, self.batch_size = decision, source, batch_size
        self.fit = fit  # how images reach the input size: as preprocess fitted the training data
        self._model, self._device, self._loading = model, device, threading.Lock()
        self.image_size = image_size or self.model.image_size
        if backend is None:
            from deepfake_detector.torch_backend import TorchBackend

            backend = TorchBackend(self.model, self.image_size, self.device)
        self.backend = backend

    @property
    def device(self) -> torch.device:
        if self._device is None:
            from deepfake_detector.device import resolve_device

            self._device = resolve_device("auto")
        return self._device

    @property
    def model(self) -> DeepfakeNet:
        with self._loading:
            if isinstance(self._model, Path):
                from deepfake_detector.heads import load_checkpoint

                self._model = load_checkpoint(self._model)[0]
            return self._model.to(self.device).eval()  # a no-op once there

    @property
    def threshold(self) -> float:
        return self.decision.threshold

    @classmethod
    def from_checkpoint(cls, path: Path, decision: Decision | Path | None = None,
                        device: torch.device | None = None, notice=print, backend: str = "auto") -> Detector:
        """A ``model.pt`` (or a folder holding one) with its decision settings: ``decision`` if given,
        else ``detector.json`` beside the checkpoint, else ``../eval/detector.json`` (the pipeline
        workspace), else the defaults (threshold 0.5, which ``notice`` announces, and the minimum
        source size of the data the model was trained on). On ONNX Runtime, ``model.onnx``'s metadata
        stands for ``model.pt``, which is then loaded only for Grad-CAM."""
        path = Path(path)
        checkpoint = path / "model.pt" if path.is_dir() else path
        if not checkpoint.is_file() and not (checkpoint.parent / ONNX_FILE).is_file():  # ONNX Runtime needs no .pt
            raise UserError(f"no model.pt in {path}: not a model folder (train writes one: models/)")
        scorer = open_onnx(backend, checkpoint.parent / ONNX_FILE, device)
        model: DeepfakeNet | Path = checkpoint
        info = scorer.metadata if scorer is not None else {}
        if set(info) != set(METADATA):  # torch, or an export older than its metadata
            from deepfake_detector.heads import load_checkpoint

            model, ckpt = load_checkpoint(checkpoint)
            info = scoring_metadata(model.image_size, ckpt)
        if not isinstance(decision, Decision):
            found = Path(decision) if decision else decision_file(checkpoint)
            if found is None:
                notice(f"no {DECISION_FILE} for {checkpoint} (run the evaluate stage): threshold 0.5")
            decision = Decision.read(found) if found else Decision(min_source_size=info["min_source_size"])
        return cls(model, decision, f"local {checkpoint}", device, fit=info["fit"], backend=scorer,
                   image_size=info["image_size"])

    @classmethod
    def load(cls, model: str, mlflow_params=None, device: torch.device | None = None, backend: str = "auto"
             ) -> Detector:
        """A local model folder/file, or an MLflow model URI (``models:/NAME@ALIAS``, ``runs:/...``),
        whose checkpoint and settings are downloaded: nothing is unpickled, no logged code runs."""
        if Path(model).exists():
            return cls.from_checkpoint(Path(model), device=device, backend=backend)
        if not URI.match(model):  # a path, mistyped or moved: never a registry look-up
            raise UserError(f"no such model folder: {model}")
        return cls.from_registry(model, mlflow_params, device, backend)

    @classmethod
    def from_registry(cls, model_uri: str, mlflow_params=None, device: torch.device | None = None,
                      backend: str = "auto") -> Detector:
        from deepfake_detector.tracking import download_model

        folder, described = download_model(model_uri, mlflow_params)
        detector = cls.from_checkpoint(folder, device=device, notice=lambda m: print(m, file=sys.stderr),
                                       backend=backend)
        detector.source = described
        return detector

    def prepare(self, data: bytes, crop_faces: bool | None = None) -> Prepared:
        """Check, decode, face-crop (per the decision, unless ``crop_faces`` says otherwise) and resize
        an image file's bytes; ValueError with a one-line reason for anything not scored."""
        crop = self.decision.crop_faces if crop_faces is None else crop_faces
        return prepare(data, self.image_size, crop, min_source_size=self.decision.min_source_size, fit=self.fit)

    def assess(self, images: np.ndarray | Sequence[np.ndarray],
               transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """P(fake) and unfamiliarity (NaN for a model without a familiarity head) of each prepared uint8
        (N, S, S, 3) image (an array, or a list of (S, S, 3) ones), ``batch_size`` at a time;
        ``transform`` edits each batch (a copy: memmaps are read-only)."""
        p_fake, unfamiliarity = [np.zeros(0, dtype=np.float32)], [np.zeros(0, dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            batch = np.array(images[start:start + self.batch_size])
            p, u = self.backend(transform(batch) if transform is not None else batch)
            p_fake.append(p)
            unfamiliarity.append(u if u is not None else np.full(len(p), np.nan, dtype=np.float32))
        return np.concatenate(p_fake), np.concatenate(unfamiliarity)

    def predict(self, images: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """P(fake) of each prepared image (:meth:`assess`)."""
        return self.assess(images, transform)[0]

    def label(self, p_fake: float) -> str:
        return "fake" if p_fake >= self.threshold else "real"

    def score(self, items: Sequence[Any], read: Callable[[Any], bytes] = read_file,
              crop_faces: bool | None = None) -> Scored:
        """The :class:`Scored` items: P(fake) and unfamiliarity (NaN where not scored, or where the model
        has no familiarity head), one reason per item ("" where scored) and what the face search found
        in each (``("", None)`` where not scored).

        ``read`` turns an item (a path; a base64 string when serving) into image bytes. Items are
        read and scored ``batch_size`` at a time and only the scores kept, so memory stays flat
        however many there are (a 100k-face set). An item that cannot be read or is not a usable
        image gets its reason and does not stop the others.
        """
        parts = [part for _, part in self.batches(items, read, crop_faces)]
        if not parts:
            return Scored(np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32), [], [])
        return Scored(np.concatenate([s.p_fake for s in parts]), np.concatenate([s.unfamiliarity for s in parts]),
                      [e for s in parts for e in s.errors], [f for s in parts for f in s.faces])

    def batches(self, items: Sequence[Any], read: Callable[[Any], bytes] = read_file,
                crop_faces: bool | None = None) -> Iterator[tuple[int, Scored]]:
        """:meth:`score`, a batch at a time: ``(start, Scored of items[start:start + n])``.

        Reading, decoding and face-cropping run on :data:`PREPARE_THREADS` threads (Pillow and OpenCV
        release the GIL), the next batch's while the model scores this one: at most two batches of
        decoded images are held at once.
        """

        def prepared(i: int) -> Prepared | str:
            try:
                return self.prepare(read(items[i]), crop_faces)
            except (ValueError, OSError, TypeError) as exc:  # binascii.Error is a ValueError
                return str(exc) or type(exc).__name__

        with ThreadPoolExecutor(min(PREPARE_THREADS, self.batch_size)) as pool:

            def submit(start: int) -> list:
                return [pool.submit(prepared, i) for i in range(start, min(start + self.batch_size, len(items)))]

            upcoming = submit(0)
            for start in range(0, len(items), self.batch_size):
                results = [f.result() for f in upcoming]
                upcoming = submit(start + self.batch_size)  # empty past the end
                rows = [i for i, r in enumerate(results) if not isinstance(r, str)]
                scores = np.full((2, len(results)), np.nan, dtype=np.float32)
                if rows:
                    scores[:, rows] = self.assess(np.stack([results[i].array for i in rows]))
                yield start, Scored(scores[0], scores[1], [r if isinstance(r, str) else "" for r in results],
                                    [("", None) if isinstance(r, str) else (r.face, r.face_box) for r in results])

    def score_files(self, paths: Sequence[Path], crop_faces: bool | None = None
                    ) -> tuple[np.ndarray, dict[Path, str], list[int]]:
        """:meth:`score` of files, as (scores of the readable ones, reason per other file, their indices)."""
        scored = self.score(paths, crop_faces=crop_faces)
        kept = [i for i, e in enumerate(scored.errors) if not e]
        return scored.p_fake[kept], {Path(paths[i]): e for i, e in enumerate(scored.errors) if e}, kept

    def explain(self, array: np.ndarray) -> np.ndarray:
        """Grad-CAM of P(fake) on the last feature map before global pooling: an (S, S) map in [0, 1],
        high where the image pushed towards 'fake'. With ``model.spectrum`` it explains the CNN's
        P(fake) alone: the spectrum branch reads the whole image and has no map.

        The forward returns that activation with the logits and ``torch.autograd.grad`` takes the
        gradient with respect to it alone: no module hooks and no parameter ``.grad`` on the shared
        model, so concurrent calls (two app users) cannot see each other's maps.
        """
        import torch

        from deepfake_detector.model import to_input

        model = self.model
        x = to_input(torch.from_numpy(np.array(array[None]))).to(self.device)  # a copy: callers keep theirs
        with torch.enable_grad():
            logits, features = model.forward_features(x)
            # The log-odds of 'fake': it rises with P(fake) but, unlike P(fake), does not saturate.
            (grad,) = torch.autograd.grad(logits[0, 1] - logits[0, 0], features)
        weights = grad.mean(dim=(2, 3), keepdim=True)
        cam = torch.relu((weights * features.detach()).sum(dim=1, keepdim=True))
        cam = torch.nn.functional.interpolate(cam, size=array.shape[:2], mode="bilinear", align_corners=False)[0, 0]
        cam = cam.cpu().numpy()
        return cam / cam.max() if cam.max() > 0 else cam

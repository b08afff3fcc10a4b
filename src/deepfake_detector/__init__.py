"""Deepfake face detector: data, preprocessing, CNN training, evaluation and tracking."""

__version__ = "0.1.0"

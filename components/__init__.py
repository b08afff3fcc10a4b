"""Kubeflow Pipelines v2 components: one per stage, each a thin call into ``deepfake_detector.stages``."""

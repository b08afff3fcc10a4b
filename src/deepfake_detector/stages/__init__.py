"""The pipeline's stages, one module each (download, twins, preprocess, train, evaluate, register).

Each module's ``run`` takes the params and explicit paths, does its stage with its MLflow
tracking glue and returns what it produced; ``deepfake <stage>`` (and so ``dvc.yaml`` and
``MLproject``) and the Kubeflow components call the same functions. A stage's code dependencies
in ``dvc.yaml`` are its module's import closure (``tests/test_contract.py``), so nothing here may
import another stage's helpers that it does not run.
"""

"""The Kubeflow pipeline: wiring of ``components``, compile and submit."""

"""Integrations with training frameworks. Each submodule imports its framework, so import the one you use:

- :mod:`ssam_kernels.integrations.transformers`: ``SSAMTrainer`` / ``SSAMTrainerMixin`` for the Hugging
  Face ``Trainer`` (needs ``transformers`` and ``accelerate``: ``pip install "ssam_kernels[integrations]"``).
"""

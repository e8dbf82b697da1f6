"""Batch-norm running statistics that move once per SAM step, not twice.

Every SAM step runs two forwards in train mode, at ``w`` and at ``w + e``; each one updates a batch-norm
layer's running statistics, so after ``n`` steps they have absorbed ``2n`` updates, half of them from
perturbed weights. :func:`frozen_bn_stats` makes the forwards inside it leave the statistics alone:

.. code-block:: python

    loss_fn(model(x), y).backward()          # at w: running statistics updated once
    opt.first_step(zero_grad=True)
    with sk.frozen_bn_stats(model):          # at w + e: normalised with the batch's own statistics,
        loss_fn(model(x), y).backward()      # running_mean / running_var / num_batches_tracked untouched
    opt.second_step(zero_grad=True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["frozen_bn_stats"]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, batch-norm layers of ``model`` in train mode do not update their running stats.

    In train mode a ``_BatchNorm`` layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, the lazy variants)
    normalises with the batch's mean and variance ``μ_B, σ²_B`` and, when it tracks statistics, also sets
    ``running ← (1 − momentum) · running + momentum · (μ_B, σ²_B)`` and ``num_batches_tracked += 1``.
    Inside the block ``track_running_stats`` is False on those layers, which keeps the normalisation (the
    forward and its gradient are unchanged) and skips the update; on exit (on error too) each layer's
    own ``track_running_stats`` is put back. Layers in eval mode already use the running statistics and
    are left as they are. Other normalisation layers (layer, group and instance norm) keep no statistics
    that a forward in train mode would change, except instance norm with ``track_running_stats=True``,
    which is not covered.

    Yields ``model``. Nests, and is cheap: it changes one attribute per layer, no tensor is copied.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    frozen = [m for m in model.modules()
              if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for module in frozen:
        module.track_running_stats = False
    try:
        yield model
    finally:
        for module in frozen:
            module.track_running_stats = True

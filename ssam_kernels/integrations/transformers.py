"""Hugging Face ``Trainer`` with SSAM / SAM: both passes of a step, inside the Trainer's own loop.

.. code-block:: python

    from ssam_kernels.integrations.transformers import SSAMTrainer

    opt = sk.SSAM(model.parameters(), torch.optim.AdamW, rho=0.05, sparsity=0.5, lr=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = SSAMTrainer(model=model, args=TrainingArguments(..., gradient_accumulation_steps=4,
                          max_grad_norm=1.0, bf16=True), train_dataset=ds, optimizers=(opt, sched))
    trainer.train()

How one optimizer step runs (``Trainer._inner_training_loop`` of transformers 5.x calls
:meth:`training_step` once per micro-batch, then clips, calls ``optimizer.step()``, steps the scheduler
and zeroes the gradients when ``accelerator.sync_gradients`` is set):

1. Every micro-batch of the step: the Trainer's own forward/backward at ``w`` (loss scaling for
   accumulation, ``num_items_in_batch``, autocast, DDP ``no_sync`` as usual); the micro-batch is kept.
2. Last micro-batch (``sync_gradients``): after its backward the gradient at ``w`` is the one
   accumulated over all micro-batches; ``first_step`` perturbs once from it and zeroes the gradients.
   The same micro-batches are run again at ``w + e`` through the same code, accumulated the same way
   (DDP synchronises only the last one), and the weights are restored (``unperturb``). A step the
   optimizer's schedule makes plain (``first_step`` returns False: ``EveryK``, ``LookSAM``, ``AESAM``)
   takes no second pass: the gradient at ``w`` (LookSAM: with ``g_v`` added) goes on to step 3.
3. The Trainer then clips the gradient at ``w + e`` (``max_grad_norm``), and ``optimizer.step()``
   (through accelerate's wrapper and, with fp16, its ``GradScaler``) takes the base step with it. A step
   that the scaler skips for inf/NaN leaves the weights at ``w``, never perturbed.

The logged loss is the loss at ``w`` (as ``SSAM.step(closure)`` returns); the FLOP count does not
include the second pass. ``freeze_bn_stats=True`` runs the second pass under
:func:`ssam_kernels.frozen_bn_stats`, so batch-norm running statistics move once per step.
Under DDP the second pass synchronises only its last micro-batch, as the Trainer does in the first.
The optimizer must be built on the model where it trains (see :func:`reattach_parameters` for what is
repaired and what raises). Checkpoints: ``SSAM.state_dict()`` carries the mask, the policy and the
step count, so ``trainer.train(resume_from_checkpoint=...)`` resumes with the same SSAM state (the
Trainer saves it between steps, when the weights are not perturbed).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..batchnorm import frozen_bn_stats
from ..optim import SSAM

__all__ = ["SSAMTrainer", "SSAMTrainerMixin", "reattach_parameters", "unwrap_ssam"]


def unwrap_ssam(optimizer: Any) -> SSAM:
    """The :class:`~ssam_kernels.SSAM` inside ``optimizer`` (accelerate's ``AcceleratedOptimizer`` and
    other wrappers that keep the wrapped optimizer in ``.optimizer``)."""
    seen = optimizer
    while not isinstance(seen, SSAM):
        inner = getattr(seen, "optimizer", None)
        if inner is None or inner is seen:
            raise TypeError(f"optimizer: SSAMTrainer needs an ssam_kernels.SSAM or SAM optimizer (pass "
                            f"optimizers=(opt, scheduler)), got {type(optimizer).__name__}")
        seen = inner
    return seen


def reattach_parameters(ssam: SSAM) -> None:
    """Point parameters that ``model.to(...)`` rebound since ``ssam`` was built back at its weights
    (:meth:`ssam_kernels.layout.ParamLayout.reattach`; ``first_step`` does it too).

    ``Module.to`` copies every parameter and rebinds ``p.data`` even for a device that differs only in
    spelling: accelerate prepares a model for DDP on CPU with ``model.to("cpu:0")``. Each such
    parameter's current values are copied into the optimizer's weights and the parameter is bound to
    them again (nothing is lost). A real change of device or dtype cannot be followed and raises a
    ValueError saying what to do. Sharded (DTensor) parameters are left alone.
    """
    try:
        ssam.layout.reattach()
    except ValueError as error:
        raise ValueError(f"{error} (the Trainer moves the model to args.device: build the optimizer after "
                         "that, or pass optimizer_cls_and_kwargs=(sk.SSAM, {...}) so that the Trainer "
                         "builds it)") from None


class SSAMTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it in the bases) to train with SSAM/SAM.

    The optimizer must be an :class:`~ssam_kernels.SSAM` (or ``SAM``): pass it as ``optimizers=(opt,
    scheduler)``, or as ``optimizer_cls_and_kwargs=(sk.SSAM, {"base_optimizer": torch.optim.AdamW,
    ...})``. ``freeze_bn_stats``: batch-norm running statistics are updated by the pass at ``w`` only.
    """

    def __init__(self, *args: Any, freeze_bn_stats: bool = False, **kwargs: Any) -> None:
        if not isinstance(freeze_bn_stats, bool):
            raise TypeError(f"freeze_bn_stats: expected a bool, got {type(freeze_bn_stats).__name__}")
        self.freeze_bn_stats = freeze_bn_stats
        self._ssam_micro_batches: list[dict[str, Any]] = []
        super().__init__(*args, **kwargs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """The Trainer's forward/backward at ``w``; on the step's last micro-batch, also ``first_step``
        and, when the step is sharpness-aware, the second pass over the step's micro-batches at ``w + e``
        (see the module docstring)."""
        ssam = unwrap_ssam(self.optimizer)
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._ssam_micro_batches.append(inputs)
        if not self.accelerator.sync_gradients:
            return loss
        batches, self._ssam_micro_batches = self._ssam_micro_batches, []
        reattach_parameters(ssam)  # before the weights are perturbed: see its docstring
        if not ssam.first_step(zero_grad=True):
            return loss  # a plain step: optimizer.step() takes it with the gradient at w
        try:
            with frozen_bn_stats(model) if self.freeze_bn_stats else contextlib.nullcontext():
                for index, batch in enumerate(batches):
                    # DDP: only the last backward all-reduces, as the Trainer does in the first pass.
                    last = index == len(batches) - 1
                    with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                        super().training_step(model, batch, num_items_in_batch)
        finally:
            # Restored here, not in optimizer.step(): clipping reads only the gradients, and a step the
            # GradScaler skips (or an error in the second pass) must not leave the weights at w + e.
            ssam.unperturb()
        return loss


class SSAMTrainer(SSAMTrainerMixin, Trainer):
    """``transformers.Trainer`` that takes SSAM/SAM steps (see :class:`SSAMTrainerMixin`)."""

"""Empirical Fisher diagonal from per-sample gradients (the scores of the SSAM-F mask).

SSAM-F (Mi et al., 2022) perturbs the top-k entries of the empirical Fisher diagonal

    F = Σ_{i < N} (∂L(x_i, y_i) / ∂w)²

a sum of *squared per-sample* gradients over ``N`` training samples at their true labels. Squaring a
batch gradient instead would give ``(Σ_i g_i)²``, a different quantity, so every sample needs its own
gradient. :func:`fisher_information` computes them two ways that agree wherever both run:

- ``"func"``: ``torch.func.vmap(torch.func.grad(...))`` over micro-batches -- one vectorised backward
  per micro-batch instead of one per sample;
- ``"loop"``: one forward and one ``torch.autograd.grad`` per sample -- slower, but it runs every model
  that autograd runs (in-place buffer updates, data-dependent control flow, ``.item()`` in forward);
- ``"backward"``: the same loop with ``loss.backward()``, for FSDP2 models, whose sharded parameters
  receive gradients only through backward's reduce-scatter. Every rank must then see the same samples:
  the reduce-scatter averages the ranks' gradients, which is the per-sample gradient only when they
  are equal. The result holds each rank's local shard.

Batches and losses (``loss_form``): ``(inputs, targets)`` pairs with ``loss_fn(model(inputs), targets)``,
or any batch (a dict of tensors as Hugging Face models take, a tuple, ...) with ``loss_fn(model, batch)``,
or ``loss_fn=None`` for models that compute their own loss from a dict batch (``model(**batch).loss``).
"""

from __future__ import annotations

import contextlib
import inspect
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _NormBase
from torch.utils._pytree import tree_flatten, tree_map

from . import ops
from ._warnings import warn
from .layout import is_dtensor, local_tensor
from .ops import FLOAT_DTYPES

__all__ = ["DEFAULT_BATCH_SIZE", "LOSS_FORMS", "METHODS", "fisher_information"]

METHODS = ("auto", "func", "loop", "backward")
LOSS_FORMS = ("auto", "outputs", "model")
DEFAULT_BATCH_SIZE = 32
"""Samples per vmapped micro-batch when ``batch_size`` is None. Peak extra memory of the ``"func"``
path is about ``batch_size`` copies of the parameters' gradients (plus one fp32 copy for squaring)."""

LossFn = Callable[[Any, Any], Tensor]
"""``loss_fn(outputs, targets)`` (``loss_form="outputs"``) or ``loss_fn(model, batch)`` (``"model"``)."""


def fisher_information(model: nn.Module, loss_fn: LossFn | None, data: Iterable[Any],
                       num_samples: int, batch_size: int | None = None, *,
                       params: Sequence[nn.Parameter] | None = None, method: str = "auto",
                       backend: str | None = None, tuning: ops.Tuning | None = None, loss_form: str = "auto",
                       norm_eval: bool = True) -> list[Tensor]:
    """Diagonal empirical Fisher information of ``model``: one fp32 tensor per parameter.

    For each parameter ``w`` (default: ``[p for p in model.parameters() if p.requires_grad]``, else
    ``params`` in the given order) returns a float32 tensor of ``w``'s shape on ``w``'s device::

        F_w = Σ_{i < num_samples} (∂L_i / ∂w)²,    L_i = the loss of sample i alone (a batch of one)

    the sum of the squared per-sample gradients over the first ``num_samples`` samples of ``data`` in
    order (a last batch is cut). ``L_i`` is the loss exactly as given on a batch of one: with
    ``reduction="mean"`` or ``"sum"`` it is the same number. Squares are taken in fp32 (on the ``func``
    path in float64 for float64 parameters; the ``loop`` path adds each sample with
    :func:`ssam_kernels.ops.fisher_accumulate_`, fp32) and accumulated into the fp32 result.

    Args:
        model: the network.
        loss_fn: how a batch gives its loss, per ``loss_form``:

            - ``"outputs"``: ``loss_fn(model(inputs), targets)`` for ``(inputs, targets)`` batches;
            - ``"model"``: ``loss_fn(model, batch)`` for any batch: a tensor, or a dict / tuple / list
              (nested too) of tensors that share their first (batch) dimension;
            - ``loss_fn=None`` (form ``"model"``): the model computes its own loss from a dict batch, as
              Hugging Face models do with ``labels``: ``model(**batch)``, whose ``.loss`` (or ``["loss"]``)
              is taken.
        data: any iterable of batches (a ``DataLoader``, a list); tensors whose first dimension is the
            batch. They are moved to the device of the model's first parameter.
        num_samples: number of samples ``N`` (a positive int); ``data`` must hold at least that many.
        batch_size: samples per vmapped micro-batch of the ``"func"`` path (default
            ``DEFAULT_BATCH_SIZE``); bounds its memory. Ignored by the ``"loop"`` path.
        params: the parameters to score (each must belong to ``model`` and require grad).
        method: ``"func"`` (vmapped per-sample gradients), ``"loop"`` (one autograd pass per sample),
            ``"backward"`` (FSDP2, see above) or ``"auto"``: ``"backward"`` for DTensor parameters,
            else ``"func"``, except for models that need the loop (below).
        backend: op backend for :func:`ssam_kernels.ops.fisher_accumulate_` (the loop path's
            accumulation); see :func:`ssam_kernels.ops.resolve_backend`.
        tuning: that op's :class:`ssam_kernels.ops.Tuning` (None: the production settings).
        loss_form: ``"outputs"``, ``"model"`` or ``"auto"``: ``"model"`` when ``loss_fn`` is None or its
            first parameter is named ``model`` or annotated as an ``nn.Module``, else ``"outputs"``.
        norm_eval: True (default): normalization layers with running statistics (batch norm, and
            instance norm that tracks them) that are in train mode are put in eval mode for the
            estimate, so every sample is normalised with the running statistics, as at inference, and
            nothing is learned from batches of one; their modes are restored on return (on error too).
            False: every layer runs in the mode it is in (see "Model state").

    Which path: both compute the same per-sample gradients and agree to rounding where both run
    (dropout in train mode draws different masks, as any two forwards do). ``"func"`` cannot run a
    model whose forward updates a buffer in place from its input -- a batch-norm (or instance-norm
    with ``track_running_stats``) layer in train mode, whose running statistics would have to absorb a
    whole vmapped batch -- nor forwards that call ``.item()`` or branch on tensor values. ``"auto"``
    takes the loop for models with such a norm layer in train mode (only with ``norm_eval=False``), and
    if the ``"func"`` path raises for any other reason it reruns that micro-batch with the loop, warns
    once saying why, and uses the loop from then on (an error that the loop raises too is raised).
    ``method="func"`` never falls back.

    Model state: with ``norm_eval=False`` forwards run in the model's current mode: a batch-norm layer
    in train mode normalises each sample with that sample's own statistics (batch-norm layers that see
    one value per channel, e.g. ``BatchNorm1d`` on ``(N, C)`` inputs, or the 1x1 maps at the end of a
    ResNet, then fail). Forwards may update running statistics; every buffer of the model is restored
    on return (on error too), so the model is left as it was found. Parameters' ``.grad`` end as they
    were (gradients come from ``torch.autograd.grad`` / ``torch.func.grad``; the ``"backward"`` path
    puts the originals back), and every module's train/eval mode ends as it was.
    Works under ``torch.no_grad()``.

    Raises:
        TypeError / ValueError naming the argument: ``num_samples`` or ``batch_size`` not a positive
        int, unknown ``method`` or ``loss_form``, ``params`` not parameters of ``model`` (or not
        requiring grad), malformed ``data`` batches, ``data`` holding fewer than ``num_samples`` samples.
    """
    num_samples = _positive_int("num_samples", num_samples)
    micro = DEFAULT_BATCH_SIZE if batch_size is None else _positive_int("batch_size", batch_size)
    method = check_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    loss_form = resolve_loss_form(loss_fn, loss_form)
    check_data(data)
    if not isinstance(norm_eval, bool):
        raise TypeError(f"norm_eval: expected a bool, got {type(norm_eval).__name__}")
    params, names = _resolve_params(model, params)
    tuning = ops.tuning.resolve(tuning)
    for device in dict.fromkeys(p.device for p in params):
        ops.resolve_backend(backend, device)  # fail now on a bad or unavailable backend, not mid-pass
    input_device = next(iter(model.parameters())).device

    fisher = [torch.zeros(local_tensor(p).shape, dtype=torch.float32, device=p.device) for p in params]
    if method == "auto" and any(is_dtensor(p) for p in params):
        method = "backward"
    through_backward = method == "backward"
    batch_loss = _BatchLoss(model, loss_fn, loss_form)
    saved = _save_buffers(model)
    saved_grads = [p.grad for p in params]
    try:
        # enable_grad: the loop path needs a graph even when the caller runs under torch.no_grad().
        with torch.enable_grad(), _norms_in_eval(model) if norm_eval else contextlib.nullcontext():
            use_func = method == "func" or (method == "auto" and not _needs_loop(model))
            func_step = _func_step(batch_loss, params, names) if use_func else None
            for batch, n in _take(data, num_samples, input_device, loss_form == "outputs"):
                for start in range(0, n, micro):
                    part = tree_map(lambda t, s=start: t[s: s + micro], batch)
                    if func_step is None:
                        _loop_step(batch_loss, params, fisher, part, backend, tuning, through_backward)
                        continue
                    try:
                        sums = func_step(part)
                    except Exception as exc:
                        if method == "func":
                            raise
                        # Rerun this micro-batch with the loop: if the loop raises too, the error is the
                        # model's or the data's (raised, chained to this one), not torch.func's.
                        _loop_step(batch_loss, params, fisher, part, backend, tuning)
                        warn(f"fisher_information: the torch.func path failed ({type(exc).__name__}: "
                             f"{exc}); using the per-sample loop (method='loop') instead", RuntimeWarning)
                        func_step = None
                        continue
                    # Added only after the whole micro-batch succeeded, so a fallback never double-counts.
                    for f, s in zip(fisher, sums, strict=True):
                        f.add_(s)
    finally:
        _restore_buffers(saved)
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
    return fisher


# ----------------------------------------------------------------------------------------------------
# Validation and set-up (check_* and resolve_loss_form are shared with FisherMask, which validates at
# construction)
# ----------------------------------------------------------------------------------------------------

def check_method(method: object) -> str:
    """``method`` if it is one of :data:`METHODS`, else a ValueError naming it."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    return method


def check_batch_size(batch_size: object) -> int | None:
    """``batch_size`` if it is None or a positive int, else a TypeError / ValueError naming it."""
    return None if batch_size is None else _positive_int("batch_size", batch_size)


def check_data(data: object) -> None:
    """``data`` must be an iterable of batches (not a tensor) and, when it has a length, non-empty."""
    if isinstance(data, (Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(f"data: expected an iterable of batches (a DataLoader, a list), got "
                        f"{type(data).__name__}")
    try:
        empty = len(data) == 0  # type: ignore[arg-type]
    except TypeError:  # no length (a generator, a DataLoader over an IterableDataset)
        empty = False
    if empty:
        raise ValueError("data: is empty")


def resolve_loss_form(loss_fn: object, loss_form: object) -> str:
    """``"outputs"`` or ``"model"`` (see :func:`fisher_information`), checking ``loss_fn`` against it."""
    if not isinstance(loss_form, str) or loss_form not in LOSS_FORMS:
        raise ValueError(f"loss_form: expected one of {LOSS_FORMS}, got {loss_form!r}")
    if loss_fn is None:
        if loss_form == "outputs":
            raise ValueError("loss_fn: None means the model's own loss (loss_form='model'); "
                             "loss_form='outputs' needs loss_fn(outputs, targets)")
        return "model"
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable or None, got {type(loss_fn).__name__}")
    if loss_form != "auto":
        return loss_form
    try:
        first = next(iter(inspect.signature(loss_fn).parameters.values()), None)
    except (TypeError, ValueError):  # no signature (some builtins): the classic form
        return "outputs"
    if first is None:
        return "outputs"
    annotation = first.annotation
    if isinstance(annotation, str):  # postponed annotations: compare by name
        is_module = annotation.rsplit(".", 1)[-1] in ("Module", "nn.Module")
    else:
        is_module = isinstance(annotation, type) and issubclass(annotation, nn.Module)
    return "model" if first.name == "model" or is_module else "outputs"


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return int(value)


def _resolve_params(model: nn.Module, params: Sequence[nn.Parameter] | None
                    ) -> tuple[list[nn.Parameter], list[str]]:
    """The parameters to score and their names in ``model`` (the names ``functional_call`` takes)."""
    # named_parameters() lists each tensor once, so tied weights have one name (functional_call ties
    # the aliases to it).
    name_of = {id(p): n for n, p in model.named_parameters()}
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("params: the model has no parameter that requires grad")
    elif isinstance(params, Tensor) or not isinstance(params, Sequence):
        raise TypeError(f"params: expected a sequence of parameters, got {type(params).__name__}")
    params = list(params)
    if not params:
        raise ValueError("params: expected at least one parameter")
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, Tensor) or id(p) not in name_of:
            raise ValueError(f"params[{i}]: not a parameter of model")
        if id(p) in seen:
            raise ValueError(f"params[{i}]: listed twice")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] ({name_of[id(p)]}): does not require grad")
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] ({name_of[id(p)]}): expected a floating dtype, got {p.dtype}")
        seen.add(id(p))
    return params, [name_of[id(p)] for p in params]


def _square_dtype(dtype: torch.dtype) -> torch.dtype:
    """Squares are taken in fp32, or in float64 for float64 gradients (no rounding before the sum)."""
    return torch.promote_types(dtype, torch.float32)


def _needs_loop(model: nn.Module) -> bool:
    """Whether a norm layer will update running statistics in place from its input (train mode).

    Under vmap that update would mix the samples of a micro-batch into one unbatched buffer, which
    torch.func refuses; the loop runs it as autograd does.
    """
    return bool(_tracking_norms(model))


def _tracking_norms(model: nn.Module) -> list[nn.Module]:
    """Norm layers in train mode whose forward updates their running statistics."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.training and m.track_running_stats]


def _take(data: Iterable[Any], num_samples: int, device: torch.device, pairs: bool
          ) -> Iterator[tuple[Any, int]]:
    """The batches of ``data`` cut to the first ``num_samples`` samples, on ``device``, with their sizes."""
    remaining = num_samples
    iterator = iter(data)
    index = 0
    while remaining > 0:  # checked before next(): never pull a batch that is not needed
        try:
            batch = next(iterator)
        except StopIteration:
            raise ValueError(f"num_samples: asked for {num_samples} samples, but data held only "
                             f"{num_samples - remaining}") from None
        size = _batch_size(batch, index, pairs)
        n = min(size, remaining)
        if n > 0:
            yield tree_map(lambda t, n=n: t[:n].to(device), batch), n
        remaining -= n
        index += 1


def _batch_size(batch: object, index: int, pairs: bool) -> int:
    """The batch dimension shared by every tensor of ``batch`` (a pair ``(inputs, targets)`` if ``pairs``)."""
    if pairs and (not isinstance(batch, (tuple, list)) or len(batch) != 2):
        raise TypeError(f"data: batch {index}: expected an (inputs, targets) pair for "
                        f"loss_fn(outputs, targets), got {type(batch).__name__} (for other batches pass "
                        f"loss_fn(model, batch) or loss_fn=None, see loss_form)")
    leaves, _ = tree_flatten(batch)
    if not leaves or not all(isinstance(t, Tensor) for t in leaves):
        kinds = sorted({type(t).__name__ for t in leaves if not isinstance(t, Tensor)}) or ["nothing"]
        raise TypeError(f"data: batch {index}: expected tensors (in a tuple, list or dict), got "
                        f"{', '.join(kinds)}")
    sizes = {t.shape[0] if t.dim() > 0 else None for t in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"data: batch {index}: every tensor needs the same batch (first) dimension, got "
                         f"shapes {[tuple(t.shape) for t in leaves]}")
    return sizes.pop()


def _scalar(loss: object) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"loss_fn: expected a one-element tensor for a batch of one, got {shape}")
    return loss.reshape(())


def _own_loss(model: nn.Module, batch: object) -> Tensor:
    """``model(**batch)``'s loss (``.loss``, or ``["loss"]``): Hugging Face models given ``labels``."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"data: loss_fn=None calls model(**batch) and needs dict batches, got "
                        f"{type(batch).__name__}; pass loss_fn(model, batch) instead")
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(f"loss_fn: None takes the model's own loss, but {type(model).__name__} returned "
                         f"none (a Hugging Face model needs 'labels' in the batch)")
    return loss


class _BatchLoss(nn.Module):
    """``batch -> loss`` as a module around ``model`` (registered as ``model``), so that
    ``functional_call`` can swap the parameters of ``model`` whatever form the loss takes."""

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, loss_form: str) -> None:
        super().__init__()
        self.model = model
        # kept out of _modules: a loss that is itself a module must not join the parameter names
        self.__dict__["loss_fn"] = loss_fn
        self.__dict__["form"] = loss_form

    def forward(self, batch: Any) -> Tensor:
        if self.form == "outputs":
            inputs, targets = batch
            return _scalar(self.loss_fn(self.model(inputs), targets))
        if self.loss_fn is None:
            return _scalar(_own_loss(self.model, batch))
        return _scalar(self.loss_fn(self.model, batch))


@contextlib.contextmanager
def _norms_in_eval(model: nn.Module) -> Iterator[None]:
    """Norm layers that track running statistics in eval mode (they use them), modes restored after."""
    switched = _tracking_norms(model)
    for module in switched:
        module.training = False  # not .eval(): that would recurse into children with modes of their own
    try:
        yield
    finally:
        for module in switched:
            module.training = True


# ----------------------------------------------------------------------------------------------------
# Buffers: forwards in train mode update running statistics; the estimate must not
# ----------------------------------------------------------------------------------------------------

_Saved = list[tuple[nn.Module, str, Tensor, Tensor]]


def _save_buffers(model: nn.Module) -> _Saved:
    saved: _Saved = []
    with torch.no_grad():
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    saved.append((module, name, buf, buf.clone()))
    return saved


def _restore_buffers(saved: _Saved) -> None:
    with torch.no_grad():
        for module, name, buf, copy in saved:
            # A module may also rebind a buffer (``self.b = self.b + 1``): put the original object back.
            if module._buffers.get(name) is not buf:
                module._buffers[name] = buf
            buf.copy_(copy)


# ----------------------------------------------------------------------------------------------------
# The two paths
# ----------------------------------------------------------------------------------------------------

def _func_step(batch_loss: _BatchLoss, params: list[nn.Parameter], names: list[str]
               ) -> Callable[[Any], list[Tensor]]:
    """A function of one micro-batch returning ``Σ_b g_b²`` per parameter (not yet accumulated)."""
    # Detached: the per-sample grads must not hang on the caller's autograd graph. The tensors share
    # storage with the model, so later calls see the current values. Names get the wrapper's "model."
    names = [f"model.{n}" for n in names]
    wanted = {n: p.detach() for n, p in zip(names, params, strict=True)}
    rest: dict[str, Tensor] = {n: p.detach() for n, p in batch_loss.named_parameters() if n not in wanted}
    # not detached: in-place updates must reach (or be refused on) them
    rest.update(batch_loss.named_buffers())

    def sample_loss(diff: dict[str, Tensor], sample: Any) -> Tensor:
        # one sample (vmap strips the batch dim): a batch of one, as in the loop path.
        return functional_call(batch_loss, (diff, rest), (tree_map(lambda t: t.unsqueeze(0), sample),))

    # randomness="different": dropout draws a fresh mask per sample, as separate forwards would.
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0), randomness="different")

    def step(batch: Any) -> list[Tensor]:
        grads = per_sample(wanted, batch)
        sums = []
        for n in names:
            g = grads[n]  # (B, *shape)
            sq = g.to(_square_dtype(g.dtype))
            # Square in place only when .to made a copy: g itself may alias autograd-internal memory.
            sq = sq.square() if sq is g else sq.square_()
            sums.append(sq.sum(0))
        return sums

    return step


def _loop_step(batch_loss: _BatchLoss, params: list[nn.Parameter], fisher: list[Tensor], batch: Any,
               backend: str | None, tuning: ops.Tuning, through_backward: bool = False) -> None:
    """Accumulate the squared gradient of each sample of ``batch``, one autograd pass per sample."""
    leaves, _ = tree_flatten(batch)
    for i in range(leaves[0].shape[0]):
        loss = batch_loss(tree_map(lambda t, i=i: t[i: i + 1], batch))
        if not loss.requires_grad:
            continue  # no parameter reaches the loss: every gradient is zero
        if through_backward:  # FSDP2: the caller saved the .grad and puts them back
            for p in params:
                p.grad = None
            loss.backward()
            grads = [None if p.grad is None else local_tensor(p.grad) for p in params]
        else:  # autograd.grad, not backward(): the parameters' .grad stay as the caller left them.
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        fs, gs = [], []  # one list op per sample for all parameters (one call per dtype)
        for f, g in zip(fisher, grads, strict=True):
            if g is None:
                continue  # unused parameter: zero gradient
            if g.dtype in FLOAT_DTYPES:
                fs.append(f.view(-1))
                gs.append(g.reshape(-1))
            else:  # outside the op contract's dtypes: square, round once into F
                f.add_(g.square())
        ops.fisher_accumulate_(fs, gs, backend=backend, tuning=tuning)

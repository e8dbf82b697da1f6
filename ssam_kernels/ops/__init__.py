"""The SSAM op contract (``docs/DESIGN.md``): one public function per op, one meaning, any backend.

Each function validates its inputs (errors name the argument), picks a backend for the tensors'
device and calls that backend's primitive. Backends: ``"reference"`` (pure PyTorch, the simple oracle),
``"vectorized"`` (pure PyTorch written for speed, same results, any device), ``"triton"`` and ``"native"``
(the compiled extension), and ``"cuda_sim"`` (for tests: the native CUDA kernels run on CPU tensors, when
built, :mod:`.cuda_sim`). ``backend=None`` reads the environment variable ``SSAM_KERNELS_BACKEND`` and
defaults to ``"auto"``: native, else Triton (CUDA only), else vectorized; ``reference`` and ``cuda_sim``
only by name.

Masks are int32 bit-packed words with per-chunk offsets (:mod:`ssam_kernels.ops.bitmask`); a dense
perturbation is ``mask=None``.

Lists: ``grad_sq_norm``, ``perturb_``, ``restore_``, ``fisher_accumulate_`` and ``axpby_`` also take lists
of tensors (the first tensor argument a list), with the meaning of the single-tensor op applied to each
entry. A list is validated once, in one cheap pass, and split into (device, dtype) groups; each group
goes to its backend's list primitive (``grad_sq_norm_multi``, ``perturb_multi_``, ``restore_multi_``,
``fisher_accumulate_multi_``, ``axpby_multi_``: the same arguments as the single primitive, with lists of
one device and dtype) when it has one (native: one C++ call on CPU, one launch over a device table of the
tensors on CUDA; Triton: the same, one launch per kind of entry and 16-byte alignment), else the single
primitive is called for each tensor (:mod:`.lists`), so a backend needs only the single-tensor primitives.
``hash_scores`` takes lists of sizes and first positions: a tensor per size, one call per run of
positions that follow each other on one device.

Memory safety: no input reads or writes outside the tensors given, on any backend or device. What is
free to check is checked (sizes, dtypes, devices; on CPU tensors also that ``offsets`` match the mask);
what would need a host synchronisation on CUDA is bounded in the kernels instead: mask bits at or past
``N`` are ignored, and a rank outside ``[0, len(backup))`` is never used (see :func:`perturb_`).

Dtypes: float32, float64, bfloat16 and float16 everywhere. The element-wise arithmetic of
:func:`perturb_`, :func:`fisher_accumulate_` and :func:`axpby_` is one correctly rounded fp32 fused
multiply-add per entry (of operands that are inputs or rounded fp32 products), then one rounding to the
output's dtype; float64 ``W`` and ``X`` are computed in float64, each operation rounded once.
Bit-identical across backends (``ops/_arith.py`` emulates the FMA for the PyTorch ones).

Tuning: every op takes ``tuning=`` (:class:`Tuning`, None for the production settings): the block and
chunk sizes and launch shapes of the PyTorch and Triton backends, passed down to every primitive of the
call. The element-wise ops and the selection give the same bits under every tuning; Triton's norm sums
its tiles' partials, so its last bits follow the tile shape (:mod:`.tuning`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from types import ModuleType

import torch

from .._warnings import warn
from . import bitmask, contract, reference, selfcheck
from .lists import list_primitive

try:
    from .. import _C  # its first_invalid_entry speeds up the checks of long lists
except ImportError:
    _C = None
from .contract import CHUNK, num_offsets, num_words
from .select import Communicator, MaskList, chunk_offsets, list_offsets, select_counted, select_with_offsets
from .tuning import TritonLaunch, Tuning
from .tuning import resolve as _tuning

__all__ = [
    "BACKENDS", "CHUNK", "Communicator", "TritonLaunch", "Tuning", "available_backends", "axpby_",
    "bitmask", "dynamic_update", "fisher_accumulate_", "grad_sq_norm", "hash_scores", "perturb_",
    "resolve_backend", "restore_", "select_topk",
]

BACKENDS = ("reference", "vectorized", "triton", "native", "cuda_sim")
_MAX_POSITION = 2**63 - 1  # entry positions (the random-growth hash's j) are int64 in every backend


def _torch_dtypes(names: Sequence[str]) -> tuple[torch.dtype, ...]:
    return tuple(getattr(torch, name) for name in names)


# The dtypes of the op contract (contract.py), which the compiled checks follow too.
FLOAT_DTYPES = _torch_dtypes(contract.FLOAT_DTYPES)
_MASK_DTYPES = _torch_dtypes(contract.MASK_DTYPES)
_OFFSET_DTYPES = _torch_dtypes(contract.OFFSETS_DTYPES)
_SCALE_DTYPES = _torch_dtypes(contract.SCALE_DTYPES)
_FISHER_DTYPES = _torch_dtypes(contract.FISHER_DTYPES)
_SCORE_DTYPES = _torch_dtypes(contract.SCORE_DTYPES)
ENV_VAR = "SSAM_KERNELS_BACKEND"

TensorList = torch.Tensor | Sequence[torch.Tensor]
"""One 1-D tensor, or a list of them (the list form of an op)."""
OptionalTensorList = torch.Tensor | Sequence[torch.Tensor | None] | None


# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------

def _load(name: str) -> tuple[ModuleType | None, str]:
    """The backend module, or None and why it cannot be imported."""
    if name == "reference":
        return reference, ""
    try:
        return importlib.import_module(f"{__name__}.{name}"), ""
    except ImportError as exc:
        return None, f"it could not be imported ({exc})"


def _unavailable(name: str, device: torch.device | str) -> str | None:
    """Why backend ``name`` cannot run on ``device`` tensors, or None if it can."""
    module, why = _load(name)
    if module is None:
        return why
    return None if module is reference else module.unavailable_reason(device)


def _requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    if not isinstance(name, str) or name not in (*BACKENDS, "auto"):
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: expected one of {('auto', *BACKENDS)}, got {name!r}")
    return name


def _self_check(name: str, device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why the compiled backend ``name`` failed its first-use check on ``device`` with ``dtype``
    (:mod:`.selfcheck`), or None."""
    if name not in selfcheck.CHECKED_BACKENDS:
        return None
    dtype = dtype if dtype is not None else torch.float32
    return selfcheck.verdict(name, lambda: _load(name)[0], device, dtype)


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype | None = None
                    ) -> ModuleType:
    """The backend module that runs ops on ``device`` tensors of ``dtype`` for the requested ``backend``.

    ``auto`` takes the first of native, Triton (CUDA only) and vectorized that is available and passes
    its first-use check with ``dtype`` (:mod:`.selfcheck`; None: float32). A backend asked for by name
    raises ``RuntimeError`` if it is unavailable or fails the check."""
    name = _requested(backend)
    if name == "auto":
        order = ("native", "triton", "vectorized") if device.type == "cuda" else ("native", "vectorized")
        native_why: tuple[str | None, str | None] = (None, None)  # unavailable, failed its check
        for candidate in order:
            unavailable = _unavailable(candidate, device)
            failed = None if unavailable is not None else _self_check(candidate, device, dtype)
            if unavailable is None and failed is None:
                if candidate == "vectorized":
                    _warn_fallback(device.type, *native_why)
                return _load(candidate)[0]
            if candidate == "native":
                native_why = (unavailable, failed)
        raise RuntimeError(f"no backend can run on {device.type} tensors")
    why = _unavailable(name, device)
    if why is not None:
        hint = {
            "native": "build the extension: pip install --no-build-isolation . (see docs/building.md)",
            "triton": "pip install triton (on CPU, also set TRITON_INTERPRET=1)",
        }.get(name, "")
        raise RuntimeError(f"backend {name!r} is not available for {device.type} tensors: {why}. {hint}; "
                           "or use backend='vectorized' (pure PyTorch, any device)")
    failed = _self_check(name, device, dtype)
    if failed is not None:
        raise RuntimeError(f"{failed}. Use backend='auto' to fall back to a backend that passes, or set "
                           f"{selfcheck.ENV_VAR}=0 to skip the check")
    return _load(name)[0]


_WARNED_FALLBACK: set[str] = set()


def _warn_fallback(device_type: str, unavailable: str | None, failed: str | None) -> None:
    """Warn once per device type when ``auto`` runs the pure-PyTorch backend where a compiled one could:
    a failed or skipped extension build is silent at pip's normal verbosity, and the step is slower. Why
    the native backend is not used: ``unavailable``, or ``failed`` its first-use check."""
    if device_type in _WARNED_FALLBACK or device_type not in ("cpu", "cuda"):
        return  # other devices (MPS, XPU, ...) have no compiled backend to build
    _WARNED_FALLBACK.add(device_type)
    if failed is not None:
        fix = f"{failed}; report it with your GPU's name and the message above"
    else:
        fix = (f"no compiled backend ({unavailable}). To fix: "
               f"{'pip install triton, or ' if device_type == 'cuda' else ''}build the extension with pip "
               "install --no-build-isolation . (docs/building.md)")
    warn(f"ssam_kernels: backend='auto' runs the pure-PyTorch 'vectorized' backend on {device_type} tensors, "
         f"which is several times slower: {fix}. Pass backend='vectorized' to choose it and silence this "
         "warning.")


def available_backends() -> dict[str, list[str]]:
    """The backends usable here, each with the device types it can run on."""
    device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    usable = {name: [d for d in device_types if _unavailable(name, d) is None] for name in BACKENDS}
    return {name: types for name, types in usable.items() if types}


# ----------------------------------------------------------------------------------------------------
# Validation: every error names the argument
# ----------------------------------------------------------------------------------------------------

def _check_vector(name: str, t: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in {tuple(str(d) for d in dtypes)}, got {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    return t


def _check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, numel: int | None = None,
                dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {t.dtype}")
    expected = ref.numel() if numel is None else numel
    if t.numel() != expected:
        raise ValueError(f"{name}: expected {expected} elements, got {t.numel()}")


def _check_mask(mask: object, offsets: object, W: torch.Tensor, mask_name: str = "mask",
                offsets_name: str = "offsets") -> None:
    mask = _check_vector(mask_name, mask, _MASK_DTYPES)
    _check_like(mask_name, mask, "W", W, numel=num_words(W.numel()), dtype=False)
    if offsets is not None:
        offsets = _check_vector(offsets_name, offsets, _OFFSET_DTYPES)
        _check_like(offsets_name, offsets, "W", W, numel=num_offsets(W.numel()), dtype=False)


def _check_mask_and_backup(W: torch.Tensor, mask: object, offsets: object, backup: object,
                           at: str = "") -> None:
    """The mask, offsets and backup of ``perturb_``/``restore_`` over ``W``; ``at`` (e.g. ``"[3]"``)
    follows every argument name in the messages."""
    backup = _check_vector(f"backup{at}", backup)
    if mask is None:
        _check_like(f"backup{at}", backup, f"W{at}", W)
        return
    if offsets is None:
        raise ValueError(f"offsets{at}: required when mask{at} is given")
    _check_mask(mask, offsets, W, f"mask{at}", f"offsets{at}")
    _check_like(f"backup{at}", backup, f"W{at}", W, numel=backup.numel())
    if backup.numel() > W.numel():
        raise ValueError(f"backup{at}: expected at most {W.numel()} elements (one per set bit), "
                         f"got {backup.numel()}")


def _check_scale(scale: object, device: torch.device, name: str = "scale", of: str = "W") -> None:
    """A 0-d float32 or float64 tensor ``name`` on ``device`` (that of argument ``of``)."""
    if not isinstance(scale, torch.Tensor) or scale.dtype not in _SCALE_DTYPES or scale.dim() != 0:
        raise TypeError(f"{name}: expected a float32 or float64 0-d tensor")
    if scale.device != device:
        raise ValueError(f"{name}: expected device {device} (that of {of}), got {scale.device}")


# Lists of tensors. The checks above cost microseconds per tensor in Python; a list op must not pay
# them for every tensor of every step, so each entry first goes through one cheap predicate that
# accepts only what the full checks accept, and only an entry it rejects goes through the full checks,
# which raise the error naming it (e.g. ``W[3]``).



def _is_vector(t: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> bool:
    return (isinstance(t, torch.Tensor) and t.layout is torch.strided and t.dtype in dtypes and t.dim() == 1
            and t.is_contiguous())


def _as_list(name: str, value: object, length: int | None = None, allow_empty: bool = True
             ) -> list[torch.Tensor]:
    """``value`` as a list of the expected ``length`` (the entries are checked by the op)."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        kind = "a single tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{name}: expected a list of 1-D tensors (the first tensor argument is a list), "
                        f"got {kind}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name}: expected {length} tensors (one per tensor of the first list), "
                         f"got {len(value)}")
    if not allow_empty and len(value) == 0:
        raise ValueError(f"{name}: expected at least one tensor")
    return value if type(value) is list else list(value)  # the ops never modify it: no copy needed


def _optional_list(name: str, value: object, length: int) -> list[torch.Tensor | None]:
    """None (no tensor for any entry) or a list of tensors and Nones."""
    return [None] * length if value is None else _as_list(name, value, length)


def _first_to_check(*lists: object) -> int:
    """Where the Python checks of a list must start: the compiled extension's one pass over the entries
    (``_C.first_invalid_entry``, the same acceptance as the predicates here, never wider) finds the first
    entry it rejects (the list's length when none); without the extension, 0."""
    if _C is None:
        return 0
    first = _C.first_invalid_entry(*lists)
    return len(lists[0]) if first < 0 else first


def _check_element_lists(Ws: list[torch.Tensor], Gs: list[torch.Tensor] | None, masks: list,
                         offs: list, backups: list, scale: torch.Tensor | None) -> None:
    """Every entry of the lists of ``perturb_`` (``Gs`` given, all on ``scale``'s device) or
    ``restore_``. The predicate is written out (only the contract's size rules are calls): without the
    extension it runs for every tensor of every step."""
    device = scale.device if scale is not None else None
    start = _first_to_check(Ws, Gs, False, masks, offs, backups, scale)
    tensor, strided, floats, mask_dtypes, offset_dtypes = (torch.Tensor, torch.strided, FLOAT_DTYPES,
                                                           _MASK_DTYPES, _OFFSET_DTYPES)
    unit = (1,)
    for i in range(start, len(Ws)):
        w, m, o, b = Ws[i], masks[i], offs[i], backups[i]
        g = Gs[i] if Gs is not None else w
        # stride (1,): 1-D and contiguous in one call (stricter than contiguity for sizes 0 and 1).
        ok = (isinstance(w, tensor) and isinstance(g, tensor) and isinstance(b, tensor)
              and w.layout is strided and g.layout is strided and b.layout is strided
              and w.dtype in floats and g.dtype is w.dtype and b.dtype is w.dtype
              and w.stride() == unit and g.stride() == unit and b.stride() == unit)
        if ok:
            n, here = w.numel(), w.device
            ok = (g.numel() == n and (device is None or here == device) and g.device == here
                  and b.device == here
                  and (b.numel() == n if m is None else
                       isinstance(m, tensor) and isinstance(o, tensor) and m.layout is strided
                       and o.layout is strided and m.dtype in mask_dtypes and o.dtype in offset_dtypes
                       and m.stride() == unit and o.stride() == unit
                       and m.numel() == num_words(n) and o.numel() == num_offsets(n)
                       and b.numel() <= n and m.device == here and o.device == here))
        if not ok:
            at = f"[{i}]"
            _check_vector(f"W{at}", w)
            if Gs is not None:
                _check_like(f"G{at}", _check_vector(f"G{at}", g), f"W{at}", w)
            _check_mask_and_backup(w, m, o, b, at)
            if device is not None and w.device != device:
                raise ValueError(f"W{at}: expected device {device} (that of scale), got {w.device}")


def _check_axpby_lists(Xs: list[torch.Tensor], Ys: list[torch.Tensor], a: torch.Tensor | None) -> None:
    """Every entry of ``axpby_``'s lists: ``X`` a float vector on ``a``'s device, ``Y`` of its dtype, size
    and device (the compiled pass first, as for ``perturb_``)."""
    device = a.device if a is not None else None
    for i in range(_first_to_check(Xs, Ys, False, None, None, None, a), len(Xs)):
        x, y = Xs[i], Ys[i]
        if not (_is_vector(x) and _is_vector(y) and y.dtype is x.dtype and y.numel() == x.numel()
                and x.device == device and y.device == x.device):
            _check_vector(f"X[{i}]", x)
            _check_like(f"Y[{i}]", _check_vector(f"Y[{i}]", y), f"X[{i}]", x)
            if x.device != device:
                raise ValueError(f"X[{i}]: expected device {device} (that of a), got {x.device}")


_PLAIN_DISPATCH = torch.Tensor.__torch_dispatch__


def _span(t: object) -> tuple[tuple[str, int], int, int] | None:
    """``(device, first byte, end byte)`` of a tensor's memory, from its first to its last element; None
    for a tensor that holds none (empty, meta, or subclass-like: fake, functional, wrappers)."""
    if not isinstance(t, torch.Tensor) or t.numel() == 0 or type(t).__torch_dispatch__ is not _PLAIN_DISPATCH:
        return None
    try:
        begin = t.data_ptr()
    except RuntimeError:  # no storage of its own (e.g. a batched tensor under vmap)
        return None
    if begin == 0:
        return None
    reach = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    device = (t.device.type, -1 if t.device.index is None else t.device.index)
    return device, begin, begin + reach * t.element_size()


def _check_disjoint(arguments: tuple[tuple[str, bool, object], ...], indexed: bool) -> None:
    """Refuse a call in which a tensor the op writes shares memory with any other tensor argument.

    ``arguments``: ``(name, written, tensors)`` in signature order, ``tensors`` a list (entry ``j`` of every
    list belongs together; None entries are skipped) or one tensor (named without an index, after every
    entry). A write into mask words, offsets or backup slots a kernel has yet to read moves the ranks it
    computes (out of bounds, were the kernels not bounded), and any overlap makes the result depend on
    the order of the writes; tensors that are only read may overlap each other. Decided from byte ranges
    on the host, no device work: the spans are sorted by (device, first byte, argument position, entries
    first), and the first span that starts inside an earlier one while either is written is reported
    with that earlier one (the one reaching furthest, among the written ones if the later is only read):
    ``ValueError`` naming the written one first. The compiled extension's ``_C.check_disjoint`` (the same
    rule in ``csrc/ssam_ops.h``, used by the native ops themselves) runs instead when it is built.
    """
    if _C is not None:
        _C.check_disjoint(arguments, indexed)
        return
    lists = [argument for argument in arguments if not isinstance(argument[2], torch.Tensor)]
    order = [(name, written, items[j], j if indexed else -1)
             for j in range(max((len(items) for _, _, items in lists), default=0))
             for name, written, items in lists if j < len(items)]
    order += [(name, written, t, -1) for name, written, t in arguments if isinstance(t, torch.Tensor)]
    spans = []  # (device, first byte, position, end byte, written, name)
    for position, (name, written, t, index) in enumerate(order):
        span = _span(t)
        if span is not None:
            device, begin, end = span
            spans.append((device, begin, position, end, written, f"{name}[{index}]" if index >= 0 else name))
    spans.sort()
    reach = written_reach = None  # the earlier span of this device reaching furthest (of the written ones)
    for k, (device, begin, _, end, written, name) in enumerate(spans):
        if k and device != spans[k - 1][0]:
            reach = written_reach = None
        other = (written_reach if written_reach is not None and begin < written_reach[3] else
                 reach if written and reach is not None and begin < reach[3] else None)
        if other is not None:
            first, second = (name, other[5]) if written else (other[5], name)
            raise ValueError(f"{first}: shares memory with {second}; a tensor the op writes must not overlap "
                             "any other argument")
        if reach is None or end > reach[3]:
            reach = spans[k]
        if written and (written_reach is None or end > written_reach[3]):
            written_reach = spans[k]


def _check_disjoint_for(module: ModuleType, device: torch.device,
                        arguments: tuple[tuple[str, bool, object], ...], indexed: bool) -> None:
    """:func:`_check_disjoint`, unless the one backend call that runs these arguments applies the same
    rule to them itself (its ``CHECKS_OVERLAP`` device types), which spares a second pass
    over every tensor."""
    if device.type not in getattr(module, "CHECKS_OVERLAP", ()):
        _check_disjoint(arguments, indexed)


def _check_list_disjoint(groups: list[tuple[ModuleType, Sequence[int]]], first: list[torch.Tensor],
                         arguments: tuple[tuple[str, bool, object], ...]) -> None:
    """:func:`_check_disjoint_for` of a list op's arguments: one (device, dtype) group goes to one backend
    call that may check them itself; several groups are checked here, across the groups."""
    if len(groups) == 1:
        _check_disjoint_for(groups[0][0], first[0].device, arguments, indexed=True)
    elif groups:
        _check_disjoint(arguments, indexed=True)


def _check_norm_lists(Gs: list[torch.Tensor], Ws: list[torch.Tensor | None]) -> None:
    """``grad_sq_norm``'s lists: float vectors ``G``; each ``W`` None or of its ``G``'s dtype, size and
    device."""
    for i in range(_first_to_check(Gs, Ws, True, None, None, None, None), len(Gs)):
        g, w = Gs[i], Ws[i]
        if not _is_vector(g):
            _check_vector(f"G[{i}]", g)
        if w is not None and not (_is_vector(w) and w.dtype is g.dtype and w.numel() == g.numel()
                                  and w.device == g.device):
            _check_like(f"W[{i}]", _check_vector(f"W[{i}]", w), f"G[{i}]", g)


def _groups(backend: str | None, tensors: list[torch.Tensor]
            ) -> list[tuple[ModuleType, Sequence[int]]]:
    """The indices of ``tensors`` grouped by (device, dtype), in order of first appearance, each with
    the backend module that runs it."""
    if _C is not None and _C.same_kind(tensors):  # the usual case, one group, without a key per tensor
        return [(resolve_backend(backend, tensors[0].device, tensors[0].dtype), range(len(tensors)))]
    keys = [(t.device, t.dtype) for t in tensors]
    if not keys:
        return []
    if keys.count(keys[0]) == len(keys):  # the usual case: one group, the whole list
        return [(resolve_backend(backend, *keys[0]), list(range(len(keys))))]
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return [(resolve_backend(backend, *key), index) for key, index in groups.items()]


def _pick(items: list, index: Sequence[int]) -> list:
    """``items[i]`` for ``i`` in ``index``; the list itself when ``index`` is all of it (one group)."""
    return items if len(index) == len(items) else [items[i] for i in index]


def _check_count(name: str, value: object, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < 0 or (upper is not None and value > upper):
        bound = f"[0, {upper}]" if upper is not None else ">= 0"
        raise ValueError(f"{name}: expected a value in {bound}, got {value}")
    return value


def _check_scores(name: str, scores: object, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES
                  ) -> list[torch.Tensor]:
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence):
        raise TypeError(f"{name}: expected a list of 1-D tensors, got {type(scores).__name__}")
    if len(scores) == 0:
        raise ValueError(f"{name}: expected at least one tensor")
    return [_check_vector(f"{name}[{i}]", s, dtypes) for i, s in enumerate(scores)]


# ----------------------------------------------------------------------------------------------------
# The ops
# ----------------------------------------------------------------------------------------------------

def grad_sq_norm(G: TensorList, W: OptionalTensorList = None, *, backend: str | None = None,
                 tuning: Tuning | None = None) -> torch.Tensor:
    """Squared gradient norm: ``Σ g_i²``, or ``Σ (g_i · |w_i|)²`` when ``W`` is given (ASAM). Returns a
    float64 0-d tensor; the sum is accumulated in float64 in a fixed order, so the same input on the same
    device gives the same bits for any number of threads (the reference and vectorized backends: the
    order of ``ops._arith.sq_norm``, the same bits on every device). Totals of several segments (and
    ranks) add without another rounding, so the flat and per-tensor layouts give the same norm.

    ``G`` is one 1-D tensor or a list of them (any devices and float dtypes); ``W`` then is None or a
    list of the same length whose entries are tensors (ASAM for that entry) or None. A list is validated
    once and runs in one call per (device, dtype) group of its tensors (on a GPU one kernel launch per
    group on native CUDA; on Triton one per kind, with and without ``W``, and 16-byte alignment). The
    list's total is the sum, over the groups in order of first appearance, of each group's total, moved
    to ``G[0]``'s device. A group's total is, on the reference, vectorized and native CPU backends, the
    float64 sum in list order of what the single-tensor op gives for each tensor (bit for bit; native CPU's
    per-tensor sums are in interleaved lanes per block, equal to the reference's up to rounding); on
    Triton, ``torch.sum`` of the fixed per-tile partials of all its tensors; on native CUDA, the
    fixed-order sum of one partial per block of a one-wave grid, whose size depends on the device (both
    deterministic, equal to the in-order sum up to float64 rounding). Either way the same list on the
    same device gives the same bits on every call.
    """
    tuning = _tuning(tuning)
    if isinstance(G, torch.Tensor):
        G = _check_vector("G", G)
        if W is not None:
            _check_like("W", _check_vector("W", W), "G", G)
        return resolve_backend(backend, G.device, G.dtype).grad_sq_norm(G, W, tuning=tuning)
    Gs = _as_list("G", G, allow_empty=False)
    Ws = _optional_list("W", W, len(Gs))
    _check_norm_lists(Gs, Ws)
    home = Gs[0].device
    total = None
    for module, index in _groups(backend, Gs):
        norm = list_primitive(module, "grad_sq_norm", index)
        part = norm(_pick(Gs, index), _pick(Ws, index), tuning=tuning)
        total = part.to(home) if total is None else total + part.to(home)
    return total


def _element_arguments(Ws: list, Gs: list | None, masks: list, offs: list, backups: list,
                       scale: torch.Tensor | None) -> tuple[tuple[str, bool, object], ...]:
    """The arguments of ``perturb_`` (``Gs`` given: ``W`` and ``backup`` written) or ``restore_`` (``W``
    written) for :func:`_check_disjoint`."""
    perturb = Gs is not None
    arguments = [("W", True, Ws), ("G", False, Gs), ("mask", False, masks), ("offsets", False, offs),
                 ("backup", perturb, backups), ("scale", False, scale)]
    return tuple(a for a in arguments if a[2] is not None)


def perturb_(W: TensorList, G: TensorList, mask: OptionalTensorList, offsets: OptionalTensorList,
             backup: TensorList, scale: torch.Tensor, adaptive: bool = False, *,
             backend: str | None = None, tuning: Tuning | None = None) -> None:
    """Perturb the masked entries of ``W`` in place and keep their old values in ``backup``.

    For every set bit ``i`` (every ``i`` when ``mask`` is None): ``backup[rank(i)] = W[i]``; then, if
    the scale ``s`` is finite and non-zero, ``W[i] = W[i] + s · g_i`` (``adaptive``:
    ``W[i] + s · ((w_i · w_i) · g_i)``). fp32/bf16/fp16 ``W``: ``s`` is ``scale`` rounded to nearest
    fp32, and ``fma(s, g, w)`` (adaptive: ``fma(s, rn(rn(w·w)·g), w)``) is computed in fp32 with one
    rounding, then rounded once to ``W``'s dtype. float64 ``W``: ``s`` is ``scale`` in float64 and the
    formula is evaluated in float64, each operation rounded once.
    ``backup`` is always written, so :func:`restore_` is exact even for a skipped perturbation.
    ``scale`` is a float32 or float64 0-d tensor on ``W``'s device (never read on the host); ``W`` may
    be float32, float64, bfloat16 or float16 with either.

    Ranks and bounds (the same on every backend and device): ``rank(i)`` is the number of set bits
    before ``i``; mask bits at or past ``N = W.numel()`` are ignored (never addressed, never counted).
    ``backup`` should hold exactly the ``K`` set bits; that is not checked (it would synchronise on
    CUDA). Instead only entries with ``rank(i) < backup.numel()`` are backed up and perturbed: with a
    short backup the entries ranked past its end are left unchanged, with a longer one the slots past
    ``K`` are not written. ``offsets`` must equal ``bitmask.offsets(mask, N)``: on CPU tensors every
    backend checks it (``ValueError``); on CUDA (and on ``cuda_sim``, which runs the CUDA kernels) it is
    not checked, and wrong offsets give wrong ranks but every access stays inside ``W``, ``G`` and
    ``backup`` (a rank outside ``[0, backup.numel())`` is skipped).

    Lists: ``W``, ``G`` and ``backup`` may be lists of the same length (tensor ``j`` of each belongs
    together), ``mask`` and ``offsets`` then None (all dense) or lists whose entries may be None (that
    entry dense). Every entry is perturbed exactly as the single-tensor op would, with the one ``scale``
    and ``adaptive``; all ``W`` on ``scale``'s device, any float dtypes. Validated once, one call per
    dtype group (one kernel launch per group on the fast backends).
    """
    tuning = _tuning(tuning)
    if isinstance(W, torch.Tensor):
        W = _check_vector("W", W)
        _check_like("G", _check_vector("G", G), "W", W)
        _check_mask_and_backup(W, mask, offsets, backup)
        _check_scale(scale, W.device)
        module = resolve_backend(backend, W.device, W.dtype)
        arguments = _element_arguments([W], [G], [mask], [offsets], [backup], scale)
        _check_disjoint_for(module, W.device, arguments, indexed=False)
        module.perturb_(W, G, mask, offsets, backup, scale, bool(adaptive), tuning=tuning)
        return
    Ws = _as_list("W", W)
    Gs, backups = _as_list("G", G, len(Ws)), _as_list("backup", backup, len(Ws))
    masks, offs = _optional_list("mask", mask, len(Ws)), _optional_list("offsets", offsets, len(Ws))
    if Ws:
        _check_scale(scale, _check_vector("W[0]", Ws[0]).device)
    _check_element_lists(Ws, Gs, masks, offs, backups, scale if Ws else None)
    groups = _groups(backend, Ws)
    _check_list_disjoint(groups, Ws, _element_arguments(Ws, Gs, masks, offs, backups, scale))
    for module, index in groups:
        args = [_pick(t, index) for t in (Ws, Gs, masks, offs, backups)]
        list_primitive(module, "perturb_", index)(*args, scale, bool(adaptive), tuning=tuning)


def restore_(W: TensorList, mask: OptionalTensorList, offsets: OptionalTensorList, backup: TensorList, *,
             backend: str | None = None, tuning: Tuning | None = None) -> None:
    """``W[i] = backup[rank(i)]`` for every set bit ``i`` (every ``i`` when ``mask`` is None): bit-exact.

    Bounds as in :func:`perturb_`: bits at or past ``N`` are ignored, only ranks in
    ``[0, backup.numel())`` are restored, and ``offsets`` are checked against the mask on CPU tensors.
    Lists as in :func:`perturb_` (any devices: one call per (device, dtype) group).
    """
    tuning = _tuning(tuning)
    if isinstance(W, torch.Tensor):
        W = _check_vector("W", W)
        _check_mask_and_backup(W, mask, offsets, backup)
        module = resolve_backend(backend, W.device, W.dtype)
        arguments = _element_arguments([W], None, [mask], [offsets], [backup], None)
        _check_disjoint_for(module, W.device, arguments, indexed=False)
        module.restore_(W, mask, offsets, backup, tuning=tuning)
        return
    Ws = _as_list("W", W)
    backups = _as_list("backup", backup, len(Ws))
    masks, offs = _optional_list("mask", mask, len(Ws)), _optional_list("offsets", offsets, len(Ws))
    _check_element_lists(Ws, None, masks, offs, backups, None)
    groups = _groups(backend, Ws)
    _check_list_disjoint(groups, Ws, _element_arguments(Ws, None, masks, offs, backups, None))
    for module, index in groups:
        list_primitive(module, "restore_", index)(*[_pick(t, index) for t in (Ws, masks, offs, backups)],
                                                  tuning=tuning)


def fisher_accumulate_(F: TensorList, G: TensorList, alpha: float = 1.0, *,
                       backend: str | None = None, tuning: Tuning | None = None) -> None:
    """``F += alpha · G²`` element-wise: ``fma(g, rn(alpha · g), f)`` in fp32, with ``g`` (any float
    dtype) and ``alpha`` (a Python float) each rounded to nearest fp32 once: one rounded product and one
    fused multiply-add, so for a power-of-two ``alpha`` (1 by default) the correctly rounded
    ``f + alpha · g²``. ``F`` is always a float32 accumulator, also for float64 ``G``: the Fisher scores
    only rank entries, and the selection compares fp32 keys anyway.

    Lists: ``F`` and ``G`` lists of the same length, each pair as above; one call per (device, dtype
    of ``G``) group."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
    tuning = _tuning(tuning)
    if isinstance(F, torch.Tensor):
        F = _check_vector("F", F, _FISHER_DTYPES)
        _check_like("G", _check_vector("G", G), "F", F, dtype=False)
        module = resolve_backend(backend, F.device, G.dtype)
        _check_disjoint_for(module, F.device, (("F", True, [F]), ("G", False, [G])), indexed=False)
        module.fisher_accumulate_(F, G, float(alpha), tuning=tuning)
        return
    Fs = _as_list("F", F)
    Gs = _as_list("G", G, len(Fs))
    for i, (f, g) in enumerate(zip(Fs, Gs, strict=True)):
        if not (_is_vector(f, _FISHER_DTYPES) and _is_vector(g) and f.numel() == g.numel()
                and f.device == g.device):
            _check_vector(f"F[{i}]", f, _FISHER_DTYPES)
            _check_like(f"G[{i}]", _check_vector(f"G[{i}]", g), f"F[{i}]", f, dtype=False)
    groups = _groups(backend, Gs)
    _check_list_disjoint(groups, Gs, (("F", True, Fs), ("G", False, Gs)))
    for module, index in groups:
        list_primitive(module, "fisher_accumulate_", index)(_pick(Fs, index), _pick(Gs, index), float(alpha),
                                                            tuning=tuning)


def axpby_(X: TensorList, Y: TensorList, a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None,
           tuning: Tuning | None = None) -> None:
    """``X ← a·X + b·Y`` element-wise, in place.

    ``X`` and ``Y`` are 1-D contiguous float tensors (float32, float64, bfloat16, float16) of one dtype,
    size and device; ``a`` and ``b`` are float32 or float64 0-d tensors on ``X``'s device (never read on
    the host). fp32/bf16/fp16 ``X``: ``x``, ``y`` taken as fp32 (exact), ``a``, ``b`` rounded to nearest
    fp32 once, ``r = fma(b, y, rn(a·x))`` (one rounded fp32 product, one fused multiply-add), stored as
    ``X``'s dtype rounded to nearest even; ``a = 1`` gives ``fma(b, y, x)``, the arithmetic of a dense
    plain :func:`perturb_`. float64 ``X``: ``rn(rn(a·x) + rn(b·y))`` in float64, no FMA. Non-finite
    values propagate (``0·inf`` is NaN): the caller guards its scales. ``X`` must share no memory with
    ``Y``, ``a`` or ``b`` (``ValueError`` naming both).

    Lists: ``X`` and ``Y`` lists of the same length (entry ``j`` of each together), one ``a`` and ``b``
    for all, every ``X`` on their device, any float dtypes: validated once, one call per dtype group (one
    kernel launch per group on the fast backends).
    """
    tuning = _tuning(tuning)
    if isinstance(X, torch.Tensor):
        X = _check_vector("X", X)
        _check_like("Y", _check_vector("Y", Y), "X", X)
        _check_scale(a, X.device, "a", "X")
        _check_scale(b, X.device, "b", "X")
        module = resolve_backend(backend, X.device, X.dtype)
        _check_disjoint_for(module, X.device, _axpby_arguments([X], [Y], a, b), indexed=False)
        module.axpby_(X, Y, a, b, tuning=tuning)
        return
    Xs = _as_list("X", X)
    Ys = _as_list("Y", Y, len(Xs))
    if Xs:
        device = _check_vector("X[0]", Xs[0]).device
        _check_scale(a, device, "a", "X[0]")
        _check_scale(b, device, "b", "X[0]")
    _check_axpby_lists(Xs, Ys, a if Xs else None)
    groups = _groups(backend, Xs)
    _check_list_disjoint(groups, Xs, _axpby_arguments(Xs, Ys, a, b))
    for module, index in groups:
        list_primitive(module, "axpby_", index)(_pick(Xs, index), _pick(Ys, index), a, b, tuning=tuning)


def _axpby_arguments(Xs: list, Ys: list, a: torch.Tensor, b: torch.Tensor
                     ) -> tuple[tuple[str, bool, object], ...]:
    """The arguments of ``axpby_`` for :func:`_check_disjoint`: ``X`` written, the others read."""
    return (("X", True, Xs), ("Y", False, Ys), ("a", False, a), ("b", False, b))


def _global_total(value: int, device: torch.device, comm: Communicator | None) -> int:
    if comm is None:
        return value
    total = torch.tensor([value], dtype=torch.int64, device=device)
    comm.all_reduce_(total)
    return int(total.item())


def select_topk(scores: Sequence[torch.Tensor], k: int, *, backend: str | None = None,
                comm: Communicator | None = None, tuning: Tuning | None = None
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``k`` of the entries of all ``scores`` together: ``(mask, offsets)`` per tensor.

    Selected: every entry greater than the k-th largest value ``t``, then entries equal to ``t`` in
    entry order (tensor order, then index; with ``comm``, rank order first) until ``k``. NaN counts as
    smaller than every number and ``-0.0 == +0.0``. Values are compared as fp32: float64 scores are
    rounded to nearest fp32 first, so two that round to the same fp32 value are ties (earliest first).
    ``int32`` scores (from :func:`hash_scores`) are compared as unsigned 32-bit integers. With ``comm``
    the selection spans all ranks and ``k`` is the global count. Radix selection: no sort, no index
    arrays, any size.
    """
    tuning = _tuning(tuning)
    scores = _check_scores("scores", scores, _SCORE_DTYPES)
    total = _global_total(sum(s.numel() for s in scores), scores[0].device, comm)
    k = _check_count("k", k, total)
    backends = [resolve_backend(backend, s.device, s.dtype) for s in scores]
    return select_with_offsets(scores, k, True, backends, comm, tuning)


def hash_scores(n: int | Sequence[int], seed: int, step: int, base: int | Sequence[int] = 0,
                device: torch.device | str | Sequence[torch.device | str] = "cpu", *,
                backend: str | None = None, tuning: Tuning | None = None
                ) -> torch.Tensor | list[torch.Tensor]:
    """The counter-based hash ``h(seed, step, j)`` of positions ``j = base … base + n - 1``, as int32
    bit patterns of unsigned 32-bit values (formula in ``reference.hash_scores``); identical in every
    backend, so random masks built from it match across backends, layouts and resumes.

    Lists: ``n`` a list of sizes, ``base`` a list of as many first positions and ``device`` one device or
    a list of as many; one tensor per size, each as the single op gives it. Segments whose positions
    follow each other on one device are hashed in one call (one kernel launch on the fast backends), each
    tensor a view of that call's."""
    tuning = _tuning(tuning)
    if not isinstance(n, Sequence) or isinstance(n, str):
        n = _check_count("n", n)
        seed, step = _check_count("seed", seed, 0xFFFFFFFF), _check_count("step", step, 0xFFFFFFFF)
        base = _check_count("base", base, _MAX_POSITION - n)  # positions are int64 in every backend
        device = _check_device("device", device)
        module = resolve_backend(backend, device, torch.int32)
        return module.hash_scores(n, seed, step, base, device, tuning=tuning)
    sizes = [_check_count(f"n[{i}]", size) for i, size in enumerate(n)]
    seed, step = _check_count("seed", seed, 0xFFFFFFFF), _check_count("step", step, 0xFFFFFFFF)
    bases = _per_size("base", base, len(sizes), "ints")
    for i, (b, size) in enumerate(zip(bases, sizes, strict=True)):
        _check_count(f"base[{i}]", b, _MAX_POSITION - size)
    if isinstance(device, (str, torch.device)):
        devices = [_check_device("device", device)] * len(sizes)
    else:
        devices = [_check_device(f"device[{i}]", d)
                   for i, d in enumerate(_per_size("device", device, len(sizes), "devices"))]
    return _hashes_in_runs(backend, sizes, bases, seed, step, devices, tuning)


def _per_size(name: str, value: object, length: int, what: str) -> list:
    """``value`` as a list of ``length`` items, one per size of a list call."""
    if isinstance(value, (str, torch.Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list of {length} {what} (one per size), "
                        f"got {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{name}: expected {length} {what} (one per size), got {len(value)}")
    return list(value)


def _check_device(name: str, device: object) -> torch.device:
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name}: expected a torch.device or a str, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"{name}: {exc}") from None


def dynamic_update(masks: Sequence[torch.Tensor], drop_scores: Sequence[torch.Tensor], n_drop: int,
                   grow: str | Sequence[torch.Tensor], seed: int, step: int, *, backend: str | None = None,
                   comm: Communicator | None = None, positions: Sequence[int] | None = None,
                   tuning: Tuning | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One SSAM-D mask update over all segments together; ``(mask, offsets)`` per segment.

    Drops the ``n_drop`` live entries with the smallest ``drop_scores`` (NaN first, ties earliest
    first), then sets ``n_drop`` entries that were dead *before* this update: with ``grow="random"``
    those with the largest hash ``h(seed, step, j)`` of their position ``j`` (``reference.hash_scores``),
    else those with the largest ``grow`` scores; ties earliest first. The live count stays exactly
    what it was. ``j`` is the entry-order position (segments in order, ranks in order), or
    ``positions[s] + i`` for entry ``i`` of segment ``s`` when ``positions`` is given (the optimizer
    passes the unsharded model's positions, so sharded runs grow where one process would).
    """
    tuning = _tuning(tuning)
    drop_scores = _check_scores("drop_scores", drop_scores)
    if isinstance(masks, torch.Tensor) or not isinstance(masks, Sequence) or len(masks) != len(drop_scores):
        raise TypeError(f"masks: expected a list of {len(drop_scores)} int32 tensors (one per score tensor)")
    for i, (mask, s) in enumerate(zip(masks, drop_scores, strict=True)):
        _check_mask(mask, None, s, mask_name=f"masks[{i}]")
    seed = _check_count("seed", seed, 0xFFFFFFFF)
    step = _check_count("step", step, 0xFFFFFFFF)
    sizes = [s.numel() for s in drop_scores]
    home = drop_scores[0].device
    # Bits past N are not entries: neither live nor kept in the updated masks (the selection kernels
    # read no filter bit past N). Several masks on one device are counted and combined in a few ops.
    batch = MaskList.of(masks, sizes, tuning.mask_list_words)
    if batch is not None:
        live_per_chunk = batch.per_chunk(masks)
        live_count = live_per_chunk.sum().view(1)
    else:
        masks = [bitmask.trim(m, s.numel()) for m, s in zip(masks, drop_scores, strict=True)]
        live_count = torch.stack([bitmask.count(m).to(home) for m in masks]).sum().view(1)
    if comm is not None:
        comm.all_reduce_(live_count)
    live = int(live_count.item())
    dead = _global_total(sum(sizes), home, comm) - live
    n_drop = _check_count("n_drop", n_drop, min(live, dead))
    backends = [resolve_backend(backend, s.device, s.dtype) for s in drop_scores]
    if isinstance(grow, str):
        if grow != "random":
            raise ValueError(f"grow: expected 'random' or a list of score tensors, got {grow!r}")
        if positions is None:
            base = comm.exclusive_prefix(torch.tensor([sum(sizes)], device=home)).item() if comm else 0
            positions = [base + sum(sizes[:i]) for i in range(len(sizes))]
        elif len(positions) != len(sizes):
            raise ValueError(f"positions: expected {len(sizes)} ints, got {len(positions)}")
        for i, (position, size) in enumerate(zip(positions, sizes, strict=True)):
            _check_count(f"positions[{i}]", position, _MAX_POSITION - size)
        grow_scores = _hashes_in_runs(backend, sizes, list(positions), seed, step,
                                      [s.device for s in drop_scores], tuning)
    else:
        grow_scores = _check_scores("grow", grow)
        if len(grow_scores) != len(drop_scores):
            raise ValueError(f"grow: expected {len(drop_scores)} tensors, got {len(grow_scores)}")
        for i, (g, s) in enumerate(zip(grow_scores, drop_scores, strict=True)):
            _check_like(f"grow[{i}]", g, f"drop_scores[{i}]", s, dtype=False)
    dropped, dropped_per_chunk = select_counted(drop_scores, n_drop, False, backends, masks, True, comm,
                                                tuning)
    grown, grown_per_chunk = select_counted(grow_scores, n_drop, True, backends, masks, False, comm, tuning)
    if batch is None:
        new = [(m & ~d) | g for m, d, g in zip(masks, dropped, grown, strict=True)]
        return list(zip(new, list_offsets(new, sizes, tuning), strict=True))
    new = batch.split(batch.trimmed(masks) & ~batch.trimmed(dropped) | batch.trimmed(grown))
    if dropped_per_chunk is None or grown_per_chunk is None:
        return list(zip(new, batch.offsets(new), strict=True))
    # Dropped entries were live and grown ones dead: each chunk's new count is a difference of counts
    # the mask passes wrote, so the new words need no popcount.
    per_chunk = live_per_chunk - dropped_per_chunk + grown_per_chunk
    return list(zip(new, chunk_offsets(per_chunk, batch.n_chunks), strict=True))


def _hashes_in_runs(backend: str | None, sizes: list[int], positions: list[int], seed: int, step: int,
                    devices: list[torch.device], tuning: Tuning) -> list[torch.Tensor]:
    """``hash_scores`` of every segment (entries ``positions[s] …``, on ``devices[s]``): one call per run
    of consecutive segments of one device whose positions follow each other (the whole list in one
    process), each segment's hashes a view of its run's; each run on the backend that ``backend`` names
    for its device."""
    out: list[torch.Tensor] = []
    start = 0
    for i in range(1, len(sizes) + 1):
        if (i < len(sizes) and devices[i] == devices[start]
                and positions[i] == positions[i - 1] + sizes[i - 1]):
            continue
        module = resolve_backend(backend, devices[start], torch.int32)
        run = module.hash_scores(sum(sizes[start:i]), seed, step, positions[start], devices[start],
                                 tuning=tuning)
        out.extend(run.split(sizes[start:i]))
        start = i
    return out

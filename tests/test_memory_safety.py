"""No input to a public op reads or writes outside the tensors it was given (memory safety).

Every bad case runs in a subprocess, one per backend, so a crash (SIGSEGV, ``free(): invalid next
size``) fails the tests instead of killing pytest. ``W`` and ``backup`` are interior slices of one
larger "arena" tensor; the margins around them are compared before and after each op, so a write past
either end shows up even when it does not crash. Besides staying inside the tensors, the bounded cases
must give the documented result (:func:`ssam_kernels.ops.perturb_`), the same on every backend:

- a backup shorter than the live count: only entries ranked below its length are backed up and changed;
- a backup longer than the live count: the slots past ``K`` are not written;
- mask bits at or past ``N``: ignored (never addressed, not counted);
- offsets that do not match the mask: ``ValueError`` naming ``offsets`` on CPU tensors, nothing written;
- ``axpby_``: ``X`` written inside itself only; ``X`` sharing memory with ``Y``, ``a`` or ``b`` (or with
  another entry's ``Y``) refused with a ``ValueError`` naming both, nothing written.

Backends: ``reference``, ``vectorized``, ``native`` (through the public op and through
``torch.ops.ssam_kernels.*`` directly), ``triton`` (in its interpreter on CPU) and ``cuda_sim`` (the CUDA
kernels on CPU tensors, every access checked against the tensors); on CUDA too when a GPU is present.
On CUDA, and on cuda_sim, which runs the CUDA kernels' contract, wrong offsets are bounded rather than
refused.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Callable
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

N = 3000 + 13  # not a multiple of 32: the last mask word has unused bits
MARGIN = 4096  # guard entries on each side of W and of the backup
SCALE = 0.375


# ----------------------------------------------------------------------------------------------------
# The worker: runs in a fresh process, prints one line per case
# ----------------------------------------------------------------------------------------------------

def _arena(capacity: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(arena, W, backup)``: W and backup are slices of one tensor with guard margins around each."""
    arena = torch.randn(3 * MARGIN + N + capacity).to(device)
    W = arena[MARGIN: MARGIN + N]
    backup = arena[2 * MARGIN + N: 2 * MARGIN + N + capacity]
    backup.fill_(float("nan"))  # a slot the op does not write stays NaN
    return arena, W, backup


def _margins_untouched(before: torch.Tensor, after: torch.Tensor, capacity: int) -> bool:
    inside = torch.zeros(before.numel(), dtype=torch.bool)
    inside[MARGIN: MARGIN + N] = True
    inside[2 * MARGIN + N: 2 * MARGIN + N + capacity] = True
    return torch.equal(before[~inside].view(torch.int32), after[~inside].view(torch.int32))


def _live_mask(tail_bits: bool) -> tuple[torch.Tensor, list[int]]:
    """Mask words over N entries (half of them live), and the live positions below N in order. With
    ``tail_bits`` every bit of the last word past N is set too."""
    from ssam_kernels.ops import bitmask

    live = torch.rand(N, generator=torch.Generator().manual_seed(5)) < 0.5
    words = bitmask.pack(live)
    if tail_bits:
        words[-1] |= ~((1 << (N % 32)) - 1)  # bits N % 32 .. 31 of the last word
    return words, live.nonzero().flatten().tolist()


def _expected(W0: torch.Tensor, G: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """W after perturbing exactly ``positions``: ``fma(scale, g, w)`` rounded once to fp32 (the op
    contract), by ``ops._arith.fma32``, which tests/test_arith.py checks against exact rational arithmetic."""
    from ssam_kernels.ops._arith import fma32

    out = W0.clone()
    idx = torch.tensor(positions, dtype=torch.int64)
    out[idx] = fma32(torch.full_like(W0[idx], SCALE), G[idx], W0[idx])
    return out


def _ops(backend: str) -> tuple[Callable, Callable]:
    """``(perturb_, restore_)`` of a backend, as a user calls them. ``<backend>[list]``: the list form,
    the case's tensors as the second entry after a well-formed dense one."""
    from ssam_kernels import ops

    if backend.endswith("[list]"):
        base = backend.removesuffix("[list]")
        direct = base == "torch.ops"  # the native list operators themselves (loaded by ops, imported above)
        perturb_list = torch.ops.ssam_kernels.perturb_multi_ if direct else \
            lambda *a: ops.perturb_(*a, backend=base)
        restore_list = torch.ops.ssam_kernels.restore_multi_ if direct else \
            lambda *a: ops.restore_(*a, backend=base)

        def first(like: torch.Tensor) -> torch.Tensor:
            return torch.randn(70).to(like.device)

        def perturb(W, G, m, o, b, s):
            extra = (() if not direct else (False,))
            perturb_list([first(W), W], [first(W), G], [None, m], [None, o], [first(W), b], s, *extra)

        def restore(W, m, o, b):
            restore_list([first(W), W], [None, m], [None, o], [first(W), b])
        return perturb, restore

    if backend == "torch.ops":
        import ssam_kernels.ops.native  # noqa: F401  (loads the extension and its operators)

        return (lambda W, G, m, o, b, s: torch.ops.ssam_kernels.perturb_(W, G, m, o, b, s, False),
                torch.ops.ssam_kernels.restore_)
    return (lambda W, G, m, o, b, s: ops.perturb_(W, G, m, o, b, s, backend=backend),
            lambda W, m, o, b: ops.restore_(W, m, o, b, backend=backend))


def _case(backend: str, name: str, device: str) -> str:
    """Runs one case; returns "" when it behaved as documented, else what went wrong."""
    from ssam_kernels.ops import bitmask

    perturb, restore = _ops(backend)
    words, live = _live_mask(name.startswith("bits_past_n"))
    K = len(live)
    offsets = bitmask.offsets(words, N)
    capacity = {"short_backup": K // 2, "long_backup": K + 7}.get(name.rsplit("/")[0], K)
    bad_offsets = {"offsets_shifted_up": offsets + 10**9, "offsets_shifted_down": offsets - 10**9,
                   "offsets_scrambled": offsets.flip(0)}.get(name.rsplit("/")[0])
    arena, W, backup = _arena(capacity, device)
    G = torch.randn(N)
    restoring = name.endswith("/restore")
    if restoring:  # restore into a W whose live entries were overwritten
        backup.copy_(torch.randn(capacity))
        W[torch.tensor(live, device=device)] = float("nan")
    W0, before = W.to("cpu", copy=True), arena.to("cpu", copy=True)
    args = (words.to(device), (bad_offsets if bad_offsets is not None else offsets).to(device), backup)
    try:
        if restoring:
            restore(W, *args)
        else:
            perturb(W, G.to(device), *args, torch.tensor(SCALE, device=device))
    except (ValueError, RuntimeError) as exc:
        if bad_offsets is None or not re.match(r"offsets(\[1\])?:", str(exc)):  # a list's entry 1
            return f"raised {type(exc).__name__}: {exc}"
        unchanged = torch.equal(arena.cpu().view(torch.int32), before.view(torch.int32))
        return "" if unchanged else "raised after writing"
    arena, W, backup = arena.cpu(), W.cpu(), backup.cpu()
    if not _margins_untouched(before, arena, capacity):
        return "wrote outside W and backup"
    if bad_offsets is not None:
        # On CUDA wrong offsets are not checked (that would synchronise): bounded is all that is promised.
        checked = device == "cpu" and not backend.startswith("cuda_sim")
        return "wrong offsets were accepted on CPU tensors" if checked else ""
    touched = torch.tensor(live[:capacity], dtype=torch.int64)
    if restoring:
        want = W0.clone()
        want[touched] = backup[: len(touched)]
        ok = torch.equal(W.view(torch.int32), want.view(torch.int32))
        return "" if ok else "restored the wrong entries"
    if not torch.equal(backup[: len(touched)], W0[touched]):
        return "backed up the wrong values"
    if not bool(torch.isnan(backup[len(touched):]).all()):
        return "wrote backup slots past the live count"
    if not torch.equal(W.view(torch.int32), _expected(W0, G, touched.tolist()).view(torch.int32)):
        return "perturbed the wrong entries"
    return ""


# Arguments that share memory, where the op writes one of them: (case, op, the two arguments named).
ALIASES = {
    "mask_in_backup/perturb": ("backup", "mask"),  # the backup writes change mask words not yet read
    "offsets_in_backup/perturb": ("backup", "offsets"),
    "mask_in_w/perturb": ("W", "mask"),
    "mask_in_w/restore": ("W", "mask"),
    "offsets_in_w/restore": ("W", "offsets"),
    "backup_in_w/restore": ("W", "backup"),
    "g_is_w/perturb": ("W", "G"),
    "backup_in_g/perturb": ("backup", "G"),
    "scale_in_w/perturb": ("W", "scale"),
}


def _alias_case(backend: str, name: str, device: str) -> str:
    """Runs one case of ``ALIASES``: the op must raise ``ValueError`` naming both arguments (the written
    one first) and write nothing. The tensors are views of one arena, as in :func:`_case`."""
    from ssam_kernels.ops import bitmask

    perturb, restore = _ops(backend)
    words, live = _live_mask(False)
    offsets = bitmask.offsets(words, N).to(torch.int32)
    arena, W, backup = _arena(len(live), device)
    W.copy_(torch.randn(N))
    G, scale = torch.randn(N, device=device), torch.tensor(SCALE, device=device)
    region = {"backup": backup, "w": W, "g": G}[name.split("_")[-1].split("/")[0]]
    if name.startswith(("mask_in", "offsets_in")):
        inside = region.view(torch.int32)
        source = words if name.startswith("mask") else offsets
        aliased = inside[3: 3 + source.numel()]
        aliased.copy_(source.to(device))
        if name.startswith("mask"):
            words = aliased
        else:
            offsets = aliased
    elif name.startswith("backup_in"):
        backup = region[: len(live)]
    elif name.startswith("g_is"):
        G = W
    elif name.startswith("scale_in"):
        scale = W[5]
    before = arena.to("cpu", copy=True), G.to("cpu", copy=True)
    try:
        if name.endswith("/restore"):
            restore(W, words.to(device), offsets.to(device), backup)
        else:
            perturb(W, G, words.to(device), offsets.to(device), backup, scale)
    except ValueError as exc:
        written, other = ALIASES[name]
        index = r"\[1\]" if backend.endswith("[list]") else ""
        if not re.match(rf"{written}{index}: shares memory with {other}{index if other != 'scale' else ''};",
                        str(exc)):
            return f"raised the wrong error: {exc}"
        unchanged = (torch.equal(arena.cpu().view(torch.int32), before[0].view(torch.int32))
                     and torch.equal(G.cpu().view(torch.int32), before[1].view(torch.int32)))
        return "" if unchanged else "raised after writing"
    except RuntimeError as exc:
        return f"raised {type(exc).__name__}: {exc}"
    return "accepted arguments that share memory"


# ----------------------------------------------------------------------------------------------------
# axpby_: stays inside X and Y, and refuses an X that shares memory with another argument
# ----------------------------------------------------------------------------------------------------

# Cases whose arguments share memory: (the written argument, the other) the message names.
AXPBY_ALIASES = {"y_is_x": ("X", "Y"), "y_starts_inside_x": ("X", "Y"), "x_starts_inside_y": ("X", "Y"),
                 "a_in_x": ("X", "a"), "b_in_x": ("X", "b"), "y0_in_x1": ("X", "Y")}
AXPBY_CASES = ["inside", *AXPBY_ALIASES]


def _axpby_call(backend: str, device: str) -> Callable:
    """``axpby_(X, Y, a, b)`` of a backend as a user calls it (``torch.ops``: the native operators
    themselves); ``<backend>[list]``: the list form, the case's tensors as the second entry after a
    well-formed one (``Y0``: the first entry's Y)."""
    from ssam_kernels import ops

    base = backend.removesuffix("[list]")
    if base == "torch.ops":
        import ssam_kernels.ops.native  # noqa: F401  (loads the extension and its operators)
    single = torch.ops.ssam_kernels.axpby_ if base == "torch.ops" else \
        lambda X, Y, a, b: ops.axpby_(X, Y, a, b, backend=base)
    multi = torch.ops.ssam_kernels.axpby_multi_ if base == "torch.ops" else single
    if not backend.endswith("[list]"):
        return lambda X, Y, a, b, Y0=None: single(X, Y, a, b)

    def call(X, Y, a, b, Y0=None):
        X0 = torch.randn(70, device=device)
        Y0 = torch.randn(70, device=device) if Y0 is None else Y0
        multi([X0, X], [Y0, Y], a, b)
    return call


def _axpby_case(backend: str, name: str, device: str) -> str:
    """One case of ``AXPBY_CASES``: "inside", the op's result with nothing written outside ``X`` (``X``
    and ``Y`` are slices of one arena, its margins compared); else the ``ValueError`` naming the two
    arguments (the list's entry 1, or ``Y[0]``), nothing written."""
    from ssam_kernels import ops

    listed = backend.endswith("[list]")
    if name == "y0_in_x1" and not listed:
        return ""
    call = _axpby_call(backend, device)
    arena = torch.randn(4 * MARGIN + 2 * N).to(device)
    X, Y = arena[MARGIN: MARGIN + N], arena[3 * MARGIN + N: 3 * MARGIN + 2 * N]
    a, b = torch.tensor(0.75, device=device), torch.tensor(-1.5, device=device)
    before = arena.to("cpu", copy=True)
    Y0 = None
    if name == "inside":
        want = X.to("cpu", copy=True)
        ops.axpby_(want, Y.cpu(), a.cpu(), b.cpu(), backend="reference")
        call(X, Y, a, b)
        inside = torch.zeros(arena.numel(), dtype=torch.bool)
        inside[MARGIN: MARGIN + N] = True
        after = arena.cpu()
        if not torch.equal(after[~inside].view(torch.int32), before[~inside].view(torch.int32)):
            return "wrote outside X"
        return "" if torch.equal(X.cpu().view(torch.int32), want.view(torch.int32)) else "wrong result"
    if name == "y_is_x":
        Y = X
    elif name == "y_starts_inside_x":
        Y = arena[MARGIN + N // 2: MARGIN + N // 2 + N]
    elif name == "x_starts_inside_y":
        X = arena[3 * MARGIN + N // 2: 3 * MARGIN + N // 2 + N]
    elif name == "a_in_x":
        a = X[5]
    elif name == "b_in_x":
        b = X[N - 1]
    elif name == "y0_in_x1":
        Y0 = arena[MARGIN - 10: MARGIN + 60]  # the first entry's Y reaches into the second entry's X
    try:
        call(X, Y, a, b, Y0)
    except ValueError as exc:
        written, other = AXPBY_ALIASES[name]
        at = r"\[1\]" if listed else ""
        other_at = "" if other in ("a", "b") else r"\[0\]" if name == "y0_in_x1" else at
        if not re.match(rf"{written}{at}: shares memory with {other}{other_at};", str(exc)):
            return f"raised the wrong error: {exc}"
        unchanged = torch.equal(arena.cpu().view(torch.int32), before.view(torch.int32))
        return "" if unchanged else "raised after writing"
    except RuntimeError as exc:
        return f"raised {type(exc).__name__}: {exc}"
    return "accepted arguments that share memory"



CASES = [f"{case}/{op}" for case in ("short_backup", "long_backup", "bits_past_n", "offsets_shifted_up",
                                     "offsets_shifted_down", "offsets_scrambled")
         for op in ("perturb", "restore")] + list(ALIASES) + [f"axpby/{case}" for case in AXPBY_CASES]


def _worker(backend: str, device: str) -> None:
    torch.manual_seed(0)
    for name in CASES:
        print(f"START {name}", flush=True)
        if name.startswith("axpby/"):
            problem = _axpby_case(backend, name.removeprefix("axpby/"), device)
        else:
            problem = (_alias_case if name in ALIASES else _case)(backend, name, device)
        print(f"{'OK' if not problem else 'FAIL'} {name} {problem}", flush=True)
    print("DONE", flush=True)


# ----------------------------------------------------------------------------------------------------
# The tests: one subprocess per backend, one test per case
# ----------------------------------------------------------------------------------------------------

BACKENDS = ["reference", "vectorized", "native", "torch.ops", "triton", "cuda_sim",
            "reference[list]", "vectorized[list]", "native[list]", "torch.ops[list]", "triton[list]",
            "cuda_sim[list]"]
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]
_RUNS: dict[tuple[str, str], subprocess.CompletedProcess] = {}


def _available(backend: str, device: str = "cpu") -> str | None:
    from ssam_kernels import ops

    name = backend.removesuffix("[list]")
    return ops._unavailable("native" if name == "torch.ops" else name, device)


def _run(backend: str, device: str) -> subprocess.CompletedProcess:
    why = _available(backend, device)
    if why is not None:
        pytest.skip(f"{backend} unavailable on {device}: {why}")
    if (backend, device) not in _RUNS:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}
        if device == "cpu":
            env["TRITON_INTERPRET"] = "1"
        _RUNS[backend, device] = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", backend, device], env=env,
            capture_output=True, text=True, timeout=600, check=False)
    return _RUNS[backend, device]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bad_input_stays_inside_the_tensors(device: str, backend: str, case: str) -> None:
    done = _run(backend, device)
    lines = done.stdout.splitlines()
    if f"START {case}" not in lines:
        pytest.fail(f"the worker died before this case (exit {done.returncode}):\n{done.stderr[-3000:]}")
    results = [line for line in lines if line.split(" ")[1:2] == [case] and not line.startswith("START")]
    assert results, f"the worker died in this case (exit {done.returncode}):\n{done.stderr[-3000:]}"
    assert results[0] == f"OK {case} ", results[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_worker_exits_cleanly(device: str, backend: str) -> None:
    done = _run(backend, device)
    assert done.returncode == 0 and done.stdout.splitlines()[-1:] == ["DONE"], done.stderr[-3000:]


def test_dynamic_update_ignores_mask_bits_past_n() -> None:
    """Bits past N are not live entries: not counted, not kept, never grown into."""
    from ssam_kernels import ops
    from ssam_kernels.ops import bitmask

    n = 100
    live = torch.zeros(n, dtype=torch.bool)
    live[:40] = True
    words = bitmask.pack(live)
    words[-1] |= ~((1 << (n % 32)) - 1)  # 28 bits past N
    for backend in ("reference", *(b for b in ("native", "triton") if _available(b) is None)):
        (new, offsets), = ops.dynamic_update([words], [torch.arange(n, dtype=torch.float32)], 10, "random",
                                             1, 2, backend=backend)
        assert int(offsets[-1]) == 40 and int(bitmask.count(new)) == 40, backend
        assert torch.equal(new, bitmask.trim(new, n)), backend


# ----------------------------------------------------------------------------------------------------
# Arguments that share memory across the entries of a list, and the rule's two implementations
# ----------------------------------------------------------------------------------------------------

def _list_routes() -> dict[str, tuple[Callable, Callable, Callable]]:
    """``(perturb_, restore_, fisher_accumulate_)`` list forms by route: the ops layer on each backend, the
    registered native operators, and the native direct calls (``_C``)."""
    from ssam_kernels import ops

    routes = {}
    for backend in ("reference", "vectorized", "native", "triton", "cuda_sim"):
        if _available(backend) is None:
            routes[backend] = (functools.partial(ops.perturb_, backend=backend),
                               functools.partial(ops.restore_, backend=backend),
                               functools.partial(ops.fisher_accumulate_, backend=backend))
    if _available("native") is None:
        from ssam_kernels import _C

        lib = torch.ops.ssam_kernels

        def direct(fn: Callable) -> Callable:
            def call(*args):
                assert fn(*args), "the direct call declined"
            return call

        def dense(W: list, masks: list | None) -> list:  # the operators take Nones for dense entries
            return masks if masks is not None else [None] * len(W)

        routes["torch.ops"] = (
            lambda W, G, m, o, b, *rest: lib.perturb_multi_(W, G, dense(W, m), dense(W, o), b, *rest),
            lambda W, m, o, b: lib.restore_multi_(W, dense(W, m), dense(W, o), b),
            lib.fisher_accumulate_multi_)
        routes["_C"] = (direct(_C.perturb_multi_cpu), direct(_C.restore_multi_cpu), None)
    return routes


@pytest.mark.parametrize("route", ["reference", "vectorized", "native", "triton", "cuda_sim", "torch.ops",
                                   "_C"])
def test_list_entries_sharing_memory_are_refused(route: str) -> None:
    """One entry's written tensor inside another entry's argument: ValueError naming both, nothing
    written, on every route into the list ops."""
    routes = _list_routes()
    if route not in routes:
        pytest.skip(f"{route} unavailable")
    perturb, restore, fisher = routes[route]
    arena = torch.randn(1000)
    W0, W1, G0 = arena[:100], arena[500:600], torch.randn(100)
    scale = torch.tensor(0.5)

    def refused(fn: Callable, pattern: str, *args) -> None:
        before = arena.clone()
        with pytest.raises(ValueError, match=pattern):
            fn(*args)
        assert torch.equal(arena, before), "written before the error"

    # entry 1's backup inside entry 0's weights
    refused(perturb, r"W\[0\]: shares memory with backup\[1\];|backup\[1\]: shares memory with W\[0\];",
            [W0, W1], [G0, torch.randn(100)], None, None, [torch.empty(100), arena[50:150]], scale, False)
    # entry 1's gradient is entry 0's weights
    refused(perturb, r"W\[0\]: shares memory with G\[1\];", [W0, W1], [G0, W0], None, None,
            [torch.empty(100), torch.empty(100)], scale, False)
    # restore_: entry 0's weights are entry 1's backup
    refused(restore, r"W\[0\]: shares memory with backup\[1\];", [W0, W1], None, None, [torch.randn(100), W0])
    if fisher is not None:
        F = torch.zeros(100)
        refused(fisher, r"F\[1\]: shares memory with G\[0\];", [torch.zeros(100), F], [F, torch.randn(100)],
                1.0)


def _brute_force_conflict(arguments, indexed: bool) -> bool:
    """Whether two tensors of ``arguments`` (``ops._check_disjoint``'s form) share a byte while one of
    them is written: every pair compared, from the tensors' own byte ranges."""
    tensors = []
    for _, written, items in arguments:
        for t in [items] if isinstance(items, torch.Tensor) else items:
            if t is not None and t.numel():
                start = t.data_ptr()
                tensors.append((start, start + t.numel() * t.element_size(), written))
    return any(a[0] < b[1] and b[0] < a[1] and (a[2] or b[2])
               for i, a in enumerate(tensors) for b in tensors[i + 1:])


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_overlap_rule_is_one_rule(data) -> None:
    """The overlap check of the ops layer: its Python form and the compiled one (``_C.check_disjoint``,
    also what the native operators run) refuse exactly the argument sets in which a written tensor shares
    a byte with another (every pair compared), and name the same two arguments."""
    from ssam_kernels import ops

    arena = torch.zeros(256)
    entries = data.draw(st.integers(1, 4))
    names = [("W", True), ("G", False), ("mask", False), ("offsets", False), ("backup", True)]

    def view() -> torch.Tensor | None:
        if data.draw(st.booleans()) and data.draw(st.booleans()):
            return None
        start = data.draw(st.integers(0, 250))
        piece = arena[start: start + data.draw(st.integers(0, 40))]
        return piece.view(torch.int32) if data.draw(st.booleans()) else piece

    arguments = tuple((name, written, [view() for _ in range(entries)]) for name, written in names)
    if data.draw(st.booleans()):
        arguments += (("scale", False, arena[data.draw(st.integers(0, 255))]),)
    indexed = data.draw(st.booleans())
    messages = []
    for compiled in (False, True):
        if compiled and ops._C is None:
            continue
        try:
            with mock.patch.object(ops, "_C", ops._C if compiled else None):
                ops._check_disjoint(arguments, indexed)
            messages.append(None)
        except ValueError as exc:
            messages.append(str(exc))
    assert (messages[0] is not None) == _brute_force_conflict(arguments, indexed), messages[0]
    assert len(set(messages)) == 1, messages


def _thread_worker(op: str) -> None:
    """Another thread empties the lists of a list op while its kernel runs without the GIL (and frees
    their tensors, unless the op holds its own references): the op must finish on the tensors it was
    given. Tensors of 8 MiB are mmap'ed by malloc and unmapped when freed, so a kernel writing one that
    was freed faults."""
    import threading
    import time

    from ssam_kernels import ops

    torch.set_num_threads(1)  # a longer kernel (~100 ms): the other thread runs while it does
    sys.setswitchinterval(100.0)  # no forced switch: the other thread gets the GIL when the main one waits
    n, count = 1 << 21, 16
    lists = {"W": [torch.randn(n) for _ in range(count)], "G": [torch.randn(n) for _ in range(count)],
             "backup": [torch.empty(n) for _ in range(count)]}
    checksum = sum(float(w.sum()) for w in lists["W"])
    start = threading.Event()

    def empty_the_lists() -> None:
        start.wait()
        time.sleep(0.01)  # past the op's checks (some torch calls there release the GIL): into the kernel
        for items in lists.values():
            items.clear()
        garbage = [torch.ones(n) for _ in range(3 * count)]  # reuse what was freed
        del garbage

    def run(W: list, G: list, backup: list) -> None:
        if op == "perturb":
            ops.perturb_(W, G, None, None, backup, torch.tensor(0.0), backend="native")
        elif op == "restore":
            ops.restore_(W, None, None, backup, backend="native")
        else:
            assert torch.isfinite(ops.grad_sq_norm(G, backend="native"))

    run([torch.ones(3)], [torch.ones(3)], [torch.ones(3)])  # imports and first-call work, before the race
    thread = threading.Thread(target=empty_the_lists)
    thread.start()
    start.set()
    run(lists["W"], lists["G"], lists["backup"])
    thread.join()
    print("DONE", checksum, flush=True)


@pytest.mark.parametrize("op", ["perturb", "restore", "norm"])
def test_list_op_keeps_its_tensors_alive(op: str) -> None:
    if _available("native") is not None:
        pytest.skip("native unavailable")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--threads", op], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0 and done.stdout.startswith("DONE"), (done.returncode, done.stderr[-3000:])


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
if __name__ == "__main__" and sys.argv[1:2] == ["--threads"]:
    _thread_worker(sys.argv[2])

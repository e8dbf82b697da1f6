"""How the PyTorch and Triton backends cut up their work: block and chunk sizes, launch shapes, and which
of two equivalent arithmetic paths a device takes.

A :class:`Tuning` never changes a result: every setting gives the same bits (the parity suite runs the
backends under small and production settings against the reference). It is passed per call, as
``tuning=`` on every op of :mod:`ssam_kernels.ops` and on the optimizers, and flows from there to every
primitive; nothing here is read from or written to a global. The defaults are the production values.
Small values exercise chunk boundaries and multi-program paths on small inputs (the tests' use); the
compiled ``native`` and ``cuda_sim`` backends have their shapes compiled in and take no tuning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .contract import CHUNK


def _check_count(name: str, value: object, multiple: int = 1, power_of_two: bool = False) -> None:
    """A positive int ``value``, a multiple of ``multiple`` (and a power of two)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0 or value % multiple or (power_of_two and value & (value - 1)):
        kind = "power of two" if power_of_two else "int" if multiple == 1 else f"multiple of {multiple}"
        least = f" of at least {multiple}" if power_of_two and multiple > 1 else ""
        raise ValueError(f"{name}: expected a positive {kind}{least}, got {value}")


@dataclass(frozen=True)
class TritonLaunch:
    """Tile sizes of the Triton kernels (powers of two) and their program counts."""

    chunks: int
    """1024-entry mask chunks per program of ``perturb_`` / ``restore_``."""
    block: int
    """Entries per tile of the streaming kernels (norm, Fisher, axpby, radix passes, hash); at least 32."""
    tiles: int
    """Tiles per program of ``grad_sq_norm``, ``fisher_accumulate_`` and ``axpby_`` (fewer, longer
    programs)."""
    histogram_tiles: int
    """Tiles (of ``block`` entries) per ``tl.histogram`` of the radix-histogram kernel: each call zeroes
    its ``2^bits`` shared bins, counts with shared atomics and reads the bins back, so on a GPU one call
    over 4 tiles (32 entries per thread) halves the shared-memory operations per entry."""
    programs_per_sm: int
    """Programs per streaming multiprocessor of the persistent radix-histogram kernel."""
    interpret_programs: int
    """Programs of the persistent radix-histogram kernel in interpreter mode."""
    num_warps: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            counts_programs = field.name in ("programs_per_sm", "interpret_programs")
            _check_count(f"tuning.triton.{field.name}", getattr(self, field.name),
                         32 if field.name == "block" else 1, power_of_two=not counts_programs)


TRITON_GPU = TritonLaunch(chunks=2, block=2048, tiles=8, histogram_tiles=2, programs_per_sm=4,
                          interpret_programs=1, num_warps=8)
"""Triton's launches on a GPU. ``chunks=2``: the masked ``perturb_`` handles 8 entries per thread, which
keeps it at 64 registers (fp32, 4 blocks per SM; 102 with 4 chunks); the tests also run the ops with it
in the interpreter."""
TRITON_INTERPRETER = TritonLaunch(chunks=16, block=1 << 14, tiles=1, histogram_tiles=1, programs_per_sm=1,
                                  interpret_programs=2, num_warps=4)
"""Triton's launches in its interpreter, which pays per operation rather than per element: large tiles."""


@dataclass(frozen=True, repr=False)
class Tuning:
    """The knobs of the PyTorch and Triton backends, for one call (module docstring)."""

    reference_block: int = 1 << 24
    """Entries per block of the ``reference`` backend's loops (a multiple of 32): bounds its temporaries
    and carries counts past 2^31 in int64."""
    chunk_entries: int = 1 << 16
    """Entries per chunk of the ``vectorized`` backend (a multiple of 1024): int32/float64 temporaries of
    256-512 KiB."""
    mask_block_words: int = 1 << 20
    """Mask words per block of :func:`.bitmask.pack` / :func:`.bitmask.unpack` as the backends call them
    (32 Mi entries)."""
    bucket_min_capacity: int = 1 << 16
    """The selection's bucket path runs when the prefix's bucket holds at most
    ``min(max(bucket_min_capacity, N >> bucket_capacity_shift), 2^30)`` entries (:mod:`.select`)."""
    bucket_capacity_shift: int = 8
    fused_fma: bool = True
    """``vectorized``: take ``torch.addcmul`` for the fp32 FMA where the probe finds it fused
    (:func:`._arith.hardware_fma`); False always emulates it (same bits)."""
    host_reads: bool = True
    """``vectorized``: branch on values read on the host where that is free (CPU tensors); False takes
    the path of the other devices (same bits)."""
    bincount: bool = True
    """``vectorized``: histograms by ``torch.bincount`` on CPU; False takes ``index_add_`` as elsewhere."""
    triton: TritonLaunch | None = None
    """Triton's launch shapes; None: :data:`TRITON_GPU` on a GPU, :data:`TRITON_INTERPRETER` in the
    interpreter."""

    def __post_init__(self) -> None:
        _check_count("tuning.reference_block", self.reference_block, 32)
        _check_count("tuning.chunk_entries", self.chunk_entries, CHUNK)
        _check_count("tuning.mask_block_words", self.mask_block_words)
        _check_count("tuning.bucket_min_capacity", self.bucket_min_capacity)
        if isinstance(self.bucket_capacity_shift, bool) or not isinstance(self.bucket_capacity_shift, int) \
                or not 0 <= self.bucket_capacity_shift < 64:
            raise ValueError(f"tuning.bucket_capacity_shift: expected an int in [0, 64), "
                             f"got {self.bucket_capacity_shift!r}")
        for name in ("fused_fma", "host_reads", "bincount"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"tuning.{name}: expected a bool, got {type(getattr(self, name)).__name__}")
        if self.triton is not None and not isinstance(self.triton, TritonLaunch):
            raise TypeError(f"tuning.triton: expected a TritonLaunch or None, "
                            f"got {type(self.triton).__name__}")

    def __repr__(self) -> str:
        """The fields that differ from the production settings: ``Tuning(chunk_entries=1024)``."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"Tuning({', '.join(changed)})"


DEFAULT = Tuning()
"""The production settings, what ``tuning=None`` means."""


def resolve(tuning: object) -> Tuning:
    """``tuning`` as a :class:`Tuning` (None: :data:`DEFAULT`); ``TypeError`` naming the argument."""
    if tuning is None:
        return DEFAULT
    if not isinstance(tuning, Tuning):
        raise TypeError(f"tuning: expected an ssam_kernels.ops.Tuning or None, got {type(tuning).__name__}")
    return tuning

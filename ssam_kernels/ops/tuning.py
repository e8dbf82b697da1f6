"""How the PyTorch and Triton backends cut up their work: block and chunk sizes, launch shapes, and which
of two equivalent arithmetic paths a device takes.

The element-wise ops and the selection give the same bits under every :class:`Tuning` (the parity suite
runs the backends under small and production settings against the reference). The one result it moves
is the last bits of Triton's ``grad_sq_norm``, a ``torch.sum`` of one float64 partial per tile, whose
order follows the tile shape (as the norm's order differs between backends and devices, within the
float64 rounding of the reference's sum); through the norm, an optimizer step on Triton may then differ
in the perturbation's last bits. It is passed per call, as
``tuning=`` on every op of :mod:`ssam_kernels.ops` and on the optimizers, and flows from there to every
primitive; nothing here is read from or written to a global. The defaults are the production values.
Small values exercise chunk boundaries and multi-program paths on small inputs (the tests' use); the
compiled ``native`` and ``cuda_sim`` backends have their shapes compiled in: they accept a tuning and have
no use for it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .contract import CHUNK

_LARGEST = 1 << 30
"""Bound of the sizes: per-block counts and positions stay far from int32 and int64 limits."""
_TRITON_TILE = 1 << 20
"""Triton's largest block of a tensor (``TRITON_MAX_TENSOR_NUMEL``)."""


def _check_int(name: str, value: object, low: int, high: int, multiple: int = 1, power_of_two: bool = False
               ) -> None:
    """An int ``value`` in ``[low, high]``, a multiple of ``multiple`` (a power of two)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high or value % multiple or (power_of_two and value & (value - 1)):
        kind = "a power of two" if power_of_two else f"a multiple of {multiple}" if multiple > 1 else "an int"
        raise ValueError(f"{name}: expected {kind} in [{low}, {high}], got {value}")


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
        name = "tuning.triton."
        _check_int(name + "chunks", self.chunks, 1, _TRITON_TILE // CHUNK, power_of_two=True)
        _check_int(name + "block", self.block, 32, _TRITON_TILE, power_of_two=True)
        _check_int(name + "tiles", self.tiles, 1, _TRITON_TILE, power_of_two=True)
        _check_int(name + "histogram_tiles", self.histogram_tiles, 1, _TRITON_TILE // self.block,
                   power_of_two=True)  # one tl.histogram over histogram_tiles · block entries
        _check_int(name + "programs_per_sm", self.programs_per_sm, 1, 1 << 10)
        _check_int(name + "interpret_programs", self.interpret_programs, 1, 1 << 10)
        _check_int(name + "num_warps", self.num_warps, 1, 32, power_of_two=True)


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
    mask_list_words: int = 1 << 22
    """Most words the offsets and live counts of a list of masks handle in one set of tensor ops
    (:class:`.select.MaskList`, 128 Mi entries: its int64 temporaries, ~40 B per word, stay below ~170 MB);
    a larger list is handled mask by mask."""
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
        _check_int("tuning.reference_block", self.reference_block, 32, _LARGEST, multiple=32)
        _check_int("tuning.chunk_entries", self.chunk_entries, CHUNK, _LARGEST, multiple=CHUNK)
        _check_int("tuning.mask_block_words", self.mask_block_words, 1, _LARGEST)
        _check_int("tuning.mask_list_words", self.mask_list_words, 1, _LARGEST)
        _check_int("tuning.bucket_min_capacity", self.bucket_min_capacity, 1, _LARGEST)
        _check_int("tuning.bucket_capacity_shift", self.bucket_capacity_shift, 0, 63)
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

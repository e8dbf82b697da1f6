"""Warnings that point at the user's line: the first caller outside ssam_kernels and the machinery
between (torch's decorators such as ``torch.no_grad`` and ``torch.compiler.disable``, contextlib,
functools), whatever the depth of the call inside the library."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import torch

_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
             os.path.abspath(contextlib.__file__), os.path.abspath(functools.__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside the library and that machinery."""
    frame, level = sys._getframe(1), 2  # level 2: warn's caller
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)

"""Command-line helpers shared by the example scripts: help that shows defaults and plain text, and
argument types whose errors are argparse errors (``error: argument --sparsity: ...``), not tracebacks."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and appends ``(default: ...)`` to every option's help."""


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose description is ``doc`` without its reST markup (double backticks)."""
    return argparse.ArgumentParser(description=(doc or "").replace("``", "").replace("\\\\", "\\"),
                                   formatter_class=HelpFormatter)


def _number(kind: type, check: Callable[[float], bool], expected: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected  # argparse names the type in some messages
    return parse


fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
non_negative = _number(float, lambda v: v >= 0, "a non-negative number")
positive = _number(float, lambda v: v > 0, "a positive number")
positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")

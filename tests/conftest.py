import contextlib
import os

import pytest
import torch
from hypothesis import settings

from tests.helpers import DTYPES

# Without a GPU the Triton kernels run in Triton's interpreter, which is chosen when the kernels are
# defined: set it before any test imports ssam_kernels.ops.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True)
settings.load_profile("ci")



@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)


@pytest.fixture(scope="session", autouse=True)
def _compiled_backends_checked():
    """The first-use check of every compiled backend (ssam_kernels.ops.selfcheck) runs once, before the
    tests, so that tests counting kernel calls or launches never count the check's. A backend that fails
    it is left to the tests that use it, which then fail saying why."""
    from ssam_kernels import ops
    from ssam_kernels.ops import selfcheck

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for device in devices:
        for name in selfcheck.CHECKED_BACKENDS:
            if ops._unavailable(name, device) is None:
                for dtype in (*DTYPES, torch.float64, torch.int32):
                    with contextlib.suppress(RuntimeError):
                        ops.resolve_backend(name, device, dtype)

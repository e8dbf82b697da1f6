import os
import sys

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run in Triton's interpreter, which is chosen when the kernels are
# defined: set it before any test imports ssam_kernels.ops.triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # the oracles module

settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True)
settings.load_profile("ci")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)

import os
import sys

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))  # the oracles module

settings.register_profile("ci", max_examples=40, deadline=None, print_blob=True)
settings.load_profile("ci")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(1234)

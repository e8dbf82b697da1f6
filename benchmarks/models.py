"""Real model shapes for the step benchmark, written here (torchvision / transformers are not needed).

- ``resnet18``: ResNet-18 for CIFAR (3×3 stem, no max-pool, 10 classes, 32×32 input): 11.2 M
  parameters in 62 tensors.
- ``vit_b16``: ViT-B/16 (224×224 input, 1000 classes): 86.6 M parameters in 152 tensors.
- ``gpt2_medium``: a GPT-2-medium-sized decoder (d=1024, 24 layers, 16 heads, vocabulary 50257, context
  1024, tied output head): 354.8 M parameters in 292 tensors.
- ``gpt_1.3b``: a GPT-3-XL-sized decoder (d=2048, 24 layers, 16 heads, context 2048), bf16: 1.31 B
  parameters in 292 tensors.

Transformer blocks are ``nn.TransformerEncoderLayer`` (pre-norm, GELU, 4·d MLP): the same 12 tensors
per block as GPT-2 and ViT (fused QKV weight and bias, output projection, two MLP layers, two norms).
``scale`` multiplies every width (channels, ``d``) and keeps depth, vocabulary, context and image size,
so the tensor count and the shape mix stay those of the real model; use it to shrink models on CPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


def _example_models() -> ModuleType:
    """``python/models.py``, the training examples' model definitions (a script folder, not a package)."""
    path = Path(__file__).resolve().parents[1] / "python" / "models.py"
    spec = importlib.util.spec_from_file_location("ssam_example_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Transformer(nn.Module):
    """A pre-norm transformer: a ViT (``patch``, ``image``, ``classes``) or a causal GPT language model
    (``vocab``, ``context``, output head tied to the token embedding)."""

    def __init__(self, d: int, layers: int, heads: int, *, vocab: int = 0, context: int = 0, patch: int = 0,
                 image: int = 0, classes: int = 0) -> None:
        super().__init__()
        self.vit = patch > 0
        if self.vit:
            self.embed = nn.Conv2d(3, d, patch, patch)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
            self.head = nn.Linear(d, classes)
        else:
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(1, context, d) * 0.02)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vit:
            h = self.embed(x).flatten(2).transpose(1, 2)
            h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1) + self.pos
            causal = None
        else:
            h = self.embed(x) + self.pos[:, : x.shape[1]]
            causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], x.device, h.dtype)
        for block in self.blocks:
            h = block(h, src_mask=causal, is_causal=causal is not None)
        h = self.norm(h)
        return self.head(h[:, 0]) if self.vit else h @ self.embed.weight.t()


Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model and a batch for it."""

    build: Callable[[float], nn.Module]
    dtype: torch.dtype
    batch: Callable[[int, int, torch.device, torch.dtype], Batch]
    gpu_batch: int
    gpu_seq: int = 0


def _width(base: int, scale: float, multiple: int) -> int:
    return max(multiple, round(base * scale / multiple) * multiple)


def _images(size: int, classes: int) -> Callable[[int, int, torch.device, torch.dtype], Batch]:
    def batch(n: int, seq: int, device: torch.device, dtype: torch.dtype) -> Batch:
        del seq
        return (torch.randn(n, 3, size, size, device=device, dtype=dtype),
                torch.randint(classes, (n,), device=device))
    return batch


def _tokens(n: int, seq: int, device: torch.device, dtype: torch.dtype) -> Batch:
    """Token ids and next-token targets (random; the step's cost does not depend on the text)."""
    del dtype
    ids = torch.randint(VOCAB, (n, seq + 1), device=device)
    return ids[:, :-1], ids[:, 1:]


VOCAB = 50257


def _gpt(d: int, layers: int, heads: int, context: int) -> Callable[[float], nn.Module]:
    return lambda s: Transformer(_width(d, s, heads), layers, heads, vocab=VOCAB, context=context)


MODELS: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(lambda s: _example_models().resnet18(10, s), torch.float32, _images(32, 10), 128),
    "vit_b16": ModelSpec(lambda s: Transformer(_width(768, s, 12), 12, 12, patch=16, image=224, classes=1000),
                         torch.float32, _images(224, 1000), 64),
    "gpt2_medium": ModelSpec(_gpt(1024, 24, 16, 1024), torch.float32, _tokens, 8, 1024),
    "gpt_1.3b": ModelSpec(_gpt(2048, 24, 16, 2048), torch.bfloat16, _tokens, 4, 2048),
}


def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over classes (or over the vocabulary at every position)."""
    return nn.functional.cross_entropy(outputs.reshape(-1, outputs.shape[-1]).float(), targets.reshape(-1))

"""What users meet around the step: the defaults (the tensors layout, SSAM-D at sparsity 0.5), ``repr``,
the keyword-only options, and the optimizer's lifetime (rebuilding it leaks nothing; ``close()`` hands the
parameters back as plain PyTorch ones)."""

from __future__ import annotations

import gc
import io

import pytest
import torch
from torch import nn

import ssam_kernels as sk
from tests.helpers import assert_same, seeded_mlp, train, weights

SIZES = (64, 256, 256, 8)  # the model's layer widths: large enough that its memory shows


def hook_counts(model: nn.Module) -> list[int]:
    """Post-accumulate-grad hooks on each parameter (no public API counts them)."""
    return [len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()]


def live_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of every plain tensor and parameter the garbage collector can
    reach (tensor subclasses, e.g. the fake tensors other tests leave behind, hold no memory of ours)."""
    gc.collect()
    storages: dict[int, int] = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, nn.Parameter) and obj.is_cpu and obj.layout == torch.strided:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


# ----------------------------------------------------------------------------------------------------
# Defaults
# ----------------------------------------------------------------------------------------------------

def test_default_layout_keeps_pytorch_semantics() -> None:
    model = seeded_mlp(sizes=SIZES)
    pointers = [p.data_ptr() for p in model.parameters()]
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.layout.kind == "tensors" and opt.sparsity == 0.5 and isinstance(opt.policy, sk.DynamicMask)
    assert opt.policy.interval == 100
    assert [p.data_ptr() for p in model.parameters()] == pointers  # parameters keep their storage
    assert all(p.grad is None for p in model.parameters())  # before the first backward
    train(model, opt, 2, n=4)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
    # a submodule saves its own tensors only (in the flat layout it would write the whole buffer)
    saved = io.BytesIO()
    torch.save(model[0].state_dict(), saved)
    assert saved.tell() < 2 * sum(p.numel() * 4 for p in model[0].parameters())


def test_flat_layout_changes_what_the_docs_say() -> None:
    model = seeded_mlp(sizes=SIZES)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, layout="flat")
    (segment,) = opt.layout.segments
    assert all(p.untyped_storage().data_ptr() == segment.weight.untyped_storage().data_ptr()
               for p in model.parameters())  # views into one buffer
    assert all(p.grad is not None for p in model.parameters())  # .grad is never None
    saved = io.BytesIO()
    torch.save(model[0].state_dict(), saved)
    assert saved.tell() > sum(p.numel() * 4 for p in model.parameters())  # the whole buffer
    safetensors = pytest.importorskip("safetensors.torch")
    with pytest.raises(RuntimeError):  # shared storage
        safetensors.save_model(model, "/dev/null")
    opt.close()
    safetensors.save_model(model, "/dev/null")  # close() gives the parameters their own storage


def test_repr_shows_the_settings() -> None:
    model = seeded_mlp(sizes=SIZES)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    text = repr(opt)
    first = text.splitlines()[0]
    for part in ("SSAM (sparsity=0.5", "mask=DynamicMask(interval=100, ", "drop_rate=0.5", "rho=0.05",
                 "adaptive=False", "eps=1e-12", "layout='tensors'", "base_optimizer=SGD"):
        assert part in first, part
    assert "backend='auto' (cpu: native)" in first or "backend='auto' (cpu: vectorized)" in first
    assert "Parameter Group 0" in text and "    momentum: 0.9" in text and "    rho: 0.05" in text
    dense = repr(sk.SAM(model.parameters(), torch.optim.SGD, 0.2, adaptive=True, backend="reference",
                        layout="flat", lr=0.1))
    assert dense.startswith("SAM (sparsity=0.0, mask=None, rho=0.2, adaptive=True, eps=1e-12, layout='flat', "
                            "backend='reference', base_optimizer=SGD, schedule=EveryStep()\n"
                            "Parameter Group 0\n")
    random = sk.SSAM(model.parameters(), torch.optim.SGD, sparsity=0.9, mask=sk.RandomMask(seed=3), lr=0.1)
    assert "sparsity=0.9, mask=RandomMask(interval=None, seed=3)" in repr(random)
    looksam = sk.SAM(model.parameters(), torch.optim.SGD, schedule=sk.LookSAM(k=4), lr=0.1)
    assert repr(looksam).splitlines()[0].endswith("schedule=LookSAM(k=4, alpha=0.7)")


def test_options_after_rho_are_keyword_only() -> None:
    params = list(seeded_mlp(sizes=SIZES).parameters())
    opt = sk.SSAM(params, torch.optim.SGD, 0.2, lr=0.1)  # davda54's positional rho
    assert opt.defaults["rho"] == 0.2
    for cls in (sk.SSAM, sk.SAM):
        with pytest.raises(TypeError, match=r"by keyword.*adaptive=True"):
            cls(params, torch.optim.SGD, 0.2, True, lr=0.1)  # davda54's positional adaptive


# ----------------------------------------------------------------------------------------------------
# Lifetime: rebuild and close
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["tensors", "flat"])
def test_rebuilding_the_optimizer_leaks_nothing(layout: str) -> None:
    model = seeded_mlp(sizes=SIZES)
    sizes, hooks = [], []
    for _ in range(5):
        opt = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, layout=layout)
        train(model, opt, 2, n=4)
        assert hook_counts(model) == [1] * 6  # one per parameter while the optimizer lives
        del opt
        sizes.append(live_tensor_bytes())
        hooks.append(hook_counts(model))
    assert hooks == [[0] * 6] * 5  # removed when the optimizer is garbage collected
    assert sizes == [sizes[0]] * 5  # the old optimizers' buffers are freed, every time


@pytest.mark.parametrize("layout", ["tensors", "flat"])
def test_close_hands_back_plain_parameters(layout: str) -> None:
    model = seeded_mlp(sizes=SIZES)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, layout=layout)
    train(model, opt, 1, n=4)
    before = weights(model)
    x = torch.randn(4, 64)
    model[2](torch.relu(model[0](x))).sum().backward()  # gradients for the first two layers only
    opt.first_step()
    opt.close()  # restores the perturbed weights first
    assert_same(weights(model), before)
    assert hook_counts(model) == [0] * 6
    assert [p.grad is None for p in model.parameters()] == [False] * 4 + [True] * 2
    buffers = {s.weight.untyped_storage().data_ptr() for s in opt.layout.segments}
    if layout == "flat":
        assert not buffers & {p.untyped_storage().data_ptr() for p in model.parameters()}
        assert not any(p.grad._base is not None for p in model.parameters() if p.grad is not None)
    with pytest.raises(RuntimeError, match=r"^first_step: this optimizer was closed"):
        opt.first_step()
    with pytest.raises(RuntimeError, match=r"^add_param_group: this optimizer was closed"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(3))]})
    opt.close()  # twice is fine
    plain = torch.optim.SGD(model.parameters(), lr=0.1)  # a plain optimizer afterwards sees PyTorch's .grad
    plain.step()
    assert_same(weights(model)[4:], before[4:])  # the layer that got no gradient is not stepped


def test_close_leaves_parameters_bound_to_a_newer_flat_optimizer_alone() -> None:
    model = seeded_mlp(sizes=SIZES)
    old = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, layout="flat")
    new = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, layout="flat")
    old.close()
    (segment,) = new.layout.segments
    assert all(p.untyped_storage().data_ptr() == segment.weight.untyped_storage().data_ptr()
               for p in model.parameters())
    assert hook_counts(model) == [1] * 6
    train(model, new, 2, n=4)

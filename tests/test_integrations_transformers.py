"""SSAMTrainer against the real Hugging Face Trainer: a tiny GPT-2 built from a config (never downloaded),
compared step for step with a hand-written SSAM loop on the same batches: the weights are bit-identical."""

from __future__ import annotations

import copy
import gc
import os
import sys
from pathlib import Path

import pytest
import torch

import ssam_kernels as sk
from tests.helpers import doc_block

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from ssam_kernels.integrations.transformers import (  # noqa: E402
    SSAMTrainer,
    reattach_parameters,
    unwrap_ssam,
)

BATCH, SEQ, SAMPLES = 4, 8, 32


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = SAMPLES, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, SEQ), generator=generator)
        # The first label is never predicted (causal LM): -100 there makes the token count of the loss
        # the same whether the Trainer counts labels before or after the shift.
        self.labels = self.ids.clone()
        self.labels[:, 0] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class InOrderTrainer(SSAMTrainer):
    """Batches in dataset order, so that the hand-written loop sees the same ones."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=SEQ, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def make_ssam(model: torch.nn.Module, layout: str = "auto", schedule: sk.Schedule | None = None) -> sk.SSAM:
    return sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, momentum=0.9,
                   mask=sk.DynamicMask(interval=2), lr=0.5, backend="reference", layout=layout,
                   schedule=schedule)


def constant(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))


def arguments(tmp_path: Path, **overrides: object) -> transformers.TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, max_steps=3,
                   gradient_accumulation_steps=2, max_grad_norm=0.5, use_cpu=True, report_to="none",
                   save_strategy="no", logging_strategy="no", seed=0, disable_tqdm=True,
                   dataloader_num_workers=0)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def hand_written(model: torch.nn.Module, data: TokenDataset, steps: int, accumulation: int,
                 max_grad_norm: float, autocast: bool = False, batch: int = BATCH, layout: str = "auto",
                 schedule: sk.Schedule | None = None) -> torch.nn.Module:
    """The plain-PyTorch SSAM loop: accumulate at w, first_step once, the same micro-batches at w + e
    when the step is sharpness-aware."""
    opt = make_ssam(model, layout, schedule)
    sched = constant(opt)
    model.train()
    batches = [{"input_ids": data.ids[i: i + batch], "labels": data.labels[i: i + batch]}
               for i in range(0, len(data), batch)]

    def backward(inputs: dict[str, torch.Tensor], count: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**inputs, num_items_in_batch=count).loss  # summed over the step, as the Trainer
        loss.backward()

    for step in range(steps):
        micro = batches[step * accumulation: (step + 1) * accumulation]
        count = sum(b["labels"].ne(-100).sum() for b in micro)
        for inputs in micro:
            backward(inputs, count)
        if opt.first_step(zero_grad=True):
            for inputs in micro:
                backward(inputs, count)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.second_step()
        sched.step()
        model.zero_grad()
    return model


def train(tmp_path: Path, model: torch.nn.Module, resume: str | None = None, layout: str = "auto",
          schedule: sk.Schedule | None = None, **overrides: object) -> transformers.Trainer:
    opt = make_ssam(model, layout, schedule)
    trainer = InOrderTrainer(model=model, args=arguments(tmp_path, **overrides), train_dataset=TokenDataset(),
                             optimizers=(opt, constant(opt)))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("accumulation", "max_grad_norm", "layout"),
                         [(1, 0.0, "auto"), (3, 1e-3, "auto"), (3, 1e-3, "flat")])  # (2, 0.5): below
def test_trainer_matches_hand_written_loop(tmp_path: Path, accumulation: int, max_grad_norm: float,
                                           layout: str) -> None:
    start = tiny_gpt2()
    trained = train(tmp_path, copy.deepcopy(start), gradient_accumulation_steps=accumulation,
                    max_grad_norm=max_grad_norm, layout=layout)
    ssam = unwrap_ssam(trained.optimizer)
    assert trained.state.global_step == 3 and ssam.steps == 3
    assert ssam.layout.kind == ("flat" if layout == "flat" else "tensors")
    expected = hand_written(copy.deepcopy(start), TokenDataset(), 3, accumulation, max_grad_norm,
                            layout=layout)
    assert_same_weights(trained.model, expected)
    assert any(not torch.equal(p, q) for p, q in zip(start.parameters(), expected.parameters(), strict=True))


@pytest.mark.parametrize("schedule", [sk.EveryK(2), sk.LookSAM(2, 0.7)], ids=repr)
def test_trainer_skips_the_second_pass_on_plain_steps(tmp_path: Path, schedule: sk.Schedule) -> None:
    """Steps 0 and 2 are sharpness-aware (2 micro-batches, two passes), step 1 plain (one pass): 10
    forward passes, and the weights of the hand-written loop."""
    start = tiny_gpt2()
    model = copy.deepcopy(start)
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    trained = train(tmp_path, model, schedule=copy.deepcopy(schedule))
    assert trained.state.global_step == 3 and len(forwards) == 2 * (3 + 2)
    expected = hand_written(copy.deepcopy(start), TokenDataset(), 3, 2, 0.5, schedule=copy.deepcopy(schedule))
    assert_same_weights(trained.model, expected)


def test_trainer_bf16_autocast_matches_hand_written_loop(tmp_path: Path) -> None:
    start = tiny_gpt2()
    trained = train(tmp_path, copy.deepcopy(start), bf16=True)
    expected = hand_written(copy.deepcopy(start), TokenDataset(), 3, 2, 0.5, autocast=True)
    assert_same_weights(trained.model, expected)


def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    start = tiny_gpt2()
    full = train(tmp_path / "full", copy.deepcopy(start), max_steps=4, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file()
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["ssam"]["steps"] == 2 and saved["ssam"]["phase"] == "idle"
    resumed = train(tmp_path / "resumed", copy.deepcopy(start), resume=str(checkpoint), max_steps=4)
    assert unwrap_ssam(resumed.optimizer).steps == 4
    assert_same_weights(resumed.model, full.model)
    for a, b in zip(unwrap_ssam(resumed.optimizer).get_mask(), unwrap_ssam(full.optimizer).get_mask(),
                    strict=True):
        assert torch.equal(a, b)


def test_plain_trainer_with_ssam_fails_and_subclass_needs_ssam(tmp_path: Path) -> None:
    # Why the integration exists: the stock Trainer calls optimizer.step() with no first_step.
    model = tiny_gpt2()
    opt = make_ssam(model)
    plain = transformers.Trainer(model=model, args=arguments(tmp_path, gradient_accumulation_steps=1),
                                 train_dataset=TokenDataset(), optimizers=(opt, constant(opt)))
    with pytest.raises(RuntimeError, match="no first_step"):
        plain.train()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SSAMTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(),
                          optimizers=(sgd, constant(sgd)))
    with pytest.raises(TypeError, match="SSAMTrainer needs an ssam_kernels"):
        trainer.train()
    with pytest.raises(TypeError, match="freeze_bn_stats"):
        SSAMTrainer(model=model, args=arguments(tmp_path), freeze_bn_stats="yes")


def test_skipped_step_leaves_weights_unperturbed(tmp_path: Path) -> None:
    """A non-finite second pass (what fp16's GradScaler skips) must never leave w + e in the weights."""
    model = tiny_gpt2()
    before = copy.deepcopy(model)
    opt = make_ssam(model)
    trainer = InOrderTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                             optimizers=(opt, constant(opt)))
    calls = []

    def fail_in_second_pass(module: torch.nn.Module, args: object, output: object) -> None:
        calls.append(1)
        if len(calls) > 2:  # the two micro-batches at w went through; the pass at w + e fails
            raise FloatingPointError("overflow")

    model.register_forward_hook(fail_in_second_pass)
    with pytest.raises(FloatingPointError):
        trainer.train()
    assert_same_weights(model, before)


def test_optimizer_cls_and_kwargs(tmp_path: Path) -> None:
    model = tiny_gpt2()
    trainer = SSAMTrainer(model=model, args=arguments(tmp_path, max_steps=1, learning_rate=1e-3),
                          train_dataset=TokenDataset(),
                          optimizer_cls_and_kwargs=(sk.SSAM, {"base_optimizer": torch.optim.AdamW,
                                                              "rho": 0.05, "sparsity": 0.5,
                                                              "backend": "reference"}))
    trainer.train()
    assert unwrap_ssam(trainer.optimizer).steps == 1


class NormNet(torch.nn.Module):
    """Any module that returns its loss in a dict trains under the Trainer; this one has batch norm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Flatten(),
                                       torch.nn.Linear(8 * SEQ, 8), torch.nn.BatchNorm1d(8),
                                       torch.nn.Linear(8, 64))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": torch.nn.functional.cross_entropy(self.net(input_ids), labels[:, -1])}


@pytest.mark.parametrize(("freeze", "updates"), [(True, 2), (False, 4)])
def test_freeze_bn_stats_updates_once_per_micro_batch(tmp_path: Path, freeze: bool, updates: int) -> None:
    model = NormNet()
    opt = make_ssam(model)
    trainer = SSAMTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=TokenDataset(),
                          optimizers=(opt, constant(opt)), freeze_bn_stats=freeze)
    trainer.train()
    norm = model.net[3]
    assert int(norm.num_batches_tracked) == updates  # two micro-batches at w (and at w + e unless frozen)
    assert norm.track_running_stats


def fp16_trainer(tmp_path: Path, model: torch.nn.Module, max_steps: int) -> SSAMTrainer:
    """fp16 with accelerate's GradScaler path. accelerate uses a scaler on accelerators only, so on CPU
    the test hands it torch's CPU GradScaler, which is what it would build for a GPU."""
    opt = make_ssam(model)
    trainer = InOrderTrainer(model=model, args=arguments(tmp_path, max_steps=max_steps, fp16=True),
                             train_dataset=TokenDataset(), optimizers=(opt, constant(opt)))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.accelerator.native_amp = True
    return trainer


def test_fp16_grad_scaler_skipped_step_leaves_w(tmp_path: Path) -> None:
    model = tiny_gpt2()
    before = copy.deepcopy(model)
    trainer = fp16_trainer(tmp_path, model, max_steps=1)
    calls = []

    def overflow_in_second_pass(module: torch.nn.Module, args: object, output: object) -> None:
        calls.append(1)
        if len(calls) > 2:  # the two micro-batches at w went through; at w + e the loss overflows
            output.loss = output.loss * float("inf")

    model.register_forward_hook(overflow_in_second_pass)
    trainer.train()
    assert trainer.accelerator.optimizer_step_was_skipped
    assert trainer.accelerator.scaler.get_scale() == 2.0**7
    assert unwrap_ssam(trainer.optimizer).steps == 0
    assert_same_weights(model, before)  # the skipped step left w itself, not w + e


def test_fp16_grad_scaler_trains(tmp_path: Path) -> None:
    model = tiny_gpt2()
    start = copy.deepcopy(model)
    trainer = fp16_trainer(tmp_path, model, max_steps=3)
    trainer.train()
    assert not trainer.accelerator.optimizer_step_was_skipped
    assert unwrap_ssam(trainer.optimizer).steps == 3 and trainer.accelerator.scaler.get_scale() == 2.0**8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), start.parameters(), strict=True))


def test_trainer_recipe(tmp_path: Path) -> None:
    code = doc_block("docs/recipes.md", "Hugging Face `Trainer`")

    def training_arguments(output_dir: str, **options: object) -> transformers.TrainingArguments:
        # the recipe's own options, run briefly on CPU in a temporary folder
        return arguments(tmp_path, **options, max_steps=1)

    namespace = {"torch": torch, "sk": sk, "model": tiny_gpt2(), "ds": TokenDataset(),
                 "TrainingArguments": training_arguments}
    exec(code, namespace)
    assert namespace["opt"].steps == 1


def ddp_rank(out: str) -> None:
    """One rank of test_ddp_two_ranks_match_one_process (run by torchrun: this file is the script)."""
    model = tiny_gpt2()
    args = arguments(out, max_steps=2)  # sets up the process group (gloo on CPU)
    opt = make_ssam(model)
    assert opt.distributed == "replicated"
    trainer = InOrderTrainer(model=model, args=args, train_dataset=TokenDataset(),
                             optimizers=(opt, constant(opt)))
    trainer.train()
    rank = torch.distributed.get_rank()
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, Path(out) / f"rank{rank}.pt")
    del trainer, opt, model
    gc.collect()  # before the group goes: see python/train_distributed.py
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(tmp_path: Path) -> None:
    """DDP on two CPU ranks (gloo): rank r takes batches r, r + 2, ..., so each micro-batch of the
    global step is the two ranks' batches together; the accumulation and the second pass (synchronised
    on the last micro-batch only) give what one process gives on those global micro-batches."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               __file__, str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
                              [str(root), os.environ.get("PYTHONPATH", "")])})
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected = hand_written(tiny_gpt2(), TokenDataset(), 2, 2, 0.5, batch=2 * BATCH).state_dict()
    for name, value in expected.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-5, atol=1e-6, msg=name)



@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_reattach_parameters_after_model_to(layout: str) -> None:
    model = tiny_gpt2()
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1, layout=layout,
                  backend="reference")
    with torch.no_grad():
        model.to("cpu:0")  # what accelerate does for DDP on CPU: every parameter copied and rebound
        for p in model.parameters():
            p.add_(1.0)  # values changed after the move must survive
    expected = [p.detach().clone() for p in model.parameters()]
    weights = [s.weight for s in opt.layout.segments]
    assert not any(p.data_ptr() == s.weight.data_ptr() for s in opt.layout.segments for p in s.params[:1])
    reattach_parameters(opt)
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)
    for segment, weight in zip(opt.layout.segments, weights, strict=True):
        assert segment.weight is weight
        for p, (start, _) in zip(segment.params, segment.spans(), strict=True):
            assert p.data_ptr() == weight[start:].data_ptr()
    reattach_parameters(opt)  # attached: nothing to do
    model.to(torch.float64)
    with pytest.raises(ValueError, match="after the SSAM optimizer was built"):
        reattach_parameters(opt)


def test_trainer_with_model_moved_after_the_optimizer(tmp_path: Path) -> None:
    """The model moved (copied) after SSAM was built, as accelerate does for DDP on CPU: same training."""
    start = tiny_gpt2()
    model = copy.deepcopy(start)
    opt = make_ssam(model)
    model.to("cpu:0")
    trainer = InOrderTrainer(model=model, args=arguments(tmp_path), train_dataset=TokenDataset(),
                             optimizers=(opt, constant(opt)))
    trainer.train()
    assert_same_weights(model, hand_written(copy.deepcopy(start), TokenDataset(), 3, 2, 0.5))


if __name__ == "__main__":
    ddp_rank(sys.argv[1])

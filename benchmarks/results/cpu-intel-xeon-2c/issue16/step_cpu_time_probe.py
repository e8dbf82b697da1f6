"""Breakdown of the SSAM s=0.5 overhead, 1 thread, GPT-2-medium x1/16, interleaved rounds."""
import statistics, sys, time
import torch
import ssam_kernels as sk
from ssam_kernels import ops
from benchmarks import baselines, step as bstep
from benchmarks.models import MODELS, loss_fn

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
backend = sys.argv[2] if len(sys.argv) > 2 else "native"
policy = sys.argv[3] if len(sys.argv) > 3 else "fisher"
rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 5
torch.manual_seed(0)
spec = MODELS["gpt2_medium"]
model = spec.build(0.0625)
params = [p for p in model.parameters()]
fisher = [torch.rand(p.shape) for p in params]
x, y = spec.batch(2, 32, torch.device("cpu"), torch.float32)
loss_fn(model(x), y).backward()
ours = bstep.build_optimizer(bstep.Method("ours", "sk.SSAM", policy, 0.5, backend), params, fisher, False)
ours.first_step(); ours.unperturb()
ref = bstep.build_optimizer(bstep.Method("loop", "refcode SSAM", policy, 0.5), params, fisher, False)
sgd = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
sgd.step()
def o_ours(): ours.first_step(); ours.second_step()
def o_ref(): ref.first_step(); ref.second_step()
def pr_ours(): ours.first_step(); ours.unperturb()
def pr_ref(): ref.first_step(); ref.unperturb()
cases = {"sgd": sgd.step, "ours overhead": o_ours, "ref overhead": o_ref, "ours p+r": pr_ours, "ref p+r": pr_ref}
res = {k: [] for k in cases}
for r in range(rounds):
    for k, f in cases.items():
        f(); f()
        for _ in range(8):
            t = time.process_time(); f(); res[k].append(time.process_time() - t)
import os
for k, v in res.items():
    print(f"{k:16s} median {statistics.median(v)*1e3:7.2f} ms  p10 {sorted(v)[len(v)//10]*1e3:7.2f}")
m = statistics.median
print("ratio overhead ref/ours", m(res["ref overhead"]) / m(res["ours overhead"]),
      " p10-based", sorted(res["ref overhead"])[len(res["ref overhead"])//10] / sorted(res["ours overhead"])[len(res["ours overhead"])//10])
print("load", os.getloadavg())

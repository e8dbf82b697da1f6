import torch, time, sys, statistics
from ssam_kernels.ops import bitmask, vectorized as v, _oldvec as o
torch.set_num_threads(1)
N = 4480000
g = torch.Generator().manual_seed(0)
W = torch.randn(N, generator=g); G = torch.randn(N, generator=g)
words, offs = bitmask.from_bool(torch.rand(N, generator=g) >= (float(sys.argv[1]) if len(sys.argv) > 1 else 0.5))
B = torch.empty(int(offs[-1])); scale = torch.tensor(1e-3)
cases = {"new p": lambda: v.perturb_(W, G, words, offs, B, scale), "old p": lambda: o.perturb_(W, G, words, offs, B, scale),
         "new r": lambda: v.restore_(W, words, offs, B), "old r": lambda: o.restore_(W, words, offs, B)}
res = {k: [] for k in cases}
for _ in range(5):
    for k, f in cases.items():
        t = time.process_time(); f(); res[k].append(time.process_time() - t)
for k, x in res.items(): print(k, f"{statistics.median(x)*1e3:.1f} ms cpu, min {min(x)*1e3:.1f}")

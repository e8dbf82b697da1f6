import sys, time, torch
from ssam_kernels import ops
from ssam_kernels.ops import bitmask
torch.set_num_threads(1)
N = 4480000
g = torch.Generator().manual_seed(0)
W = torch.randn(N, generator=g); G = torch.randn(N, generator=g)
words, offs = bitmask.from_bool(torch.rand(N, generator=g) >= 0.5)
B = torch.empty(int(offs[-1])); scale = torch.tensor(1e-3)
which = sys.argv[1]
t = time.perf_counter(); c = time.process_time()
for _ in range(int(sys.argv[2])):
    if which == "p": ops.perturb_([W], [G], [words], [offs], [B], scale, False, backend="native")
    else: ops.restore_([W], [words], [offs], [B], backend="native")
print((time.process_time() - c) / int(sys.argv[2]) * 1e3, "cpu ms", (time.perf_counter() - t) / int(sys.argv[2]) * 1e3, "ms")

import torch, time
from ssam_kernels.ops import bitmask, vectorized as v
torch.set_num_threads(1)
C = 1 << 16
g = torch.Generator().manual_seed(0)
live0 = torch.rand(C, generator=g) >= 0.5
words, _ = bitmask.from_bool(live0)
w = torch.randn(C, generator=g).view(torch.int32); b = torch.empty(C, dtype=torch.int32)
cnt = int(live0.sum())
live = v._live(words, 0, C); idx = torch.nonzero(live).view(-1)
new = torch.randn(C).view(torch.int32)
lut = v._constant("byte_bits", words.device)
bytes_ = words.view(torch.uint8)
ops = {
 "_live(LUT index)": lambda: v._live(words, 0, C),
 "bytes.to(int64)": lambda: bytes_.to(torch.int64),
 "lut.index_select": lambda: lut.index_select(0, bytes_.to(torch.int32)),
 "_lanes(shift)": lambda: v._lanes(words, 0, C),
 "cumsum int32": lambda: torch.cumsum(live, 0, dtype=torch.int32),
 "nonzero": lambda: torch.nonzero(live),
 "nonzero_static": lambda: torch.nonzero_static(live, size=cnt),
 "masked_select out": lambda: torch.masked_select(w, live, out=b[:cnt]),
 "index_select out": lambda: torch.index_select(w, 0, idx, out=b[:cnt]),
 "masked_scatter_": lambda: w.masked_scatter_(live, b[:cnt]),
 "index_copy_": lambda: w.index_copy_(0, idx, b[:cnt]),
 "index_put_": lambda: w.index_put_((idx,), b[:cnt]),
 "where out": lambda: torch.where(live, new, w, out=w),
 "xor-and blend": lambda: w.__ixor__(new.bitwise_xor(w).bitwise_and_(v._lanes(words, 0, C))),
 "copy_ 64K f64": lambda: torch.empty(C, dtype=torch.float64).copy_(new),
}
for name, f in ops.items():
    f()
    t = time.process_time()
    for _ in range(100): f()
    print(f"{name:20s} {(time.process_time() - t) / 100 * 1e6:8.1f} us")
print("---")
lanes = v._lanes(words, 0, C)
slots = torch.zeros(C + 1, dtype=torch.int32)
slot = torch.cumsum(lanes, 0, dtype=torch.int32).neg_()
ar = torch.arange(C, dtype=torch.int32)
ext = torch.empty(C, dtype=torch.int32)
liv32 = live.to(torch.int32)
def perm():
    c = torch.cumsum(live, 0, dtype=torch.int32)
    # set: c - 1; unset: cnt + i - c
    return torch.where(live, c - 1, ar - c + cnt)
def perm2():
    c = torch.cumsum(live, 0, dtype=torch.int32)
    p = ar - c  # unset entries before i
    p += cnt
    # set: c - 1 = (c - 1); use lanes to blend: p ^= ((c - 1) ^ p) & lanes
    p ^= (c - 1).bitwise_xor_(p).bitwise_and_(lanes)
    return p
P = perm2()
assert torch.equal(P, perm())
ops2 = {
 "index_add_ (old)": lambda: slots.zero_().index_add_(0, slot, w & lanes),
 "perm (where)": perm,
 "perm2 (xor)": perm2,
 "index_copy_ perm": lambda: ext.index_copy_(0, P, w),
 "index_select perm(restore)": lambda: torch.index_select(ext, 0, P),
 "where no out": lambda: torch.where(live, new, w),
 "where lanes.bool out new": lambda: torch.where(live, w, new, out=new),
 "live.to(int32).neg": lambda: live.to(torch.int32).neg_(),
 "scatter_ perm": lambda: ext.scatter_(0, P.long(), w),
}
for name, f in ops2.items():
    f()
    t = time.process_time()
    for _ in range(100): f()
    print(f"{name:26s} {(time.process_time() - t) / 100 * 1e6:8.1f} us")

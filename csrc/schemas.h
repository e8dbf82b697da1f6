// The schemas of the ssam_kernels operators (the backend interface of ssam_kernels/ops/reference.py), one
// list for every library that defines them: ssam_kernels (registration.cpp) and cuda_sim's
// ssam_cuda_sim (sim/cuda_sim.cpp).
#pragma once

namespace ssam {

inline constexpr const char* kSchemas[] = {
    "grad_sq_norm(Tensor G, Tensor? W) -> Tensor",
    "perturb_(Tensor(a!) W, Tensor G, Tensor? mask, Tensor? offsets, Tensor(b!) backup, Tensor scale, "
    "bool adaptive) -> ()",
    "restore_(Tensor(a!) W, Tensor? mask, Tensor? offsets, Tensor backup) -> ()",
    "fisher_accumulate_(Tensor(a!) F, Tensor G, float alpha) -> ()",
    "axpby_(Tensor(a!) X, Tensor Y, Tensor a, Tensor b) -> ()",
    // The list forms: entry j of every list belongs together, all tensors of one call share a device and
    // (F excepted) a dtype; one call covers the whole list. A None in W / mask / offsets makes that entry
    // plain (no ASAM) / dense.
    "grad_sq_norm_multi(Tensor[] G, Tensor?[] W) -> Tensor",
    "perturb_multi_(Tensor(a!)[] W, Tensor[] G, Tensor?[] mask, Tensor?[] offsets, Tensor(b!)[] backup, "
    "Tensor scale, bool adaptive) -> ()",
    "restore_multi_(Tensor(a!)[] W, Tensor?[] mask, Tensor?[] offsets, Tensor[] backup) -> ()",
    "fisher_accumulate_multi_(Tensor(a!)[] F, Tensor[] G, float alpha) -> ()",
    "axpby_multi_(Tensor(a!)[] X, Tensor[] Y, Tensor a, Tensor b) -> ()",
    "radix_histogram(Tensor scores, Tensor prefix, int shift, int bits, bool largest, "
    "Tensor? filter_words, bool filter_value) -> Tensor",
    "threshold_mask(Tensor scores, Tensor threshold, Tensor tie_quota, bool largest, "
    "Tensor? filter_words, bool filter_value) -> Tensor",
    // The selection primitives over a list of segments (one device and score dtype): the summed histogram,
    // and the masks of the list as one sequence with the tie quota left after it.
    "radix_histogram_multi(Tensor[] scores, Tensor prefix, int shift, int bits, bool largest, "
    "Tensor?[] filters, bool filter_value) -> Tensor",
    "threshold_mask_multi(Tensor[] scores, Tensor threshold, Tensor tie_quota, bool largest, "
    "Tensor?[] filters, bool filter_value) -> (Tensor[], Tensor)",
    // The bucket path's mask pass (ssam_kernels/ops/select.py; CUDA kernels only): decided words and
    // per-chunk counts written, undecided entries appended to the candidates at the cursor.
    "bucket_mask_multi(Tensor[] scores, Tensor prefix, int shift, bool largest, Tensor?[] filters, "
    "bool filter_value, Tensor(a!)[] words, Tensor(b!)[] counts, int[] starts, Tensor(c!) candidates, "
    "Tensor(d!) cursor) -> ()",
    // hash_scores as an out= op: a factory op without tensor arguments would have no device to dispatch on.
    "hash_fill_(Tensor(a!) out, int seed, int step, int base) -> ()",
};

}  // namespace ssam

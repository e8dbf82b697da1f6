// The schemas of the ssam_kernels operators (the backend interface of ssam_kernels/ops/reference.py).
// Their CPU kernels are registered in cpu.cpp, their CUDA kernels in cuda.cu, their fake (meta)
// implementations in ssam_kernels/ops/native.py.
//
// Built by setup.py (SSAM_PYTHON_MODULE defined) this file is also the Python module ssam_kernels._C,
// whose import loads the library and so registers the ops. Built by CMake it is a plain shared library
// for torch.ops.load_library.
#include <torch/library.h>

TORCH_LIBRARY(ssam_kernels, m) {
  m.set_python_module("ssam_kernels.ops.native");
  m.def("grad_sq_norm(Tensor G, Tensor? W) -> Tensor");
  m.def("perturb_(Tensor(a!) W, Tensor G, Tensor? mask, Tensor? offsets, Tensor(b!) backup, Tensor scale, "
        "bool adaptive) -> ()");
  m.def("restore_(Tensor(a!) W, Tensor? mask, Tensor? offsets, Tensor backup) -> ()");
  m.def("fisher_accumulate_(Tensor(a!) F, Tensor G, float alpha) -> ()");
  m.def("radix_histogram(Tensor scores, Tensor prefix, int shift, int bits, bool largest, "
        "Tensor? filter_words, bool filter_value) -> Tensor");
  m.def("threshold_mask(Tensor scores, Tensor threshold, Tensor tie_quota, bool largest, "
        "Tensor? filter_words, bool filter_value) -> Tensor");
  // hash_scores as an out= op: a factory op without tensor arguments would have no device to dispatch on.
  m.def("hash_fill_(Tensor(a!) out, int seed, int step, int base) -> ()");
}

#if defined(SSAM_PYTHON_MODULE)
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

// ssam_kernels._C.built_with_cuda(): whether the CUDA kernels were compiled in.
PyObject* built_with_cuda(PyObject*, PyObject*) {
#if defined(SSAM_WITH_CUDA)
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "The compiled ssam_kernels ops (torch.ops.ssam_kernels).",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
#endif

// cuda_sim: the CUDA implementations of the ssam_kernels ops (csrc/cuda: the launchers and the device code,
// unchanged) compiled by a host C++ compiler against HIP-CPU and registered for CPU tensors as the ops of
// the library ssam_cuda_sim, with the schemas of ssam_kernels. A testing backend
// (ssam_kernels/ops/cuda_sim.py): device.h says what it runs and checks.
//
// Each op registers its tensor arguments for the memory checks under their schema names (W, backup[3],
// ...) for as long as it runs. Built by setup.py (SSAM_PYTHON_MODULE defined) this file is also the
// Python module ssam_kernels._cuda_sim, whose functions set the simulated launch shape; built by CMake it
// is a plain shared library for torch.ops.load_library.
#define SSAM_CUDA_SIM 1
#include "sim/device.h"  // first: it defines ssam_math.h's SSAM_READ

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cuda/element.cu"
#include "cuda/fisher.cu"
#include "cuda/hash.cu"
#include "cuda/norm.cu"
#include "cuda/select.cu"
#include "schemas.h"

namespace {

// The tensors of one op call, registered for the memory checks until the call returns.
class Arguments {
 public:
  explicit Arguments(const std::vector<std::string>& names) : names_(names) {}

  void add(const at::Tensor& t) { ssam::sim::add_tensor(t, next()); }
  void add(const std::optional<at::Tensor>& t) {
    const std::string name = next();
    if (t.has_value()) ssam::sim::add_tensor(*t, name);
  }
  void add(at::TensorList list) {
    const std::string name = next();
    for (size_t j = 0; j < list.size(); ++j) ssam::sim::add_tensor(list[j], name + "[" + std::to_string(j) + "]");
  }
  void add(const ssam::OptionalTensors& list) {
    const std::string name = next();
    for (size_t j = 0; j < list.size(); ++j) {
      const std::optional<at::Tensor> t = list.get(j);
      if (t.has_value()) ssam::sim::add_tensor(*t, name + "[" + std::to_string(j) + "]");
    }
  }
  template <typename T>
  void add(const T& /*not a tensor*/) {
    next();
  }

 private:
  std::string next() { return index_ < names_.size() ? names_[index_++] : "argument " + std::to_string(index_++); }

  const std::vector<std::string>& names_;
  size_t index_ = 0;
};

template <size_t N>
struct OpName {
  char text[N];
  constexpr OpName(const char (&name)[N]) { std::copy_n(name, N, text); }  // NOLINT: a literal's NTTP
};

// Fn, an op of csrc/cuda/ops.h, with its tensor arguments registered under their schema names.
template <OpName Name, auto Fn, typename Signature = std::remove_pointer_t<decltype(Fn)>>
struct Checked;

template <OpName Name, auto Fn, typename R, typename... Args>
struct Checked<Name, Fn, R(Args...)> {
  static R call(Args... args) {
    static const std::vector<std::string> names = [] {
      const c10::OperatorHandle op =
          c10::Dispatcher::singleton().findSchemaOrThrow((std::string("ssam_cuda_sim::") + Name.text).c_str(), "");
      std::vector<std::string> out;
      for (const c10::Argument& argument : op.schema().arguments()) out.push_back(argument.name());
      return out;
    }();
    const ssam::sim::RegionScope scope;
    Arguments registered(names);
    (registered.add(args), ...);
    return Fn(args...);
  }
};

}  // namespace

TORCH_LIBRARY(ssam_cuda_sim, m) {
  for (const char* schema : ssam::kSchemas) m.def(schema);
}

TORCH_LIBRARY_IMPL(ssam_cuda_sim, CPU, m) {
#define SSAM_REGISTER(op) m.impl(#op, &Checked<#op, &ssam::cuda::op>::call);
  SSAM_CUDA_OPS(SSAM_REGISTER)
#undef SSAM_REGISTER
}

#if defined(SSAM_PYTHON_MODULE)
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace {

// _cuda_sim.configure(sms, blocks_per_sm, max_grid_blocks): the launch shape of later launches.
PyObject* configure(PyObject*, PyObject* args) {
  long long sms = 0, blocks_per_sm = 0, max_grid_blocks = 0;
  if (!PyArg_ParseTuple(args, "LLL", &sms, &blocks_per_sm, &max_grid_blocks)) return nullptr;
  if (sms < 1 || blocks_per_sm < 1 || max_grid_blocks < 1) {
    PyErr_SetString(PyExc_ValueError, "configure: expected sms, blocks_per_sm and max_grid_blocks >= 1");
    return nullptr;
  }
  ssam::sim::config() = {sms, blocks_per_sm, max_grid_blocks};
  Py_RETURN_NONE;
}

// _cuda_sim.configuration() -> (sms, blocks_per_sm, max_grid_blocks).
PyObject* configuration(PyObject*, PyObject*) {
  const ssam::sim::Config& c = ssam::sim::config();
  return Py_BuildValue("(LLL)", static_cast<long long>(c.sms), static_cast<long long>(c.blocks_per_sm),
                       static_cast<long long>(c.max_grid_blocks));
}

PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "Set the simulated SM count, blocks per SM and grid cap."},
    {"configuration", configuration, METH_NOARGS, "The simulated (SM count, blocks per SM, grid cap)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda_sim",
                          "cuda_sim: the CUDA kernels of ssam_kernels run on CPU tensors (torch.ops.ssam_cuda_sim).",
                          -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__cuda_sim() { return PyModule_Create(&module_def); }
#endif

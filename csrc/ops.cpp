// Schemas of the attack-step operators (declared once, here) and the backend-independent preparation.
// The Python wrapper (mtrobust_fast/ops/__init__.py) documents the semantics and checks arguments first.
#include <Python.h>

#include <algorithm>

#include "attack_step_glue.h"

namespace mtr {
namespace {

at::ScalarType opmath_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

Norm parse_norm(c10::string_view norm) {
  if (norm == "linf") return Norm::Linf;
  if (norm == "l2") return Norm::L2;
  TORCH_CHECK_VALUE(false, "norm must be 'linf' or 'l2', got '", std::string(norm), "'");
}

// A per-row vector (eps, alpha) or [B,T] matrix (weights) in the opmath dtype.
at::Tensor row_parameter(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  return t.to(opmath_type(x.scalar_type())).contiguous();
}

// Contiguous and channels_last tensors keep their layout (each row is then one dense block of N elements
// at offset b·N); anything else is computed in a contiguous copy. The fake implementation follows the same rule.
bool layout_kept(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ||
         t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
}

// t itself if it already has `strides`, else a copy laid out with them.
at::Tensor with_strides(const at::Tensor& t, at::IntArrayRef strides) {
  if (t.strides() == strides) return t;
  auto copy = at::empty_strided(t.sizes(), strides, t.options());
  copy.copy_(t);
  return copy;
}

}  // namespace

PreparedStep prepare(const at::Tensor& x, const at::Tensor& x0, const c10::optional<at::Tensor>& grads,
                     const c10::optional<at::Tensor>& weights, const at::Tensor& eps,
                     const c10::optional<at::Tensor>& alpha, c10::string_view norm,
                     bool normalize_task_grads, double lo, double hi, bool inplace,
                     const c10::optional<at::Tensor>& fingerprint) {
  PreparedStep p;
  p.norm = parse_norm(norm);
  p.normalize_task_grads = normalize_task_grads;
  p.lo = lo;
  p.hi = hi;
  TORCH_CHECK_VALUE(!(lo > hi) && lo == lo && hi == hi, "lo must be <= hi, got lo=", lo, ", hi=", hi);
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have a batch dimension");
  TORCH_CHECK_TYPE(x0.scalar_type() == x.scalar_type(), "x0 has dtype ", x0.scalar_type(), " but x has ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x0.device() == x.device(), "x0 is on ", x0.device(), " but x is on ", x.device());
  TORCH_CHECK_VALUE(x0.sizes() == x.sizes(), "x0 has shape ", x0.sizes(), " but x has ", x.sizes());
  p.B = x.size(0);
  p.N = p.B > 0 ? x.numel() / p.B : c10::multiply_integers(x.sizes().slice(1));
  const int64_t B = p.B;

  at::Tensor work = layout_kept(x) ? x : x.contiguous();
  p.x = work;
  p.x0 = with_strides(x0, work.strides());
  if (grads.has_value()) {
    const auto& g = *grads;
    TORCH_CHECK_TYPE(g.scalar_type() == x.scalar_type(), "grads has dtype ", g.scalar_type(), " but x has ",
                     x.scalar_type());
    TORCH_CHECK_VALUE(g.device() == x.device(), "grads is on ", g.device(), " but x is on ", x.device());
    TORCH_CHECK_VALUE(g.dim() == x.dim() + 1 && g.sizes().slice(1) == x.sizes(), "grads must have shape [T, ",
                      x.sizes(), "], got ", g.sizes());
    p.T = g.size(0);
    TORCH_CHECK_VALUE(p.T >= 1 && p.T <= kMaxTasks, "grads must hold between 1 and ", kMaxTasks,
                      " tasks, got T=", p.T);
    std::vector<int64_t> strides{B * p.N};
    strides.insert(strides.end(), work.strides().begin(), work.strides().end());
    p.grads = with_strides(g, strides);
    TORCH_CHECK_VALUE(alpha.has_value(), "alpha is required");
    p.alpha = row_parameter(*alpha, "alpha", {B}, x);
    if (weights.has_value()) p.weights = row_parameter(*weights, "weights", {B, p.T}, x);
  }
  p.eps = row_parameter(eps, "eps", {B}, x);
  if (fingerprint.has_value()) {
    const auto& f = *fingerprint;
    TORCH_CHECK_TYPE(f.scalar_type() == at::kLong, "fingerprint must be an int64 tensor, got ", f.scalar_type());
    TORCH_CHECK_VALUE(f.device() == x.device(), "fingerprint is on ", f.device(), " but x is on ", x.device());
    TORCH_CHECK_VALUE(f.sizes() == at::IntArrayRef({B, 2}) && f.is_contiguous(),
                      "fingerprint must be a contiguous [B, 2] tensor, got ", f.sizes());
    p.fingerprint = f;
  }
  p.out = inplace && work.is_same(x) ? work : at::empty_like(work);
  return p;
}

}  // namespace mtr

TORCH_LIBRARY(mtrobust_fast, m) {
  m.def("attack_step(Tensor x, Tensor x0, Tensor grads, Tensor? weights, Tensor eps, Tensor alpha, "
        "str norm, bool normalize_task_grads, float lo, float hi) -> Tensor");
  m.def("attack_step_(Tensor(a!) x, Tensor x0, Tensor grads, Tensor? weights, Tensor eps, Tensor alpha, "
        "str norm, bool normalize_task_grads, float lo, float hi, Tensor(b!)? fingerprint=None) -> ()");
  m.def("project(Tensor x, Tensor x0, Tensor eps, str norm, float lo, float hi) -> Tensor");
  m.def("project_(Tensor(a!) x, Tensor x0, Tensor eps, str norm, float lo, float hi) -> ()");
}

// `import mtrobust_fast._C` loads this library, which registers the operators above.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  // The Python wrapper reads the kernels' limit from here instead of keeping a copy of it.
  if (module != nullptr && PyModule_AddIntConstant(module, "MAX_TASKS", mtr::kMaxTasks) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

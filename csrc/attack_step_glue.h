// ATen-side preparation shared by the CPU and CUDA backends of the attack-step ops.
//
// prepare() checks the arguments (a backstop: the Python wrapper gives friendlier messages first),
// brings x0 and every task gradient into x's memory layout so the kernels can walk all of them with one
// flat index per row (contiguous or channels_last both work: rows only need to be dense blocks), and
// allocates the output. Each backend supplies one function `void run(PreparedStep&)`;
// MTR_REGISTER_BACKEND turns it into the four registered operators.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include "attack_step_math.h"

namespace mtr {

struct PreparedStep {
  at::Tensor x, x0, grads, out;      // grads undefined for a projection (T == 0)
  at::Tensor weights, eps, alpha;    // opmath dtype, contiguous; weights/alpha may be undefined
  at::Tensor fingerprint;            // int64 [B, 2] or undefined: each output row's fingerprint
  int64_t B = 0, N = 0, T = 0;
  Norm norm = Norm::Linf;
  bool normalize_task_grads = false;
  double lo = 0.0, hi = 1.0;
};

PreparedStep prepare(const at::Tensor& x, const at::Tensor& x0, const c10::optional<at::Tensor>& grads,
                     const c10::optional<at::Tensor>& weights, const at::Tensor& eps,
                     const c10::optional<at::Tensor>& alpha, c10::string_view norm,
                     bool normalize_task_grads, double lo, double hi, bool inplace,
                     const c10::optional<at::Tensor>& fingerprint = c10::nullopt);

// Fills p.out (and zeroes, then fills, the fingerprint) by running the backend unless there is nothing to compute.
template <void (*Run)(PreparedStep&)>
void run_if_needed(PreparedStep& p) {
  if (p.fingerprint.defined()) p.fingerprint.zero_();
  if (p.B > 0 && p.N > 0) Run(p);
}

template <void (*Run)(PreparedStep&)>
struct OpsFor {
  static at::Tensor attack_step(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                const c10::optional<at::Tensor>& weights, const at::Tensor& eps,
                                const at::Tensor& alpha, c10::string_view norm, bool normalize_task_grads,
                                double lo, double hi) {
    auto p = prepare(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi, false);
    run_if_needed<Run>(p);
    return p.out;
  }
  static void attack_step_(at::Tensor& x, const at::Tensor& x0, const at::Tensor& grads,
                                  const c10::optional<at::Tensor>& weights, const at::Tensor& eps,
                                  const at::Tensor& alpha, c10::string_view norm, bool normalize_task_grads,
                                  double lo, double hi, const c10::optional<at::Tensor>& fingerprint) {
    auto p = prepare(x, x0, grads, weights, eps, alpha, norm, normalize_task_grads, lo, hi, true, fingerprint);
    run_if_needed<Run>(p);
    if (!p.out.is_same(x)) x.copy_(p.out);
  }
  static at::Tensor project(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& eps,
                            c10::string_view norm, double lo, double hi) {
    auto p = prepare(x, x0, c10::nullopt, c10::nullopt, eps, c10::nullopt, norm, false, lo, hi, false);
    run_if_needed<Run>(p);
    return p.out;
  }
  static void project_(at::Tensor& x, const at::Tensor& x0, const at::Tensor& eps,
                              c10::string_view norm, double lo, double hi) {
    auto p = prepare(x, x0, c10::nullopt, c10::nullopt, eps, c10::nullopt, norm, false, lo, hi, true);
    run_if_needed<Run>(p);
    if (!p.out.is_same(x)) x.copy_(p.out);
  }
};

}  // namespace mtr

#define MTR_REGISTER_BACKEND(KEY, RUN)                                  \
  TORCH_LIBRARY_IMPL(mtrobust_fast, KEY, m) {                           \
    m.impl("attack_step", &mtr::OpsFor<RUN>::attack_step);              \
    m.impl("attack_step_", &mtr::OpsFor<RUN>::attack_step_);            \
    m.impl("project", &mtr::OpsFor<RUN>::project);                      \
    m.impl("project_", &mtr::OpsFor<RUN>::project_);                    \
  }

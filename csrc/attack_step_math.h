// The arithmetic of the fused attack step, shared by the CPU and CUDA kernels.
//
// Everything here is plain C++ usable from host and device code and includes no torch header, so the
// CUDA kernels that use it compile with a bare nvcc. A row is one sample: B rows of N elements each;
// per-task gradients are T blocks of B rows. The update of one element needs only per-row scalars
// (task coefficients, and for L2 the step scale s and projection factor k), which come from per-row
// reductions computed in double precision.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MTR_HD __host__ __device__ __forceinline__
#else
#define MTR_HD inline
#endif

namespace mtr {

// Guard of every norm division: max(‖v‖, kTiny). A zero gradient therefore gives a zero step.
constexpr double kTiny = 1e-12;

// Non-finite inputs (the same rules as the pure-PyTorch reference): L∞ works element by element, and a NaN in an
// element's x, x0, bounds or combined gradient gives NaN there (sign(NaN) is NaN, not 0: a NaN gradient must
// not become a silent "no move"); ±inf gradients are signs like any other. L2 couples a row through its norms:
// a non-finite value in a row's x, x0 or combined gradient makes the whole row NaN. No guard below turns a NaN
// into a finite value.
// max/min that keep a NaN first argument; ``bound`` is never NaN (a constant or a checked box bound). One
// negated comparison is false for a NaN v, so v is kept: the same results as (v > bound || v != v) ? v : bound,
// in a form GCC turns into vector blends (with the two-condition form it left the CPU L-inf loop scalar).
template <typename T>
MTR_HD T max_keep_nan(T v, T bound) {
  return !(v <= bound) ? v : bound;
}

template <typename T>
MTR_HD T min_keep_nan(T v, T bound) {
  return !(v >= bound) ? v : bound;
}
// Largest number of tasks a single call accepts (bounds the per-row coefficient buffers).
constexpr int kMaxTasks = 64;

enum class Norm : int { Linf = 0, L2 = 1 };

// The pointers and sizes of one call. acc_t is the "opmath" type: float for half/bfloat16/float, double
// for double. weights is [B,T] (nullptr = all ones); eps and alpha are [B]; alpha is unused when T == 0
// (projection only). out may alias x (in-place form): every element is read before it is written.
template <typename scalar_t, typename acc_t>
struct StepProblem {
  const scalar_t* x;
  const scalar_t* x0;
  const scalar_t* grads;  // [T, B, N]
  scalar_t* out;
  const acc_t* weights;
  const acc_t* eps;
  const acc_t* alpha;
  int64_t B, N, T;
  Norm norm;
  bool normalize_task_grads;
  acc_t lo, hi;
  uint64_t* fingerprint;  // [B, 2] zeroed, filled with each output row's fingerprint; nullptr: not computed
};

// sign() that keeps NaN (a NaN gradient must not silently become "no move") and maps ±0 to ±0.
template <typename acc_t>
MTR_HD acc_t sign_of(acc_t g) {
  return g > acc_t(0) ? acc_t(1) : (g < acc_t(0) ? acc_t(-1) : g);
}

// torch.clamp semantics: a NaN value or bound gives NaN, and when lower > upper the upper bound wins.
template <typename acc_t>
MTR_HD acc_t clamp_between(acc_t v, acc_t lower, acc_t upper) {
  v = (v < lower || lower != lower) ? lower : v;
  return (v > upper || upper != upper) ? upper : v;
}

// Coefficient of task t in row b: w[b,t], divided by the task gradient's row norm when normalising.
template <typename acc_t>
MTR_HD acc_t task_coefficient(const acc_t* weights, int64_t b, int64_t t, int64_t T, bool normalize,
                              double task_sumsq) {
  const acc_t w = weights ? weights[b * T + t] : acc_t(1);
  if (!normalize) return w;
  return w / static_cast<acc_t>(max_keep_nan(sqrt(task_sumsq), kTiny));
}

// Linf update of one element: x + α·sign(g), clamped to [max(x0−ε, lo), min(x0+ε, hi)].
template <typename acc_t>
MTR_HD acc_t linf_update(acc_t x, acc_t x0, acc_t g, acc_t alpha, acc_t eps, acc_t lo, acc_t hi) {
  return clamp_between(x + alpha * sign_of(g), max_keep_nan(x0 - eps, lo), min_keep_nan(x0 + eps, hi));
}

// Per-row L2 scalars from the row sums gg = Σg², dg = Σ(x−x0)·g, dd = Σ(x−x0)²:
// step scale s = α / max(‖g‖, tiny), and the projection factor k = min(1, ε / max(‖δ‖, tiny)) of
// δ = x + s·g − x0, whose squared norm is dd + 2·s·dg + s²·gg (no second pass over memory needed).
struct L2RowScalars {
  double s, k;
};

MTR_HD bool finite(double v) { return v - v == 0.0; }  // false for ±inf and NaN

MTR_HD L2RowScalars l2_row_scalars(double gg, double dg, double dd, double alpha, double eps) {
  if (!finite(gg) || !finite(dg) || !finite(dd)) return {nan(""), nan("")};
  const double s = alpha / max_keep_nan(sqrt(gg), kTiny);
  const double dnorm = sqrt(max_keep_nan(dd + 2.0 * s * dg + s * s * gg, 0.0));
  return {s, min_keep_nan(eps / max_keep_nan(dnorm, kTiny), 1.0)};
}

// L2 update of one element, in the reference's order: y = x + s·g; δ = y − x0; x0 + k·δ, clamped.
template <typename acc_t>
MTR_HD acc_t l2_update(acc_t x, acc_t x0, acc_t g, acc_t s, acc_t k, acc_t lo, acc_t hi) {
  const acc_t y = x + s * g;
  const acc_t delta = y - x0;
  return clamp_between(x0 + delta * k, lo, hi);
}

// Fingerprint of a row of the op's output, for attacks that stop a row once its iterate repeats: two 64-bit
// sums, each adding one mixed word per element computed from the element's position and the bit pattern it is
// stored with. Wrapping addition is commutative, so the result does not depend on how a kernel splits the row
// over threads or blocks (CPU and CUDA give the same value); rows with the same stored values always get the
// same fingerprint, and two different rows the same one with probability about 2^-128.
MTR_HD uint64_t mix64(uint64_t z) {  // the splitmix64 finaliser: a bijection of 64-bit words
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <typename T>
MTR_HD uint64_t stored_bits(const T& v) {
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));  // float16/bfloat16/float32/float64: the low 2, 4 or 8 bytes
  return bits;
}

MTR_HD void fingerprint_add(uint64_t (&h)[2], int64_t i, uint64_t bits) {
  const uint64_t position = mix64(static_cast<uint64_t>(i) + 0x9e3779b97f4a7c15ull);
  h[0] += mix64(position ^ bits);
  h[1] += mix64(mix64(position + 0x632be59bd9b4e019ull) + bits);
}

}  // namespace mtr

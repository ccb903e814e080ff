// CUDA kernels of the attack-step operators (no torch headers; see attack_step_kernel.h).
//
// Each row of N elements is cut into fixed chunks of kThreads·kItems·V elements (V = elements per 16-byte
// vector when rows and pointers allow it, else 1); one block handles one chunk of one row. Per-row sums
// are written per chunk and added in a fixed order by the next kernel's prologue: no host synchronisation,
// deterministic results. The only atomics add a block's part of a row's fingerprint (wrapping integer sums,
// the same whatever the order). Kernels per call:
//   linf:               update                                   (one pass over memory)
//   linf, normalised:   task_sumsq → update
//   l2:                 l2_sums → update
//   l2, normalised:     task_sumsq → l2_sums → update
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attack_step_kernel.h"

namespace mtr {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;

template <typename T>
struct Opmath {
  using type = float;
};
template <>
struct Opmath<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Opmath<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}

// Sums `count` doubles per thread over the block; thread 0 gets the totals.
template <int K>
__device__ __forceinline__ void block_sum(double (&v)[K]) {
  __shared__ double warp_sums[kThreads / 32][K];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < K; ++k)
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) warp_sums[warp][k] = v[k];
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double total = 0.0;
      for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w][k];
      v[k] = total;
    }
  }
}

// Wrapping sums of each thread's two fingerprint words over the block, added to the row's (one atomic each).
__device__ __forceinline__ void add_block_fingerprint(uint64_t (&h)[2], uint64_t* row) {
  __shared__ unsigned long long warp_sums[kThreads / 32][2];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned long long v[2] = {h[0], h[1]};
#pragma unroll
  for (int k = 0; k < 2; ++k)
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
  if (lane == 0) {
    warp_sums[warp][0] = v[0];
    warp_sums[warp][1] = v[1];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total[2] = {0, 0};
    for (int w = 0; w < kThreads / 32; ++w) {
      total[0] += warp_sums[w][0];
      total[1] += warp_sums[w][1];
    }
    atomicAdd(reinterpret_cast<unsigned long long*>(row), total[0]);
    atomicAdd(reinterpret_cast<unsigned long long*>(row) + 1, total[1]);
  }
}

struct Geometry {
  int64_t chunk;    // elements per chunk
  int64_t nchunks;  // chunks per row
};

template <typename scalar_t, int V>
Geometry geometry(int64_t N) {
  const int64_t chunk = int64_t(kThreads) * kItems * V;
  return {chunk, (N + chunk - 1) / chunk};
}

// Per-chunk Σ g² of each (task, row) of grads viewed as [T·B, N].
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads)
    task_sumsq_kernel(const scalar_t* grads, int64_t N, Geometry geo, double* partial) {
  const int64_t r = blockIdx.x / geo.nchunks, c = blockIdx.x % geo.nchunks;
  const scalar_t* row = grads + r * N;
  const int64_t end = min(N, (c + 1) * geo.chunk);
  double acc[1] = {0.0};
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int64_t i = c * geo.chunk + (int64_t(item) * kThreads + threadIdx.x) * V;
    if (i < end) {
      const Vec<scalar_t, V> g = load<scalar_t, V>(row + i);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const double v = to_acc(g.v[j]);
        acc[0] += v * v;
      }
    }
  }
  block_sum<1>(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc[0];
}

// Block prologue: the task coefficients of row b into shared memory.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_coefficients(const StepProblem<scalar_t, acc_t>& p, int64_t b,
                                                 int64_t nchunks, const double* task_partial, acc_t* coef) {
  for (int64_t t = threadIdx.x; t < p.T; t += kThreads) {
    double sumsq = 0.0;
    if (p.normalize_task_grads)
      for (int64_t c = 0; c < nchunks; ++c) sumsq += task_partial[(t * p.B + b) * nchunks + c];
    coef[t] = task_coefficient(p.weights, b, t, p.T, p.normalize_task_grads, sumsq);
  }
  __syncthreads();
}

// g[j] = Σ_t coef[t]·grads[t, b, i + j] for the V elements starting at i.
template <typename scalar_t, typename acc_t, int V>
__device__ __forceinline__ void combine(const StepProblem<scalar_t, acc_t>& p, int64_t b, int64_t i,
                                        const acc_t* coef, acc_t (&g)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) g[j] = acc_t(0);
  for (int64_t t = 0; t < p.T; ++t) {
    const Vec<scalar_t, V> gt = load<scalar_t, V>(p.grads + (t * p.B + b) * p.N + i);
    const acc_t ct = coef[t];
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] += ct * to_acc(gt.v[j]);
  }
}

// Calls fn(i, g, x, x0) for each V-element vector this thread owns in chunk c of row b (g: combined gradient).
template <typename scalar_t, typename acc_t, int V, typename Fn>
__device__ __forceinline__ void for_vectors(const StepProblem<scalar_t, acc_t>& p, const Geometry& geo, int64_t b,
                                            int64_t c, const acc_t* coef, const Fn& fn) {
  const int64_t end = min(p.N, (c + 1) * geo.chunk);
#pragma unroll
  for (int item = 0; item < kItems; ++item) {
    const int64_t i = c * geo.chunk + (int64_t(item) * kThreads + threadIdx.x) * V;
    if (i < end) {
      acc_t g[V];
      combine<scalar_t, acc_t, V>(p, b, i, coef, g);
      fn(i, g, load<scalar_t, V>(p.x + b * p.N + i), load<scalar_t, V>(p.x0 + b * p.N + i));
    }
  }
}

// Per-chunk (Σ g², Σ (x−x0)·g, Σ (x−x0)²) of each row, for the L2 step.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    l2_sums_kernel(StepProblem<scalar_t, acc_t> p, Geometry geo, const double* task_partial, double* partial) {
  __shared__ acc_t coef[kMaxTasks];
  const int64_t b = blockIdx.x / geo.nchunks, c = blockIdx.x % geo.nchunks;
  row_coefficients(p, b, geo.nchunks, task_partial, coef);
  double acc[3] = {0.0, 0.0, 0.0};
  for_vectors<scalar_t, acc_t, V>(p, geo, b, c, coef,
                                  [&](int64_t, const acc_t(&g)[V], const Vec<scalar_t, V>& x, const Vec<scalar_t, V>& x0) {
#pragma unroll
                                    for (int j = 0; j < V; ++j) {
                                      const double gj = g[j];
                                      const double d = double(to_acc(x.v[j])) - double(to_acc(x0.v[j]));
                                      acc[0] += gj * gj;
                                      acc[1] += d * gj;
                                      acc[2] += d * d;
                                    }
                                  });
  block_sum<3>(acc);
  if (threadIdx.x == 0)
    for (int k = 0; k < 3; ++k) partial[blockIdx.x * 3 + k] = acc[k];
}

// The elementwise update (and, for L2, the per-row scalars from the partial sums).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kThreads)
    update_kernel(StepProblem<scalar_t, acc_t> p, Geometry geo, const double* task_partial,
                  const double* l2_partial) {
  __shared__ acc_t coef[kMaxTasks];
  __shared__ acc_t row_s, row_k;
  const int64_t b = blockIdx.x / geo.nchunks, c = blockIdx.x % geo.nchunks;
  const acc_t eps = p.eps[b];
  const acc_t alpha = p.alpha ? p.alpha[b] : acc_t(0);
  if (p.norm == Norm::L2 && threadIdx.x == 0) {
    double gg = 0.0, dg = 0.0, dd = 0.0;
    for (int64_t k = 0; k < geo.nchunks; ++k) {
      const double* s = l2_partial + (b * geo.nchunks + k) * 3;
      gg += s[0];
      dg += s[1];
      dd += s[2];
    }
    const L2RowScalars r = l2_row_scalars(gg, dg, dd, alpha, eps);
    row_s = static_cast<acc_t>(r.s);
    row_k = static_cast<acc_t>(r.k);
  }
  row_coefficients(p, b, geo.nchunks, task_partial, coef);  // ends with __syncthreads()
  const acc_t s = p.norm == Norm::L2 ? row_s : acc_t(0), k = p.norm == Norm::L2 ? row_k : acc_t(0);
  uint64_t h[2] = {0, 0};
  for_vectors<scalar_t, acc_t, V>(
      p, geo, b, c, coef, [&](int64_t i, const acc_t(&g)[V], const Vec<scalar_t, V>& x, const Vec<scalar_t, V>& x0) {
        Vec<scalar_t, V> out;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t xj = to_acc(x.v[j]), x0j = to_acc(x0.v[j]);
          const acc_t r = p.norm == Norm::Linf ? linf_update(xj, x0j, g[j], alpha, eps, p.lo, p.hi)
                                               : l2_update(xj, x0j, g[j], s, k, p.lo, p.hi);
          out.v[j] = from_acc<scalar_t>(r);
          if (p.fingerprint) fingerprint_add(h, i + j, stored_bits(out.v[j]));
        }
        *reinterpret_cast<Vec<scalar_t, V>*>(p.out + b * p.N + i) = out;
      });
  if (p.fingerprint) add_block_fingerprint(h, p.fingerprint + b * 2);  // the branch is uniform over the block
}

template <typename scalar_t>
StepProblem<scalar_t, typename Opmath<scalar_t>::type> problem(const Launch& l) {
  using acc_t = typename Opmath<scalar_t>::type;
  return {static_cast<const scalar_t*>(l.x),       static_cast<const scalar_t*>(l.x0),
          static_cast<const scalar_t*>(l.grads),   static_cast<scalar_t*>(l.out),
          static_cast<const acc_t*>(l.weights),    static_cast<const acc_t*>(l.eps),
          static_cast<const acc_t*>(l.alpha),      l.B,
          l.N,                                     l.T,
          l.norm,                                  l.normalize_task_grads,
          static_cast<acc_t>(l.lo),                static_cast<acc_t>(l.hi),
          l.fingerprint};
}

template <typename scalar_t, int V>
struct Plan {
  Geometry geo;
  size_t task_doubles, l2_doubles;
  explicit Plan(const Launch& l) : geo(geometry<scalar_t, V>(l.N)) {
    task_doubles = l.normalize_task_grads ? size_t(l.T * l.B * geo.nchunks) : 0;
    l2_doubles = l.norm == Norm::L2 ? size_t(l.B * geo.nchunks * 3) : 0;
  }
  size_t bytes() const { return (task_doubles + l2_doubles) * sizeof(double); }
};

template <typename scalar_t, int V>
cudaError_t run(const Launch& l, void* workspace, cudaStream_t stream) {
  using acc_t = typename Opmath<scalar_t>::type;
  const auto p = problem<scalar_t>(l);
  const Plan<scalar_t, V> plan(l);
  double* task_partial = static_cast<double*>(workspace);
  double* l2_partial = task_partial ? task_partial + plan.task_doubles : nullptr;
  if (plan.task_doubles)
    task_sumsq_kernel<scalar_t, V><<<unsigned(l.T * l.B * plan.geo.nchunks), kThreads, 0, stream>>>(
        p.grads, l.N, plan.geo, task_partial);
  if (plan.l2_doubles)
    l2_sums_kernel<scalar_t, acc_t, V><<<unsigned(l.B * plan.geo.nchunks), kThreads, 0, stream>>>(
        p, plan.geo, task_partial, l2_partial);
  update_kernel<scalar_t, acc_t, V><<<unsigned(l.B * plan.geo.nchunks), kThreads, 0, stream>>>(
      p, plan.geo, task_partial, l2_partial);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Calls fn.template call<scalar_t, V>() with V = 16-byte vectors when every row start is aligned.
template <typename scalar_t, typename Fn>
auto with_vector_width(const Launch& l, const Fn& fn) {
  constexpr int V = 16 / sizeof(scalar_t);
  const bool vec = l.N % V == 0 && aligned16(l.x) && aligned16(l.x0) && aligned16(l.out) &&
                   (l.grads == nullptr || aligned16(l.grads));
  return vec ? fn.template call<scalar_t, V>() : fn.template call<scalar_t, 1>();
}

template <typename Fn>
auto with_dtype(const Launch& l, DType dtype, const Fn& fn) {
  switch (dtype) {
    case DType::Float64:
      return with_vector_width<double>(l, fn);
    case DType::Float16:
      return with_vector_width<__half>(l, fn);
    case DType::BFloat16:
      return with_vector_width<__nv_bfloat16>(l, fn);
    case DType::Float32:
    default:
      return with_vector_width<float>(l, fn);
  }
}

struct WorkspaceBytes {
  const Launch& l;
  template <typename scalar_t, int V>
  size_t call() const { return Plan<scalar_t, V>(l).bytes(); }
};

struct Run {
  const Launch& l;
  void* workspace;
  cudaStream_t stream;
  template <typename scalar_t, int V>
  cudaError_t call() const { return run<scalar_t, V>(l, workspace, stream); }
};

}  // namespace

size_t workspace_bytes(const Launch& launch, DType dtype) {
  return with_dtype(launch, dtype, WorkspaceBytes{launch});
}

cudaError_t launch_attack_step(const Launch& launch, DType dtype, void* workspace, cudaStream_t stream) {
  if (launch.B == 0 || launch.N == 0) return cudaSuccess;
  return with_dtype(launch, dtype, Run{launch, workspace, stream});
}

}  // namespace cuda
}  // namespace mtr

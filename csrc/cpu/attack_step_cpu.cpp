// CPU backend of the attack-step operators.
//
// Work is split into fixed chunks of kChunk elements per row, so per-row sums are always added in the same
// order whatever the thread count (deterministic results). When there are at least as many rows as threads,
// each thread takes whole rows and runs all passes of a row back to back, while that row is still in cache;
// with fewer rows the chunks of each row are spread over the threads instead. Within a chunk, tiles of
// kTile elements are combined into a small buffer with simple loops the compiler vectorises.
// Passes over memory: linf 1; linf with normalised task gradients 2 (the first reads only the gradients);
// l2 2; l2 normalised 3. For L2 the pass that sums the row also keeps the combined gradient in a row
// buffer, so the final pass reads one gradient instead of T, starting from the end of the row (in cache), and
// streams a fresh float32 output past the cache. With a fingerprint, the final pass also adds each output
// element into its row's fingerprint (per chunk, then the chunks' sums: the same value whatever the threading).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "attack_step_glue.h"

namespace mtr {
namespace {

constexpr int64_t kChunk = 16384;
constexpr int64_t kTile = 512;
// Row sums go to kLanes fixed lanes (element i to lane i % kLanes), added in lane order at the end: the
// compiler can then vectorise and pipeline them without reassociating, and results stay independent of
// threading.
constexpr int kLanes = 4;

// Calls fn(i, i % kLanes) for i in [begin, end), the lane index a compile-time constant in the main loop so
// the lane accumulators stay in registers.
template <typename Fn>
inline void for_lanes(int64_t begin, int64_t end, const Fn& fn) {
  int64_t i = begin;
  for (; i < end && i % kLanes != 0; ++i) fn(i, static_cast<int>(i % kLanes));
  for (; i + kLanes <= end; i += kLanes) {
#pragma GCC unroll 4
    for (int lane = 0; lane < kLanes; ++lane) fn(i + lane, lane);
  }
  for (; i < end; ++i) fn(i, static_cast<int>(i % kLanes));
}

inline double lane_total(const double (&lanes)[kLanes]) {
  double total = 0.0;
  for (int lane = 0; lane < kLanes; ++lane) total += lanes[lane];
  return total;
}

template <typename scalar_t, typename acc_t>
class CpuStep {
 public:
  explicit CpuStep(const StepProblem<scalar_t, acc_t>& p) : p_(p), chunks_((p.N + kChunk - 1) / kChunk) {}

  void run() {
    const int threads = at::get_num_threads();
    // L2 keeps each row's combined gradient in a row buffer between its last two passes.
    const int64_t buffer = p_.norm == Norm::L2 ? p_.N : 0;
    if (p_.B >= threads || chunks_ == 1) {
      at::parallel_for(0, p_.B, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> g_row(buffer);
        for (int64_t b = begin; b < end; ++b) run_row(b, false, g_row.data());
      });
    } else {
      std::vector<acc_t> g_row(buffer);
      for (int64_t b = 0; b < p_.B; ++b) run_row(b, true, g_row.data());
    }
  }

 private:
  const StepProblem<scalar_t, acc_t>& p_;
  const int64_t chunks_;

  // Calls fn(chunk) for every chunk of a row, spread over threads when `parallel`. Serially, `backwards`
  // starts with the chunks the previous pass touched last, which are still in cache.
  template <typename Fn>
  void for_chunks(bool parallel, const Fn& fn, bool backwards = false) const {
    if (parallel) {
      at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) fn(c);
      });
    } else if (backwards) {
      for (int64_t c = chunks_ - 1; c >= 0; --c) fn(c);
    } else {
      for (int64_t c = 0; c < chunks_; ++c) fn(c);
    }
  }

  const scalar_t* task_row(int64_t t, int64_t b) const { return p_.grads + (t * p_.B + b) * p_.N; }

  void run_row(int64_t b, bool parallel, acc_t* g_row) const {
    const int64_t T = p_.T;
    std::vector<double> task_sumsq(T, 0.0);
    if (p_.normalize_task_grads) {
      std::vector<double> partial(chunks_ * T, 0.0);
      for_chunks(parallel, [&](int64_t c) {
        // Tile by tile, all tasks in turn: T streams in flight (more memory parallelism than one task's
        // chunk after another), each lane still adding its elements in increasing order.
        const int64_t begin = c * kChunk, end = std::min(p_.N, begin + kChunk);
        double lanes[kMaxTasks][kLanes] = {};
        for (int64_t tile = begin; tile < end; tile += kTile) {
          const int64_t tile_end = std::min(end, tile + kTile);
          for (int64_t t = 0; t < T; ++t) {
            const scalar_t* g = task_row(t, b);
            double acc[kLanes];
            for (int lane = 0; lane < kLanes; ++lane) acc[lane] = lanes[t][lane];
            for_lanes(tile, tile_end, [&](int64_t i, int lane) {
              const double v = static_cast<double>(static_cast<acc_t>(g[i]));
              acc[lane] += v * v;
            });
            for (int lane = 0; lane < kLanes; ++lane) lanes[t][lane] = acc[lane];
          }
        }
        for (int64_t t = 0; t < T; ++t) partial[c * T + t] = lane_total(lanes[t]);
      });
      for (int64_t c = 0; c < chunks_; ++c)
        for (int64_t t = 0; t < T; ++t) task_sumsq[t] += partial[c * T + t];
    }
    std::vector<acc_t> coef(T);
    for (int64_t t = 0; t < T; ++t)
      coef[t] = task_coefficient(p_.weights, b, t, T, p_.normalize_task_grads, task_sumsq[t]);

    const acc_t eps = p_.eps[b];
    const acc_t alpha = p_.alpha ? p_.alpha[b] : acc_t(0);
    std::vector<uint64_t> fingerprints(p_.fingerprint ? chunks_ * 2 : 0, 0);
    if (p_.norm == Norm::Linf) {
      for_chunks(parallel, [&](int64_t c) {
        if (p_.fingerprint)
          write_linf<true>(b, c, coef.data(), alpha, eps, &fingerprints[c * 2]);
        else
          write_linf<false>(b, c, coef.data(), alpha, eps, nullptr);
      });
      add_fingerprint(b, fingerprints);
      return;
    }
    std::vector<double> partial(chunks_ * 3, 0.0);
    for_chunks(parallel, [&](int64_t c) { l2_sums(b, c, coef.data(), g_row, &partial[c * 3]); });
    double gg = 0.0, dg = 0.0, dd = 0.0;
    for (int64_t c = 0; c < chunks_; ++c) {
      gg += partial[c * 3];
      dg += partial[c * 3 + 1];
      dd += partial[c * 3 + 2];
    }
    const L2RowScalars r = l2_row_scalars(gg, dg, dd, alpha, eps);
    for_chunks(
        parallel,
        [&](int64_t c) {
          write_l2(b, c, g_row, static_cast<acc_t>(r.s), static_cast<acc_t>(r.k),
                   p_.fingerprint ? &fingerprints[c * 2] : nullptr);
        },
        true);
    add_fingerprint(b, fingerprints);
  }

  // Row b's fingerprint: the wrapping sum of its chunks' (commutative, so independent of the chunk order).
  void add_fingerprint(int64_t b, const std::vector<uint64_t>& chunks) const {
    if (!p_.fingerprint) return;
    uint64_t h[2] = {0, 0};
    for (int64_t c = 0; c < chunks_; ++c) {
      h[0] += chunks[c * 2];
      h[1] += chunks[c * 2 + 1];
    }
    p_.fingerprint[b * 2] = h[0];
    p_.fingerprint[b * 2 + 1] = h[1];
  }

  // g[i] = Σ_t coef[t]·grads[t, b, begin + i] for one tile.
  void combine_tile(int64_t b, int64_t begin, int64_t len, const acc_t* coef, acc_t* g) const {
    if (p_.T == 0) {
      for (int64_t i = 0; i < len; ++i) g[i] = acc_t(0);
      return;
    }
    const scalar_t* g0 = task_row(0, b) + begin;
    const acc_t c0 = coef[0];
    for (int64_t i = 0; i < len; ++i) g[i] = c0 * static_cast<acc_t>(g0[i]);
    for (int64_t t = 1; t < p_.T; ++t) {
      const scalar_t* gt = task_row(t, b) + begin;
      const acc_t ct = coef[t];
      for (int64_t i = 0; i < len; ++i) g[i] += ct * static_cast<acc_t>(gt[i]);
    }
  }

  // Calls fn(x, x0, g, out, len) on each tile of chunk c of row b, g holding the tile's combined gradient
  // (kept in g_row, the row's buffer, when one is given).
  template <typename Fn>
  void for_tiles(int64_t b, int64_t c, const acc_t* coef, acc_t* g_row, const Fn& fn) const {
    const int64_t row = b * p_.N, end = std::min(p_.N, (c + 1) * kChunk);
    acc_t tile[kTile];
    for (int64_t begin = c * kChunk; begin < end; begin += kTile) {
      const int64_t len = std::min(kTile, end - begin);
      acc_t* g = g_row ? g_row + begin : tile;
      combine_tile(b, begin, len, coef, g);
      fn(p_.x + row + begin, p_.x0 + row + begin, g, p_.out + row + begin, len);
    }
  }

  template <bool kFingerprint>
  void write_linf(int64_t b, int64_t c, const acc_t* coef, acc_t alpha, acc_t eps, uint64_t* fingerprint) const {
    const acc_t lo = p_.lo, hi = p_.hi;
    uint64_t h[2] = {0, 0};
    const scalar_t* row_out = p_.out + b * p_.N;
    for_tiles(b, c, coef, nullptr, [&](const scalar_t* x, const scalar_t* x0, const acc_t* g, scalar_t* out,
                                       int64_t len) {
      for (int64_t i = 0; i < len; ++i) {
        out[i] = static_cast<scalar_t>(linf_update(static_cast<acc_t>(x[i]), static_cast<acc_t>(x0[i]), g[i],
                                                   alpha, eps, lo, hi));
      }
      if constexpr (kFingerprint) {
        const int64_t first = out - row_out;
        for (int64_t i = 0; i < len; ++i) fingerprint_add(h, first + i, stored_bits(out[i]));
      }
    });
    if constexpr (kFingerprint) {
      fingerprint[0] = h[0];
      fingerprint[1] = h[1];
    }
  }

  void l2_sums(int64_t b, int64_t c, const acc_t* coef, acc_t* g_row, double* sums) const {
    double gg[kLanes] = {}, dg[kLanes] = {}, dd[kLanes] = {};
    for_tiles(b, c, coef, g_row, [&](const scalar_t* x, const scalar_t* x0, const acc_t* g, scalar_t*, int64_t len) {
      for_lanes(0, len, [&](int64_t i, int lane) {
        const double gi = static_cast<double>(g[i]);
        const double d =
            static_cast<double>(static_cast<acc_t>(x[i])) - static_cast<double>(static_cast<acc_t>(x0[i]));
        gg[lane] += gi * gi;
        dg[lane] += d * gi;
        dd[lane] += d * d;
      });
    });
    sums[0] = lane_total(gg);
    sums[1] = lane_total(dg);
    sums[2] = lane_total(dd);
  }

  // The final L2 pass: reads the combined gradient back from the row buffer instead of re-combining tasks.
  // Results go through a tile buffer to store_tile, which streams float32 tiles past the cache.
  void write_l2(int64_t b, int64_t c, const acc_t* g_row, acc_t s, acc_t k, uint64_t* fingerprint) const {
    const int64_t row = b * p_.N, end = std::min(p_.N, (c + 1) * kChunk);
    const scalar_t* x = p_.x + row;
    const scalar_t* x0 = p_.x0 + row;
    const acc_t lo = p_.lo, hi = p_.hi;
    scalar_t tile[kTile];
    for (int64_t begin = c * kChunk; begin < end; begin += kTile) {
      const int64_t len = std::min(kTile, end - begin);
      for (int64_t i = 0; i < len; ++i) {
        const int64_t j = begin + i;
        tile[i] = static_cast<scalar_t>(
            l2_update(static_cast<acc_t>(x[j]), static_cast<acc_t>(x0[j]), g_row[j], s, k, lo, hi));
      }
      if (fingerprint) {
        uint64_t h[2] = {0, 0};
        for (int64_t i = 0; i < len; ++i) fingerprint_add(h, begin + i, stored_bits(tile[i]));
        fingerprint[0] += h[0];
        fingerprint[1] += h[1];
      }
      store_tile(tile, p_.out + row + begin, len);
    }
#if defined(__SSE2__)
    _mm_sfence();  // this thread's streaming stores are ordered before anything that follows
#endif
  }

  // Copies a finished tile to the output. For a fresh float32 output on x86 the aligned part uses
  // non-temporal stores: the output is not read again here, and plain stores would first read every line
  // in (read-for-ownership). Values are identical either way. In place, x's lines are already cached.
  void store_tile(const scalar_t* tile, scalar_t* out, int64_t len) const {
#if defined(__SSE2__)
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (p_.out != p_.x) {
        int64_t i = 0;
        for (; i < len && reinterpret_cast<uintptr_t>(out + i) % 16 != 0; ++i) out[i] = tile[i];
        for (; i + 4 <= len; i += 4) _mm_stream_ps(out + i, _mm_loadu_ps(tile + i));
        for (; i < len; ++i) out[i] = tile[i];
        return;
      }
    }
#endif
    std::copy(tile, tile + len, out);
  }
};

void run_cpu(PreparedStep& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "mtrobust_fast_attack_step_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    StepProblem<scalar_t, acc_t> prob{
        p.x.const_data_ptr<scalar_t>(),
        p.x0.const_data_ptr<scalar_t>(),
        p.grads.defined() ? p.grads.const_data_ptr<scalar_t>() : nullptr,
        p.out.mutable_data_ptr<scalar_t>(),
        p.weights.defined() ? p.weights.const_data_ptr<acc_t>() : nullptr,
        p.eps.const_data_ptr<acc_t>(),
        p.alpha.defined() ? p.alpha.const_data_ptr<acc_t>() : nullptr,
        p.B, p.N, p.T, p.norm, p.normalize_task_grads, static_cast<acc_t>(p.lo), static_cast<acc_t>(p.hi),
        p.fingerprint.defined() ? reinterpret_cast<uint64_t*>(p.fingerprint.mutable_data_ptr<int64_t>()) : nullptr};
    CpuStep<scalar_t, acc_t>(prob).run();
  });
}

}  // namespace
}  // namespace mtr

MTR_REGISTER_BACKEND(CPU, mtr::run_cpu)

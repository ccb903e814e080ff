// Launcher of the CUDA attack-step kernels. Raw pointers and a cudaStream_t only, no torch header, so the
// kernels compile with a bare nvcc (CI does this for sm_80 and sm_90 on a machine without torch CUDA).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "attack_step_math.h"

namespace mtr {
namespace cuda {

enum class DType : int { Float32, Float64, Float16, BFloat16 };

// One call. weights/eps/alpha are in the opmath dtype: double for Float64, float otherwise.
// grads == nullptr with T == 0 is a projection; weights == nullptr means all ones.
struct Launch {
  const void* x;
  const void* x0;
  const void* grads;
  void* out;
  const void* weights;
  const void* eps;
  const void* alpha;
  int64_t B, N, T;
  Norm norm;
  bool normalize_task_grads;
  double lo, hi;
  uint64_t* fingerprint;  // [B, 2], zeroed by the caller; nullptr: not computed
};

// Bytes of device scratch memory the launch needs (per-chunk partial sums); may be 0.
size_t workspace_bytes(const Launch& launch, DType dtype);

// Enqueues the kernels on `stream`; never synchronises. Returns the launch status.
cudaError_t launch_attack_step(const Launch& launch, DType dtype, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace mtr

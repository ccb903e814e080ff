// CUDA backend of the attack-step operators: ATen glue around the torch-free kernels. Built only when the
// installed torch has CUDA. Scratch memory comes from the caching allocator and the kernels run on the
// current stream, so a call never synchronises and can be captured in a CUDA graph.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "attack_step_glue.h"
#include "cuda/attack_step_kernel.h"

namespace mtr {
namespace {

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::Float32;
    case at::kDouble:
      return cuda::DType::Float64;
    case at::kHalf:
      return cuda::DType::Float16;
    case at::kBFloat16:
      return cuda::DType::BFloat16;
    default:
      TORCH_CHECK_TYPE(false, "mtrobust_fast CUDA kernels support float16, bfloat16, float32 and float64, got ", t);
  }
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

void run_cuda(PreparedStep& p) {
  const c10::cuda::CUDAGuard guard(p.x.device());
  const cuda::Launch launch{p.x.const_data_ptr(),  p.x0.const_data_ptr(), data_or_null(p.grads),
                            p.out.mutable_data_ptr(), data_or_null(p.weights), p.eps.const_data_ptr(),
                            data_or_null(p.alpha),  p.B, p.N, p.T, p.norm, p.normalize_task_grads, p.lo, p.hi,
                            p.fingerprint.defined()
                                ? reinterpret_cast<uint64_t*>(p.fingerprint.mutable_data_ptr<int64_t>())
                                : nullptr};
  const cuda::DType dtype = kernel_dtype(p.x.scalar_type());
  const size_t bytes = cuda::workspace_bytes(launch, dtype);
  at::Tensor workspace;
  if (bytes > 0) workspace = at::empty({static_cast<int64_t>(bytes)}, p.x.options().dtype(at::kByte));
  const cudaError_t err = cuda::launch_attack_step(launch, dtype, bytes > 0 ? workspace.mutable_data_ptr() : nullptr,
                                                   at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "mtrobust_fast attack_step kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace mtr

MTR_REGISTER_BACKEND(CUDA, mtr::run_cuda)

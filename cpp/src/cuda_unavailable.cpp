// Stand-ins for src/cuda_loop.cu when CMake found no CUDA compiler: the module still imports, and
// the CUDA entry points raise UnavailableError.
#include "javisrt/sampler.h"

namespace javisrt {

namespace {
constexpr const char* kNoCuda =
    "javisrt._sampler was built without CUDA (no nvcc at build time); rebuild with nvcc on PATH";
}

bool cuda_compiled() { return false; }

int cuda_device_count() { throw UnavailableError(kNoCuda); }

LoopResult run_cuda_loop(const SamplerConfig&, const CudaLoopArgs&, const LoopHooks&) {
  throw UnavailableError(kNoCuda);
}

}  // namespace javisrt

// CUDA sampling loop: CFG + solver update kernels on device buffers, the denoiser replayed from a
// captured CUDA graph or enqueued by a callback, all on one stream.
//
//   for step i:                          (host, no sync inside a step)
//     [throttle] wait on the event of step i - max_inflight, report its progress
//     [cancel?]  stop enqueueing
//     fill timesteps[0:2B] = t_i         (kernel)
//     denoiser: cudaGraphLaunch(graph)   or enqueue(i, stream)
//     per modality: CFG + Euler/UniPC update, x written to both CFG halves (kernel)
//     record event i
//
// The kernels use __fmul_rn/__fadd_rn/__fsub_rn/__fdiv_rn so nvcc cannot contract a*b+c into an FMA:
// the device loop runs the host loop's op sequence. Tested (GPU only) against the numpy reference to
// 1e-6 relative (tests/test_sampler.py::test_cuda_loop_equals_reference), not for exact equality.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "javisrt/sampler.h"

namespace javisrt {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("CUDA error in ") + what + ": " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
}
#define JAVIS_CUDA_CHECK(expr) check((expr), #expr)

// Memory-bound elementwise work: 256 threads, grid-stride, at most 4096 blocks (enough to cover
// 132 SMs x 16 resident blocks on H100 without a tail of tiny blocks).
constexpr int kThreads = 256;
int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 4096 ? (b > 0 ? b : 1) : 4096);
}

__global__ void fill_kernel(float* __restrict__ dst, int64_t n, float value) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[j] = value;
}

__global__ void mirror_kernel(float* __restrict__ in, const float* __restrict__ x, int64_t n) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x[j];
    in[j] = v;
    in[n + j] = v;
  }
}

__device__ __forceinline__ float cfg(const float* out, int64_t n, int64_t j, float g) {
  const float vc = out[j], vu = out[n + j];
  return __fadd_rn(vu, __fmul_rn(g, __fsub_rn(vc, vu)));  // v_u + g (v_c - v_u)
}

// Pointers: `in` [2n] CFG input (x in half 0), `out` [2n] velocity [cond; uncond].
__global__ void euler_kernel(float* in, const float* out, int64_t n, float g, float dt) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = cfg(out, n, j, g);
    const float x = __fadd_rn(in[j], __fmul_rn(v, dt));
    in[j] = x;
    in[n + j] = x;
  }
}

// Same algebra and op order as unipc_step_host (host_loop.cpp); see there for the formulas.
__global__ void unipc_kernel(float* in, const float* out, float* x_last, const float* m_prev,
                             float* m_prev2, int64_t n, float g, StepPlan p) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = cfg(out, n, j, g);
    float x = in[j];
    const float m = __fadd_rn(x, __fmul_rn(p.sigma, v));
    const float m1 = m_prev[j];
    if (p.corr_order > 0) {
      float inner = __fmul_rn(p.crho1, __fsub_rn(m, m1));
      if (p.corr_order == 2)
        inner = __fadd_rn(__fmul_rn(p.crho0, __fdiv_rn(__fsub_rn(m_prev2[j], m1), p.crk)), inner);
      x = __fsub_rn(__fsub_rn(__fmul_rn(p.cc1, x_last[j]), __fmul_rn(p.cc2, m1)),
                    __fmul_rn(p.cc3, inner));
    }
    x_last[j] = x;
    float xn = __fsub_rn(__fmul_rn(p.pc1, x), __fmul_rn(p.pc2, m));
    if (p.pred_order == 2)
      xn = __fsub_rn(xn, __fmul_rn(p.pc3, __fmul_rn(0.5f, __fdiv_rn(__fsub_rn(m1, m), p.prk))));
    m_prev2[j] = m;
    in[j] = xn;
    in[n + j] = xn;
  }
}

// Owns the loop's CUDA resources; frees them on every exit path (errors included).
struct Resources {
  cudaStream_t stream = nullptr;
  std::vector<cudaEvent_t> events;
  std::vector<float*> workspace;
  ~Resources() {
    if (!workspace.empty()) {
      for (float* w : workspace) cudaFreeAsync(w, stream);
      cudaStreamSynchronize(stream);
    }
    for (cudaEvent_t e : events) cudaEventDestroy(e);
  }
};

}  // namespace

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the (non-sticky) error state so later runtime calls start clean
    throw UnavailableError(std::string("no usable CUDA device: ") + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
  }
  if (count == 0) throw UnavailableError("no CUDA device is visible");
  return count;
}

LoopResult run_cuda_loop(const SamplerConfig& config, const CudaLoopArgs& args,
                         const LoopHooks& hooks) {
  const std::vector<StepPlan> plan = make_plan(config);
  const size_t k_mod = args.modalities.size();
  if (k_mod == 0 || k_mod != config.guidance.size())
    throw ConfigError("need one guidance scale per modality: " + std::to_string(k_mod) +
                      " modalities, " + std::to_string(config.guidance.size()) + " scales");
  if (args.batch <= 0) throw ShapeError("batch must be >= 1");
  if (args.timesteps == 0) throw ShapeError("timesteps buffer is a null pointer");
  if (args.graph_exec == 0 && !args.enqueue)
    throw ConfigError("pass a CUDA graph (graph_exec) or an enqueue callback as the denoiser");
  for (size_t k = 0; k < k_mod; ++k) {
    const CudaModality& m = args.modalities[k];
    if (m.latent == 0 || m.input == 0 || m.output == 0)
      throw ShapeError("modality " + std::to_string(k) + ": null device pointer");
    if (m.numel <= 0 || m.numel % args.batch != 0)
      throw ShapeError("modality " + std::to_string(k) + ": numel " + std::to_string(m.numel) +
                       " is not a positive multiple of batch " + std::to_string(args.batch));
  }
  cuda_device_count();  // UnavailableError without a GPU or driver

  Resources res;
  res.stream = reinterpret_cast<cudaStream_t>(args.stream);
  cudaStream_t s = res.stream;
  const int steps = static_cast<int>(plan.size());
  res.events.resize(static_cast<size_t>(steps) + 1, nullptr);
  for (cudaEvent_t& e : res.events) JAVIS_CUDA_CHECK(cudaEventCreate(&e));

  // UniPC history per modality: x_last, m_a, m_b (n floats each), zeroed, stream-ordered.
  struct Hist {
    float* x_last = nullptr;
    float* m_prev = nullptr;
    float* m_prev2 = nullptr;
  };
  std::vector<Hist> hist(k_mod);
  for (size_t k = 0; k < k_mod; ++k) {
    const CudaModality& m = args.modalities[k];
    float* in = reinterpret_cast<float*>(m.input);
    const float* lat = reinterpret_cast<const float*>(m.latent);
    mirror_kernel<<<blocks_for(m.numel), kThreads, 0, s>>>(in, lat, m.numel);
    JAVIS_CUDA_CHECK(cudaGetLastError());
    if (config.solver == Solver::kUniPC) {
      float* w = nullptr;
      const size_t bytes = 3 * static_cast<size_t>(m.numel) * sizeof(float);
      JAVIS_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&w), bytes, s));
      res.workspace.push_back(w);
      JAVIS_CUDA_CHECK(cudaMemsetAsync(w, 0, bytes, s));
      hist[k] = {w, w + m.numel, w + 2 * m.numel};
    }
  }

  LoopResult result;
  int reported = 0;  // steps whose completion has been observed and reported
  auto report_through = [&](int last_done) {
    for (; reported < last_done; ++reported) {
      float ms = 0.f;
      JAVIS_CUDA_CHECK(cudaEventElapsedTime(&ms, res.events[static_cast<size_t>(reported)],
                                            res.events[static_cast<size_t>(reported) + 1]));
      result.step_times_s.push_back(ms * 1e-3);
      result.steps_done = reported + 1;
      if (hooks.progress)
        hooks.progress(reported + 1, steps, plan[static_cast<size_t>(reported)].t, ms * 1e-3);
    }
  };

  JAVIS_CUDA_CHECK(cudaEventRecord(res.events[0], s));
  const int64_t two_b = 2 * args.batch;
  int enqueued = 0;
  for (int i = 0; i < steps; ++i) {
    // Between steps only: wait for step i - max_inflight so progress and cancellation follow the GPU
    // instead of the host racing ahead through all steps.
    if (args.max_inflight > 0 && i - args.max_inflight >= 0) {
      const int j = i - args.max_inflight;
      JAVIS_CUDA_CHECK(cudaEventSynchronize(res.events[static_cast<size_t>(j) + 1]));
      report_through(j + 1);
    }
    if (hooks.cancel && hooks.cancel()) {
      result.cancelled = true;
      break;
    }
    const StepPlan& p = plan[static_cast<size_t>(i)];
    fill_kernel<<<blocks_for(two_b), kThreads, 0, s>>>(reinterpret_cast<float*>(args.timesteps),
                                                       two_b, p.t);
    JAVIS_CUDA_CHECK(cudaGetLastError());
    if (args.graph_exec != 0)
      JAVIS_CUDA_CHECK(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(args.graph_exec), s));
    else
      args.enqueue(i, args.stream);
    for (size_t k = 0; k < k_mod; ++k) {
      const CudaModality& m = args.modalities[k];
      float* in = reinterpret_cast<float*>(m.input);
      const float* out = reinterpret_cast<const float*>(m.output);
      const float g = config.guidance[k];
      if (config.solver == Solver::kEuler) {
        euler_kernel<<<blocks_for(m.numel), kThreads, 0, s>>>(in, out, m.numel, g, p.dt);
      } else {
        Hist& h = hist[k];
        unipc_kernel<<<blocks_for(m.numel), kThreads, 0, s>>>(in, out, h.x_last, h.m_prev,
                                                             h.m_prev2, m.numel, g, p);
        std::swap(h.m_prev, h.m_prev2);
      }
      JAVIS_CUDA_CHECK(cudaGetLastError());
    }
    JAVIS_CUDA_CHECK(cudaEventRecord(res.events[static_cast<size_t>(i) + 1], s));
    enqueued = i + 1;
  }

  for (size_t k = 0; k < k_mod; ++k) {
    const CudaModality& m = args.modalities[k];
    JAVIS_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(m.latent),
                                     reinterpret_cast<const void*>(m.input),
                                     static_cast<size_t>(m.numel) * sizeof(float),
                                     cudaMemcpyDeviceToDevice, s));
  }
  JAVIS_CUDA_CHECK(cudaStreamSynchronize(s));
  report_through(enqueued);
  return result;
}

}  // namespace javisrt

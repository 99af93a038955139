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

#include <cstdio>
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
  cudaEvent_t producer_done = nullptr;
  cudaEvent_t done = nullptr;
  std::vector<float*> workspace;
  ~Resources() {
    for (float* w : workspace) cudaFreeAsync(w, stream);
    // Always, not only with a workspace: when a callback (enqueue, progress, cancel) throws mid-loop,
    // the kernels already enqueued must not keep writing the caller's buffers after control returns.
    cudaStreamSynchronize(stream);
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    if (producer_done) cudaEventDestroy(producer_done);
    if (done) cudaEventDestroy(done);
  }
};

// Sets the device for the loop's lifetime and restores the caller's (declared before Resources, so
// the stream is synchronised on the loop's device before the caller's device is restored).
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    JAVIS_CUDA_CHECK(cudaGetDevice(&previous));
    if (previous != device) JAVIS_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    if (previous >= 0) cudaSetDevice(previous);
  }
};

std::string hex(uintptr_t p) {
  char buf[2 + 2 * sizeof(uintptr_t) + 1];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(p));
  return buf;
}

// The device a pointer's memory lives on; ShapeError for host, unregistered or unknown pointers.
int device_of(uintptr_t ptr, const std::string& what) {
  cudaPointerAttributes a{};
  const cudaError_t err = cudaPointerGetAttributes(&a, reinterpret_cast<const void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw ShapeError(what + ": cudaPointerGetAttributes(" + hex(ptr) + ") failed: " + cudaGetErrorName(err));
  }
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)
    throw ShapeError(what + ": " + hex(ptr) + " is not CUDA device memory (host or unregistered pointer)");
  return a.device;
}

std::string cuda_version_str(int v) {
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

// "driver supports CUDA 12.4, this build's static runtime is CUDA 13.0 ..." for UnavailableError.
std::string versions_note() {
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);    // 0 when no driver is installed
  cudaRuntimeGetVersion(&runtime);  // the static runtime linked into this module
  std::string s = "driver: " + (driver ? "supports CUDA " + cuda_version_str(driver)
                                       : std::string("none found")) +
                  "; javisrt._sampler's static runtime: CUDA " + cuda_version_str(runtime);
  if (driver && driver < runtime)
    s += ". The driver is too old for this runtime (CUDA " + std::to_string(runtime / 1000) +
         " needs driver R580 or newer): update the driver, or rebuild javisrt._sampler with the CUDA "
         "toolkit of the deployed torch's CUDA major (README, 'Building the C++ loop')";
  return s;
}

}  // namespace

bool cuda_compiled() { return true; }

int cuda_device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the (non-sticky) error state so later runtime calls start clean
    throw UnavailableError(std::string("no usable CUDA device: ") + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + "); " + versions_note());
  }
  if (count == 0) throw UnavailableError("no CUDA device is visible; " + versions_note());
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

  // Device selection: every buffer on one device, which becomes current for the loop.
  const int device = device_of(args.timesteps, "timesteps");
  for (size_t k = 0; k < k_mod; ++k) {
    const CudaModality& m = args.modalities[k];
    const std::string mod = "modality " + std::to_string(k);
    for (auto [ptr, name] : {std::pair{m.latent, "latent"}, {m.input, "input"}, {m.output, "output"}}) {
      const int d = device_of(ptr, mod + " " + name);
      if (d != device)
        throw ShapeError(mod + " " + name + " is on cuda:" + std::to_string(d) + ", the timesteps buffer on cuda:" +
                         std::to_string(device) + ": all loop buffers must be on one device");
    }
  }
  DeviceGuard guard(device);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(args.stream);
#if CUDART_VERSION >= 12080
  for (auto [stream, what] : {std::pair{args.stream, "stream"}, {args.wait_producer ? args.producer : args.stream, "producer stream"}}) {
    int sd = device;
    JAVIS_CUDA_CHECK(cudaStreamGetDevice(reinterpret_cast<cudaStream_t>(stream), &sd));
    if (sd != device)
      throw ShapeError(std::string(what) + " belongs to cuda:" + std::to_string(sd) + ", the buffers are on cuda:" +
                       std::to_string(device));
  }
#endif

  Resources res;
  res.stream = s;
  const int steps = static_cast<int>(plan.size());
  res.events.resize(static_cast<size_t>(steps) + 1, nullptr);
  // Blocking sync: the host sleeps in cudaEventSynchronize instead of spinning a core through
  // multi-second steps. Timing stays enabled (step_times_s).
  for (cudaEvent_t& e : res.events) JAVIS_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventBlockingSync));
  JAVIS_CUDA_CHECK(cudaEventCreateWithFlags(&res.done, cudaEventBlockingSync | cudaEventDisableTiming));
  if (args.wait_producer) {
    // Stream order with the producer (torch.randn latents, zeroed buffers, copies on torch's stream).
    JAVIS_CUDA_CHECK(cudaEventCreateWithFlags(&res.producer_done, cudaEventDisableTiming));
    JAVIS_CUDA_CHECK(cudaEventRecord(res.producer_done, reinterpret_cast<cudaStream_t>(args.producer)));
    JAVIS_CUDA_CHECK(cudaStreamWaitEvent(s, res.producer_done, 0));
  }

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
  JAVIS_CUDA_CHECK(cudaEventRecord(res.done, s));
  JAVIS_CUDA_CHECK(cudaEventSynchronize(res.done));  // blocking sync (no busy wait)
  report_through(enqueued);
  return result;
}

}  // namespace javisrt

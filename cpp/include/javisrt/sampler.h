// javisrt sampling loop: schedules, per-step solver coefficients and the denoising loops.
//
// This header is the C++17 library; it does not depend on Python. The pybind11 module
// (src/module.cpp) and the CUDA loop (src/cuda_loop.cu) are built on top of it.
//
// Conventions shared by every path (and by the Python reference, runtime/sampling.py):
//   * Noise convention x_t = (1 - t/1000) x0 + (t/1000) eps, t in [0, 1000].
//   * The denoiser returns the rectified-flow velocity v = x0 - eps (the model's negated output).
//   * CFG batch [cond; uncond]: the denoiser sees 2B samples per modality, the first B conditional.
//     v = v_u + g (v_c - v_u), with one guidance scale g per modality.
//   * All latent math is fp32 with a fixed operation order and no FMA contraction, so the host loop
//     equals the numpy reference exactly (tests/test_sampler.py compares every step with
//     np.array_equal). The CUDA kernels run the same op sequence with round-to-nearest intrinsics;
//     their test (GPU only) checks agreement with the reference to 1e-6 relative, not exactness.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace javisrt {

// ---- errors: translated by the binding into javisrt.engine.errors.{ConfigError,ShapeError,UnavailableError}
struct ConfigError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct ShapeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct UnavailableError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Solver { kEuler, kUniPC };

// Wan2.1's FlowUniPCMultistepScheduler takes sigma_max from its float32 training sigmas:
// float32(1 - 1/1000) = 0.9990000128746033 (not 0.999).
constexpr double kWanSigmaMax = 0.9990000128746033;

struct SamplerConfig {
  Solver solver = Solver::kEuler;
  int steps = 50;
  std::vector<float> guidance{5.0f, 5.0f};  // one CFG scale per modality (video, audio)
  double shift = 1.0;                       // Euler: rflow ratio r; UniPC: flow_shift
  double sigma_max = kWanSigmaMax;          // UniPC only: unshifted sigmas = linspace(max, min, steps+1)[:-1]
  double sigma_min = 0.0;
};

void validate(const SamplerConfig& config);  // throws ConfigError

// ---- schedules (model-spec.md §6)

// Round a float to the nearest bfloat16 (ties to even), returned as float.
float bf16_round(float x);

// Open-Sora/JavisDiT shift ratio r = sqrt(H W / 512^2) * sqrt((F // 17) * 5) * scale, computed the way
// the reference computes it: height/width/num_frames are bf16 tensors at inference, so every op rounds
// to bf16 (the released checkpoint was sampled with that r, e.g. 2.421875 for 240x426/65f, not 2.4187).
float rflow_shift(double height, double width, double num_frames, double scale = 1.0);

// Euler timesteps t'_i (fp32, 1000-scale), i = 0..steps-1: t_i = float32((1 - i/steps) * 1000),
// s = t_i / 1000, t'_i = (r s) / (1 + (r - 1) s) * 1000, all in fp32 as RFlow.sample does.
std::vector<float> flow_timesteps(int steps, double shift);
std::vector<float> rflow_timesteps(int steps, double height, double width, double num_frames,
                                   double scale = 1.0);

// UniPC sigmas, steps + 1 values ending in 0 (float32, as diffusers / Wan store them).
std::vector<float> unipc_sigmas(int steps, double shift, double sigma_max = kWanSigmaMax,
                                double sigma_min = 0.0);
// Timesteps the model sees under UniPC: int64(sigma * 1000) of the float64 sigmas, as a float.
std::vector<float> unipc_timesteps(int steps, double shift, double sigma_max = kWanSigmaMax,
                                   double sigma_min = 0.0);

// ---- per-step plan: every scalar a step needs, computed once on the host (double -> float)

struct StepPlan {
  float t = 0.f;  // timestep passed to the denoiser
  // Euler: x <- x + v * dt
  float dt = 0.f;
  // UniPC (bh2, predict-x0, order <= 2): m = x + sigma v is the x0 prediction of this step.
  float sigma = 0.f;
  int corr_order = 0;  // 0: no corrector this step; 1 or 2
  float cc1 = 0.f, cc2 = 0.f, cc3 = 0.f, crk = 1.f, crho0 = 0.f, crho1 = 0.f;
  int pred_order = 1;  // 1 or 2
  float pc1 = 0.f, pc2 = 0.f, pc3 = 0.f, prk = 1.f;
};

std::vector<StepPlan> make_plan(const SamplerConfig& config);

// ---- elementwise step math (host); n = elements of one CFG half (B * per-sample size).
// `in` is the [2B, ...] denoiser input buffer: x lives in in[0, n) and is mirrored into in[n, 2n).
// `out` is the denoiser's [2B, ...] velocity: out[0, n) cond, out[n, 2n) uncond.

struct UniPCState {  // per modality, n floats each
  std::vector<float> x_last, m_a, m_b;
  float* m_prev = nullptr;   // x0 prediction of step i-1
  float* m_prev2 = nullptr;  // x0 prediction of step i-2 (becomes scratch for step i)
  void reset(int64_t n);
};

void euler_step_host(float* in, const float* out, int64_t n, float guidance, float dt);
void unipc_step_host(float* in, const float* out, int64_t n, float guidance, const StepPlan& p,
                     UniPCState& s);

// ---- the loop

struct LoopResult {
  int steps_done = 0;
  std::vector<double> step_times_s;
  bool cancelled = false;
};

struct LoopHooks {
  // Called after each completed step: (steps_done, steps, t of that step, its wall time in s).
  std::function<void(int, int, float, double)> progress;
  // Polled before each step; returning true stops the loop cleanly.
  std::function<bool()> cancel;
};

// Host denoiser: fill outputs[k] (pointers to [2B, ...] fp32 velocity, valid until the next call)
// from the inputs in the loop's buffers; t is the step's timestep (same for all 2B samples).
using HostDenoiser =
    std::function<void(int step, float t, std::vector<const float*>& outputs)>;

// Host loop over modalities k with CFG buffers in[k] (2 n[k] floats, half 0 initialised with x).
LoopResult run_host_loop(const SamplerConfig& config, const std::vector<float*>& in,
                         const std::vector<int64_t>& n, const HostDenoiser& denoiser,
                         const LoopHooks& hooks);

// ---- CUDA loop (src/cuda_loop.cu; src/cuda_unavailable.cpp when built without nvcc)

bool cuda_compiled();
// Number of visible devices; throws UnavailableError when the runtime or driver cannot be used (its
// message names the driver's and this build's runtime CUDA versions: a driver too old for the static
// runtime otherwise reads like "no GPU").
int cuda_device_count();

struct CudaModality {
  uintptr_t latent = 0;  // [B, ...] fp32 device buffer: initial noise in, final latent out
  uintptr_t input = 0;   // [2B, ...] fp32 static input buffer the denoiser reads
  uintptr_t output = 0;  // [2B, ...] fp32 static velocity buffer the denoiser writes
  int64_t numel = 0;     // elements of the [B, ...] latent
};

struct CudaLoopArgs {
  std::vector<CudaModality> modalities;
  uintptr_t timesteps = 0;  // [2B] fp32 device buffer the denoiser reads, written by the loop per step
  int64_t batch = 0;        // B
  uintptr_t stream = 0;     // cudaStream_t (0: legacy default stream)
  // The stream that produced the latents and zeroed/wrote the buffers (e.g. torch's current stream):
  // the loop's stream waits for everything queued on it so far. Ignored unless wait_producer.
  bool wait_producer = false;
  uintptr_t producer = 0;
  uintptr_t graph_exec = 0; // cudaGraphExec_t replayed as the denoiser (0: use `enqueue`)
  std::function<void(int step, uintptr_t stream)> enqueue;  // enqueues the denoiser on `stream`
  int max_inflight = 2;     // steps enqueued ahead of the last one known complete
};

// Runs on the device holding the buffers (every pointer is checked to be device memory of one device,
// and the stream to belong to it); the caller's current device is restored on return.
LoopResult run_cuda_loop(const SamplerConfig& config, const CudaLoopArgs& args, const LoopHooks& hooks);

}  // namespace javisrt

// Schedules and the per-step plan (model-spec.md §6). Every formula here has a numpy/torch twin in
// runtime/sampling.py; tests/test_sampler.py checks that they agree exactly.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "javisrt/sampler.h"

namespace javisrt {

void validate(const SamplerConfig& c) {
  if (c.steps <= 0) throw ConfigError("steps must be >= 1, got " + std::to_string(c.steps));
  if (c.guidance.empty() || c.guidance.size() > 2)
    throw ConfigError("guidance needs one scale per modality (1 or 2), got " +
                      std::to_string(c.guidance.size()));
  for (float g : c.guidance)
    if (!std::isfinite(g)) throw ConfigError("guidance scales must be finite");
  if (!(c.shift > 0.0) || !std::isfinite(c.shift))
    throw ConfigError("shift must be a finite number > 0, got " + std::to_string(c.shift));
  if (c.solver == Solver::kUniPC &&
      !(c.sigma_max <= 1.0 && c.sigma_min >= 0.0 && c.sigma_max > c.sigma_min))
    throw ConfigError("UniPC needs 0 <= sigma_min < sigma_max <= 1, got sigma_max=" +
                      std::to_string(c.sigma_max) + " sigma_min=" + std::to_string(c.sigma_min));
}

float bf16_round(float x) {
  // c10::BFloat16's round-to-nearest-even: keep the top 16 bits after adding 0x7fff + lsb.
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return x;  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  u &= 0xffff0000u;
  std::memcpy(&x, &u, sizeof x);
  return x;
}

float rflow_shift(double height, double width, double num_frames, double scale) {
  if (!(height > 0 && width > 0)) throw ConfigError("height and width must be > 0");
  if (!(num_frames == 1 || num_frames >= 17))
    throw ConfigError("num_frames must be 1 or >= 17 (the reference uses (F // 17) * 5), got " +
                      std::to_string(num_frames));
  // Reproduces Open-Sora's timestep_transform on bf16 inputs, op by op: each bf16 op computes in
  // fp32 and rounds the result to bf16 (what torch's CPU and CUDA kernels do). The released
  // checkpoint was sampled this way, so r(240x426, 65 f) = 2.421875, not the exact 2.4187.
  const float h = bf16_round(static_cast<float>(height));
  const float w = bf16_round(static_cast<float>(width));
  const float f = bf16_round(static_cast<float>(num_frames));
  const float resolution = bf16_round(h * w);
  const float ratio_space = bf16_round(std::sqrt(bf16_round(resolution / 262144.0f)));
  float frames;
  if (f == 1.0f) {
    frames = 1.0f;  // the reference substitutes ones for single-frame inputs
  } else {
    frames = bf16_round(std::floor(f / 17.0f));  // floor_divide(F, 17), exact for integer F
    frames = bf16_round(frames * 5.0f);
  }
  const float ratio_time = bf16_round(std::sqrt(frames));  // / base_num_frames (= 1) is exact
  // `ratio_space * ratio_time * scale`: the Python float scale enters as fp32 (torch's opmath).
  return bf16_round(bf16_round(ratio_space * ratio_time) * static_cast<float>(scale));
}

namespace {

// t'_i in fp32 given r and (r - 1), both as the reference holds them.
std::vector<float> shifted_timesteps(int steps, float r, float r_minus_1) {
  if (steps <= 0) throw ConfigError("steps must be >= 1, got " + std::to_string(steps));
  std::vector<float> ts(static_cast<size_t>(steps));
  for (int i = 0; i < steps; ++i) {
    // Python builds (1.0 - i / N) * 1000 in double, torch.tensor([...]) rounds it to fp32.
    const float t = static_cast<float>((1.0 - static_cast<double>(i) / steps) * 1000.0);
    const float s = t / 1000.0f;
    const float shifted = (r * s) / (1.0f + r_minus_1 * s);
    ts[static_cast<size_t>(i)] = shifted * 1000.0f;
  }
  return ts;
}

// Shifted float64 sigmas, exactly as diffusers' UniPCMultistepScheduler.set_timesteps computes them
// with use_flow_sigmas: numpy linspace(max, min, steps + 1)[:-1], then shift, then nudge a leading 1.
std::vector<double> unipc_sigmas64(int steps, double shift, double sigma_max, double sigma_min) {
  if (steps <= 0) throw ConfigError("steps must be >= 1, got " + std::to_string(steps));
  std::vector<double> s(static_cast<size_t>(steps));
  const double step = (sigma_min - sigma_max) / steps;  // numpy: delta / div
  for (int i = 0; i < steps; ++i) {
    const double lin = static_cast<double>(i) * step + sigma_max;  // numpy: y *= step; y += start
    s[static_cast<size_t>(i)] = shift * lin / (1.0 + (shift - 1.0) * lin);
  }
  // diffusers: "to avoid inf torch.log(alpha_si)" when the first sigma is 1.
  if (std::fabs(s[0] - 1.0) < 1e-6) s[0] -= 1e-6;
  return s;
}

double lambda_of(double sigma) {  // log(alpha) - log(sigma), alpha = 1 - sigma (+inf at sigma = 0)
  return std::log(1.0 - sigma) - std::log(sigma);
}

}  // namespace

std::vector<float> flow_timesteps(int steps, double shift) {
  if (!(shift > 0.0)) throw ConfigError("shift must be > 0");
  const float r = static_cast<float>(shift);
  return shifted_timesteps(steps, r, r - 1.0f);
}

std::vector<float> rflow_timesteps(int steps, double height, double width, double num_frames,
                                   double scale) {
  const float r = rflow_shift(height, width, num_frames, scale);
  // `ratio - 1` is a bf16 op in the reference (ratio is a bf16 tensor).
  return shifted_timesteps(steps, r, bf16_round(r - 1.0f));
}

std::vector<float> unipc_sigmas(int steps, double shift, double sigma_max, double sigma_min) {
  const std::vector<double> s = unipc_sigmas64(steps, shift, sigma_max, sigma_min);
  std::vector<float> out(s.size() + 1, 0.0f);  // final sigma 0 (final_sigmas_type="zero")
  for (size_t i = 0; i < s.size(); ++i) out[i] = static_cast<float>(s[i]);
  return out;
}

std::vector<float> unipc_timesteps(int steps, double shift, double sigma_max, double sigma_min) {
  const std::vector<double> s = unipc_sigmas64(steps, shift, sigma_max, sigma_min);
  std::vector<float> out(s.size());
  // diffusers and Wan: timesteps = sigmas * 1000 in float64, then .to(torch.int64) (truncation).
  for (size_t i = 0; i < s.size(); ++i)
    out[i] = static_cast<float>(static_cast<int64_t>(s[i] * 1000.0));
  return out;
}

std::vector<StepPlan> make_plan(const SamplerConfig& c) {
  validate(c);
  const int n = c.steps;
  std::vector<StepPlan> plan(static_cast<size_t>(n));
  if (c.solver == Solver::kEuler) {
    const std::vector<float> ts = flow_timesteps(n, c.shift);
    for (int i = 0; i < n; ++i) {
      StepPlan& p = plan[static_cast<size_t>(i)];
      p.t = ts[static_cast<size_t>(i)];
      // RFlow.sample: dt = t_i - t_{i+1} (last step: t_i - 0), then dt / num_timesteps, in fp32.
      const float diff = i + 1 < n ? ts[static_cast<size_t>(i)] - ts[static_cast<size_t>(i) + 1]
                                   : ts[static_cast<size_t>(i)];
      p.dt = diff / 1000.0f;
    }
    return plan;
  }

  // UniPC, diffusers' UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True,
  // lower_order_final=True, final_sigmas_type="zero", flow sigmas). Coefficients are computed in
  // float64 from the float32 sigmas (diffusers does this arithmetic on float32 0-dim tensors; the
  // latent math below is the same fp32 sequence of ops).
  const std::vector<float> sig = unipc_sigmas(n, c.shift, c.sigma_max, c.sigma_min);
  const std::vector<float> tmodel = unipc_timesteps(n, c.shift, c.sigma_max, c.sigma_min);
  auto S = [&](int k) { return static_cast<double>(sig[static_cast<size_t>(k)]); };
  int lower_order_nums = 0;
  int prev_order = 0;
  for (int i = 0; i < n; ++i) {
    StepPlan& p = plan[static_cast<size_t>(i)];
    p.t = tmodel[static_cast<size_t>(i)];
    p.sigma = sig[static_cast<size_t>(i)];

    // Corrector UniC-q at step i (q = the predictor order of step i-1), from sigma_{i-1} to sigma_i.
    if (i > 0) {
      p.corr_order = prev_order;
      const double st = S(i), ss = S(i - 1);
      const double h = lambda_of(st) - lambda_of(ss);
      const double hh = -h;  // predict_x0
      const double h_phi_1 = std::expm1(hh);
      const double b_h = std::expm1(hh);  // bh2
      p.cc1 = static_cast<float>(st / ss);
      p.cc2 = static_cast<float>((1.0 - st) * h_phi_1);
      p.cc3 = static_cast<float>((1.0 - st) * b_h);
      if (p.corr_order == 1) {
        p.crho1 = 0.5f;
      } else {
        const double rk = (lambda_of(S(i - 2)) - lambda_of(ss)) / h;
        const double h_phi_k1 = h_phi_1 / hh - 1.0;
        const double b1 = h_phi_k1 * 1.0 / b_h;
        const double h_phi_k2 = h_phi_k1 / hh - 1.0 / 2.0;
        const double b2 = h_phi_k2 * 2.0 / b_h;
        // Solve [[1, 1], [rk, 1]] rho = [b1, b2] (diffusers: torch.linalg.solve(R, b)).
        const double rho0 = (b1 - b2) / (1.0 - rk);
        p.crk = static_cast<float>(rk);
        p.crho0 = static_cast<float>(rho0);
        p.crho1 = static_cast<float>(b1 - rho0);
      }
    }

    // Predictor UniP-p from sigma_i to sigma_{i+1}.
    int order = n - i < 2 ? n - i : 2;                           // lower_order_final
    order = order < lower_order_nums + 1 ? order : lower_order_nums + 1;  // warm-up
    p.pred_order = order;
    const double st = S(i + 1), ss = S(i);
    if (st == 0.0) {
      // Final step to sigma = 0: lambda_t = +inf, expm1(-inf) = -1, so x = 0 * x - (1 * -1) * m = m.
      p.pc1 = 0.0f;
      p.pc2 = -1.0f;
      p.pc3 = -1.0f;
    } else {
      const double h = lambda_of(st) - lambda_of(ss);
      const double hh = -h;
      const double h_phi_1 = std::expm1(hh);
      const double b_h = std::expm1(hh);
      p.pc1 = static_cast<float>(st / ss);
      p.pc2 = static_cast<float>((1.0 - st) * h_phi_1);
      p.pc3 = static_cast<float>((1.0 - st) * b_h);
      if (order == 2) p.prk = static_cast<float>((lambda_of(S(i - 1)) - lambda_of(ss)) / h);
    }
    if (lower_order_nums < 2) ++lower_order_nums;
    prev_order = order;
  }
  return plan;
}

}  // namespace javisrt

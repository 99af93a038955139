// javisrt._sampler: the C++ sampling loop behind a Python binding (pybind11).
//
// Same signatures as the pure-Python reference in runtime/sampling.py; use that module
// (javisrt.runtime.sampling.sample), which selects this extension and falls back loudly.
// C++ errors become javisrt.engine.errors.{ConfigError, ShapeError, UnavailableError}; CUDA runtime
// failures become RuntimeError.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <string>
#include <vector>

#include "javisrt/sampler.h"

namespace py = pybind11;
using namespace javisrt;

namespace {

py::object errors_module() {
  PYBIND11_CONSTINIT static py::gil_safe_call_once_and_store<py::object> storage;
  return storage
      .call_once_and_store_result([] { return py::module_::import("javisrt.engine.errors"); })
      .get_stored();
}

py::array_t<float> to_numpy(const std::vector<float>& v) {
  py::array_t<float> a(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(a.mutable_data(), v.data(), v.size() * sizeof(float));
  return a;
}

std::string type_name(py::handle h) { return py::str(py::type::of(h).attr("__name__")); }

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t d = 0; d < a.ndim(); ++d) s += (d ? ", " : "") + std::to_string(a.shape(d));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// A float32 C-contiguous array view of `obj` (numpy array or anything with __array__, e.g. a CPU
// torch tensor), never a converted copy: a wrong dtype or layout is the caller's bug.
py::array checked_array(py::handle obj, const std::string& what) {
  py::array a = py::array::ensure(obj);
  if (!a) throw ShapeError(what + ": expected a float32 array, got " + type_name(obj));
  if (!py::isinstance<py::array_t<float, 0>>(a))
    throw ShapeError(what + ": dtype " + std::string(py::str(a.dtype())) + ", expected float32");
  if (!(a.flags() & py::array::c_style))
    throw ShapeError(what + ": array is not C-contiguous (pass np.ascontiguousarray(x))");
  if (a.ndim() < 1 || a.size() == 0)
    throw ShapeError(what + ": expected a non-empty array with a batch dimension, got shape " +
                     shape_str(a));
  return a;
}

SamplerConfig config_from_py(py::handle cfg) {
  SamplerConfig c;
  try {
    py::object solver = cfg.attr("solver");
    if (py::hasattr(solver, "value")) solver = solver.attr("value");
    const std::string name = py::str(solver);
    if (name == "euler")
      c.solver = Solver::kEuler;
    else if (name == "unipc")
      c.solver = Solver::kUniPC;
    else
      throw ConfigError("unknown solver '" + name + "' (expected 'euler' or 'unipc')");
    c.steps = cfg.attr("steps").cast<int>();
    c.guidance.clear();
    for (py::handle g : cfg.attr("guidance")) c.guidance.push_back(g.cast<float>());
    c.shift = cfg.attr("shift").cast<double>();
    c.sigma_max = cfg.attr("sigma_max").cast<double>();
    c.sigma_min = cfg.attr("sigma_min").cast<double>();
  } catch (const py::error_already_set& e) {
    if (e.matches(PyExc_AttributeError)) throw ConfigError(std::string("config: ") + e.what());
    throw;
  } catch (const py::cast_error& e) {
    throw ConfigError(std::string("config has a field of the wrong type: ") + e.what());
  }
  validate(c);
  return c;
}

LoopHooks hooks_from_py(const py::object& progress, const py::object& cancel) {
  LoopHooks hooks;
  if (!progress.is_none())
    hooks.progress = [&progress](int done, int total, float t, double secs) {
      py::gil_scoped_acquire gil;
      progress(done, total, t, secs);
    };
  if (!cancel.is_none())
    hooks.cancel = [&cancel]() -> bool {
      py::gil_scoped_acquire gil;
      const py::object r = cancel();  // released before the GIL is
      const int truth = PyObject_IsTrue(r.ptr());
      if (truth < 0) throw py::error_already_set();
      return truth != 0;
    };
  return hooks;
}

py::object make_result(py::list latents, const LoopResult& r) {
  py::object cls = py::module_::import("javisrt.runtime.sampling").attr("SampleResult");
  return cls(py::arg("latents") = latents, py::arg("steps_done") = r.steps_done,
             py::arg("step_times_s") = py::cast(r.step_times_s), py::arg("cancelled") = r.cancelled);
}

py::object sample(const py::object& latents, const py::object& denoiser, const py::object& config,
                  const py::object& progress, const py::object& cancel) {
  const SamplerConfig cfg = config_from_py(config);
  if (!py::isinstance<py::list>(latents) && !py::isinstance<py::tuple>(latents))
    throw ShapeError("latents must be a list of arrays, one per modality, got " + type_name(latents));
  const size_t k_mod = py::len(latents);
  if (k_mod < 1 || k_mod > 2)
    throw ShapeError("latents: expected 1 or 2 modalities, got " + std::to_string(k_mod));
  if (k_mod != cfg.guidance.size())
    throw ConfigError("config.guidance has " + std::to_string(cfg.guidance.size()) +
                      " scales but " + std::to_string(k_mod) + " modalities were given");

  // CFG buffers [2B, ...] owned by numpy: half 0 holds the loop state x, half 1 mirrors it. The
  // denoiser sees them read-only; they are only valid during its call.
  std::vector<py::array> src;
  std::vector<std::vector<py::ssize_t>> shapes;
  std::vector<float*> in;
  std::vector<int64_t> n;
  py::list inputs;
  py::ssize_t batch = 0;
  const py::sequence latent_seq = latents;
  for (size_t k = 0; k < k_mod; ++k) {
    py::array a = checked_array(latent_seq[k], "latents[" + std::to_string(k) + "]");
    if (k == 0) batch = a.shape(0);
    if (a.shape(0) != batch)
      throw ShapeError("latents[" + std::to_string(k) + "]: batch " + std::to_string(a.shape(0)) +
                       " != batch " + std::to_string(batch) + " of latents[0]");
    std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
    std::vector<py::ssize_t> shape2 = shape;
    shape2[0] *= 2;
    py::array_t<float> buf(shape2);
    float* p = buf.mutable_data();
    std::memcpy(p, a.data(), static_cast<size_t>(a.size()) * sizeof(float));
    py::setattr(buf.attr("flags"), "writeable", py::bool_(false));
    inputs.append(buf);
    in.push_back(p);
    n.push_back(static_cast<int64_t>(a.size()));
    shapes.push_back(shape);
  }
  py::array_t<float> ts(2 * batch);
  float* ts_ptr = ts.mutable_data();
  py::setattr(ts.attr("flags"), "writeable", py::bool_(false));

  std::vector<py::object> keep(k_mod);  // the denoiser's outputs, alive while the update reads them
  HostDenoiser fn = [&](int, float t, std::vector<const float*>& outs) {
    py::gil_scoped_acquire gil;
    for (py::ssize_t j = 0; j < 2 * batch; ++j) ts_ptr[j] = t;
    py::object res = denoiser(inputs, ts);
    if (!py::isinstance<py::list>(res) && !py::isinstance<py::tuple>(res))
      throw ShapeError("denoiser must return a list of velocity arrays, got " + type_name(res));
    if (py::len(res) != k_mod)
      throw ShapeError("denoiser returned " + std::to_string(py::len(res)) + " arrays for " +
                       std::to_string(k_mod) + " modalities");
    py::sequence seq = res;
    for (size_t k = 0; k < k_mod; ++k) {
      const std::string what = "denoiser output[" + std::to_string(k) + "]";
      py::array o = checked_array(seq[k], what);
      const py::array expect = inputs[k].cast<py::array>();
      bool same = o.ndim() == expect.ndim();
      for (py::ssize_t d = 0; same && d < o.ndim(); ++d) same = o.shape(d) == expect.shape(d);
      if (!same)
        throw ShapeError(what + ": shape " + shape_str(o) + ", expected the CFG batch shape " +
                         shape_str(expect));
      // The update kernels take __restrict__ pointers: an output that overlaps the loop's input
      // buffers (e.g. a denoiser returning its inputs) is copied first.
      const auto* lo = static_cast<const char*>(o.data());
      const auto* hi = lo + o.nbytes();
      for (size_t q = 0; q < k_mod; ++q) {
        const auto* buf = reinterpret_cast<const char*>(in[q]);
        if (lo < buf + 2 * n[q] * static_cast<int64_t>(sizeof(float)) && buf < hi) {
          o = o.attr("copy")();
          break;
        }
      }
      outs[k] = static_cast<const float*>(o.data());
      keep[k] = std::move(o);
    }
  };

  const LoopHooks hooks = hooks_from_py(progress, cancel);
  LoopResult r;
  {
    py::gil_scoped_release nogil;
    r = run_host_loop(cfg, in, n, fn, hooks);
  }
  py::list out;
  for (size_t k = 0; k < k_mod; ++k) {
    py::array_t<float> res(shapes[k]);
    std::memcpy(res.mutable_data(), in[k], static_cast<size_t>(n[k]) * sizeof(float));
    out.append(res);
  }
  return make_result(out, r);
}

py::object sample_cuda(const std::vector<uintptr_t>& latents, const std::vector<uintptr_t>& inputs,
                       const std::vector<uintptr_t>& outputs, const std::vector<int64_t>& numels,
                       uintptr_t timesteps, int64_t batch, const py::object& config, uintptr_t stream,
                       uintptr_t graph_exec, const py::object& enqueue, const py::object& progress,
                       const py::object& cancel, int max_inflight, const py::object& wait_stream) {
  const SamplerConfig cfg = config_from_py(config);
  const size_t k_mod = latents.size();
  if (inputs.size() != k_mod || outputs.size() != k_mod || numels.size() != k_mod)
    throw ShapeError("latents, inputs, outputs and numels need one entry per modality");
  if (max_inflight < 0) throw ConfigError("max_inflight must be >= 0");
  CudaLoopArgs args;
  for (size_t k = 0; k < k_mod; ++k) args.modalities.push_back({latents[k], inputs[k], outputs[k], numels[k]});
  args.timesteps = timesteps;
  args.batch = batch;
  args.stream = stream;
  args.graph_exec = graph_exec;
  args.max_inflight = max_inflight;
  if (!wait_stream.is_none()) {
    args.wait_producer = true;
    args.producer = wait_stream.cast<uintptr_t>();
  }
  if (!enqueue.is_none())
    args.enqueue = [&enqueue](int step, uintptr_t s) {
      py::gil_scoped_acquire gil;
      enqueue(step, s);
    };
  const LoopHooks hooks = hooks_from_py(progress, cancel);
  LoopResult r;
  {
    py::gil_scoped_release nogil;
    r = run_cuda_loop(cfg, args, hooks);
  }
  py::list out;
  for (uintptr_t p : latents) out.append(py::int_(p));
  return make_result(out, r);
}

}  // namespace

PYBIND11_MODULE(_sampler, m) {
  m.doc() = R"doc(javisrt C++ sampling loop (private; use javisrt.runtime.sampling).

Rectified-flow Euler (the released JavisDiT++ sampler) and flow UniPC (order 2, bh2, predict-x0),
with per-modality classifier-free guidance, driving a denoiser once per step on the CFG batch
[cond; uncond]. Signatures match the pure-Python reference in javisrt.runtime.sampling.
Errors: javisrt.engine.errors.ConfigError / ShapeError / UnavailableError; CUDA runtime failures
raise RuntimeError.)doc";
  m.attr("__version__") = "0.1.0";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ConfigError& e) {
      py::set_error(errors_module().attr("ConfigError"), e.what());
    } catch (const ShapeError& e) {
      py::set_error(errors_module().attr("ShapeError"), e.what());
    } catch (const UnavailableError& e) {
      py::set_error(errors_module().attr("UnavailableError"), e.what());
    }
  });

  m.def("bf16_round", &bf16_round, py::arg("x"),
        "Round a float to the nearest bfloat16 (ties to even), as c10::BFloat16 does.");
  m.def("rflow_shift", &rflow_shift, py::arg("height"), py::arg("width"), py::arg("num_frames"),
        py::arg("scale") = 1.0,
        R"doc(Open-Sora rflow shift ratio r = sqrt(H*W/512**2) * sqrt((F // 17) * 5) * scale.

Computed with the reference's bf16 rounding (height/width/num_frames are bf16 tensors there):
240x426/65f -> 2.421875, 480x854/81f -> 5.59375.)doc");
  m.def(
      "rflow_timesteps",
      [](int steps, double h, double w, double f, double scale) {
        return to_numpy(rflow_timesteps(steps, h, w, f, scale));
      },
      py::arg("steps"), py::arg("height"), py::arg("width"), py::arg("num_frames"),
      py::arg("scale") = 1.0,
      "The released JavisDiT++ Euler timesteps (float32 [steps], 1000-scale), shifted by rflow_shift.");
  m.def(
      "flow_timesteps", [](int steps, double shift) { return to_numpy(flow_timesteps(steps, shift)); },
      py::arg("steps"), py::arg("shift"),
      "Euler timesteps (1 - i/steps) * 1000 shifted by r*s/(1+(r-1)*s), float32 [steps]; shift=1: unshifted.");
  m.def(
      "unipc_sigmas",
      [](int steps, double shift, double smax, double smin) {
        return to_numpy(unipc_sigmas(steps, shift, smax, smin));
      },
      py::arg("steps"), py::arg("shift"), py::arg("sigma_max") = kWanSigmaMax,
      py::arg("sigma_min") = 0.0,
      "UniPC flow sigmas, float32 [steps + 1] ending in 0: linspace(sigma_max, sigma_min, steps+1)[:-1] "
      "shifted by shift*s/(1+(shift-1)*s) (diffusers use_flow_sigmas / Wan2.1 FlowUniPC).");
  m.def(
      "unipc_timesteps",
      [](int steps, double shift, double smax, double smin) {
        return to_numpy(unipc_timesteps(steps, shift, smax, smin));
      },
      py::arg("steps"), py::arg("shift"), py::arg("sigma_max") = kWanSigmaMax,
      py::arg("sigma_min") = 0.0,
      "Timesteps the model sees under UniPC: int64(sigma * 1000) of the float64 sigmas, as float32 [steps].");
  m.def("sample", &sample, py::arg("latents"), py::arg("denoiser"), py::arg("config"),
        py::arg("progress") = py::none(), py::arg("cancel") = py::none(),
        R"doc(Run the sampling loop on the host; returns javisrt.runtime.sampling.SampleResult.

latents: list of 1 or 2 float32 C-contiguous arrays [B, ...] (video first), not modified.
denoiser(inputs, timesteps) -> list of velocity arrays: inputs are read-only float32 [2B, ...]
  arrays (cond half first; the loop's static buffers, valid only during the call), timesteps a
  float32 [2B] array; it returns v = x0 - eps as float32 C-contiguous [2B, ...] arrays.
config: a javisrt.runtime.sampling.SamplerConfig (read by attribute).
progress(steps_done, steps, t, step_seconds) is called after each step; cancel() is polled before
each step and a true result stops the loop (SampleResult.cancelled).
The GIL is released during the C++ math and taken only for the callbacks.)doc");
  m.def("sample_cuda", &sample_cuda, py::arg("latents"), py::arg("inputs"), py::arg("outputs"),
        py::arg("numels"), py::arg("timesteps"), py::arg("batch"), py::arg("config"), py::kw_only(),
        py::arg("stream") = 0, py::arg("graph_exec") = 0, py::arg("enqueue") = py::none(),
        py::arg("progress") = py::none(), py::arg("cancel") = py::none(),
        py::arg("max_inflight") = 2, py::arg("wait_stream") = py::none(),
        R"doc(Run the sampling loop on a CUDA stream over device buffers (pointers as ints).

latents[k]: float32 [B, ...] (numels[k] elements), initial noise in, final latent out (in place).
inputs[k] / outputs[k]: the denoiser's static float32 [2B, ...] input / velocity buffers;
timesteps: its float32 [2B] timestep buffer. Each step fills timesteps, runs the denoiser - replays
graph_exec (a cudaGraphExec_t) or calls enqueue(step, stream), which must enqueue on `stream` - then
the CFG + update kernels write x into both halves of inputs[k]. No host sync inside a step; before
step i the host waits for step i - max_inflight (0: never) so progress and cancel follow the GPU.
wait_stream: a cudaStream_t (e.g. torch.cuda.current_stream().cuda_stream; 0 = the legacy default
stream) whose queued work - the latents' producer, buffer zeroing, copies - `stream` waits for before
the loop starts; None: no wait (the caller orders the streams).
The loop runs on the device of the buffers (all pointers must be device memory of one device, the
streams on it) and restores the caller's current device. It returns only after every kernel it
enqueued has finished, also when a callback raises. Host waits use blocking-sync events.
Returns SampleResult with latents = the device pointers and step_times_s from CUDA events.
Raises UnavailableError without a GPU/driver or when built without nvcc.)doc");
  m.def("cuda_compiled", &cuda_compiled, "True when the extension was built with nvcc.");
  m.def("cuda_device_count", &cuda_device_count,
        "Visible CUDA devices; raises UnavailableError without a usable GPU, driver or CUDA build.");
}

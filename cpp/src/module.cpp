// javisrt._sampler: the C++ sampling loop behind a Python binding.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_sampler, m) {
  m.doc() = "javisrt C++ sampling loop (private; use javisrt.runtime.sampling)";
  m.attr("__version__") = "0.1.0";
}

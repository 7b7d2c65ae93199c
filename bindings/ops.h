// Every binding the module exports; module.cpp holds only their m.def lines.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace meldkit::bind {

namespace py = pybind11;

// weighted_sum.cpp
void weighted_sum(py::handle tensors, py::handle weights, py::handle out, py::handle workspace,
                  int64_t stream);
py::dict weighted_sum_native_dtypes();
int64_t weighted_sum_workspace_numel(int64_t num_inputs, int64_t numel, const std::string& device);

// info.cpp
py::dict build_info();
py::tuple cuda_device_count();
bool has_cuda();

}  // namespace meldkit::bind

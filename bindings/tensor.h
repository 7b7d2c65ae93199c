// Tensors arriving through DLPack, and the argument checks every binding shares. Each failure
// raises meldkit::Error naming the op and the argument; module.cpp maps it to a Python exception.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "meldkit/dtype.h"

namespace meldkit::bind {

namespace py = pybind11;

enum class DeviceKind { kCPU, kCUDA };

// Names an argument in error messages: "weighted_sum: argument 'tensors[2]'".
struct ArgName {
  const char* op;
  std::string arg;
  std::string prefix() const { return std::string(op) + ": argument '" + arg + "'"; }
};

// A borrowed view of a producer's tensor; valid while this object (and its owner) lives.
struct TensorArg {
  ArgName name;
  py::object owner;  // the DLPack capsule, or the tensor itself: keeps the producer's memory alive
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  DeviceKind device = DeviceKind::kCPU;
  int device_id = 0;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
  bool read_only = false;

  int64_t numel() const;
  bool is_contiguous() const;
  std::string device_str() const;
  std::string shape_str() const;
  int64_t nbytes() const { return numel() * dtype_size(dtype); }
};

// The stream argument every CUDA binding takes: the cudaStream_t (as an integer) the caller
// enqueues work on, 0 for the legacy default stream.
TensorArg import_tensor(py::handle obj, ArgName name, int64_t stream);

// Whether import_tensor may take a producer's DLPack C exchange table (on by default); returns
// the previous setting. Off, every tensor goes through __dlpack__ (for A/B timing and debugging).
bool set_dlpack_exchange(bool enabled);

void check_contiguous(const TensorArg& t);
void check_writable(const TensorArg& t);
void check_same_shape(const TensorArg& t, const TensorArg& ref);
void check_same_device(const TensorArg& t, const TensorArg& ref);
void check_dtype_in(const TensorArg& t, const DType* begin, const DType* end,
                    const std::string& device);
// `out` may be exactly one of the inputs (same memory), never a partial overlap.
void check_no_partial_overlap(const TensorArg& out, const std::vector<TensorArg>& inputs);
// A scratch buffer shares no byte with any of `others` (the call's inputs and outputs).
void check_no_overlap(const TensorArg& scratch, const std::vector<TensorArg>& others);

// An output (or an input a previous pass wrote) of one exact shape and dtype, on ref's device,
// contiguous; writable when `writable`.
void check_fixed(const TensorArg& t, const TensorArg& ref, const std::vector<int64_t>& shape,
                 DType dtype, bool writable);

// {"cpu": [...], "cuda": [...]} of an op whose kernels take float32, bfloat16 and float16 (plus
// float64 on the CPU when `cpu_float64`); "cuda" only in a CUDA build.
py::dict float_dtype_table(bool cpu_float64);

// A sequence of `expected` numbers as float32; non-finite values are refused (NaN always).
std::vector<float> import_floats(py::handle obj, ArgName name, size_t expected,
                                 bool allow_inf = false);

}  // namespace meldkit::bind

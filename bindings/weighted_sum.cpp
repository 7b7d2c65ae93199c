// Binding of weighted_sum: validate, pick the device and stream, release the GIL, launch.
#include "meldkit/weighted_sum.h"

#include <string>
#include <vector>

#include "ops.h"
#include "tensor.h"

namespace meldkit::bind {

namespace {
constexpr const char* kOp = "weighted_sum";
const DType* const kCpuBegin = std::begin(kFloatAndDoubleDtypes);
const DType* const kCpuEnd = std::end(kFloatAndDoubleDtypes);
const DType* const kCudaBegin = std::begin(kFloatDtypes);
const DType* const kCudaEnd = std::end(kFloatDtypes);

py::list dtype_names(const DType* begin, const DType* end) {
  py::list names;
  for (const DType* d = begin; d != end; ++d) names.append(dtype_name(*d));
  return names;
}
}  // namespace

py::dict weighted_sum_native_dtypes() {
  py::dict d;
  d["cpu"] = dtype_names(kCpuBegin, kCpuEnd);
  if (has_cuda()) d["cuda"] = dtype_names(kCudaBegin, kCudaEnd);
  return d;
}

int64_t weighted_sum_workspace_numel(int64_t num_inputs, int64_t numel, const std::string& device) {
  if (device != "cuda") return 0;
  return meldkit::weighted_sum_cuda_workspace_numel(int(num_inputs), numel);
}

void weighted_sum(py::handle tensors, py::handle weights, py::handle out, py::handle workspace,
                  int64_t stream) {
  if (!py::isinstance<py::sequence>(tensors) || py::hasattr(tensors, "__dlpack__")) {
    throw_type_error(std::string(kOp) + ": argument 'tensors': expected a list of tensors");
  }
  auto seq = py::reinterpret_borrow<py::sequence>(tensors);
  const size_t n = seq.size();
  if (n == 0) throw_value_error(std::string(kOp) + ": argument 'tensors': is empty");
  if (n > size_t(1) << 20) throw_value_error(std::string(kOp) + ": argument 'tensors': too many");

  std::vector<TensorArg> ins;
  ins.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    ins.push_back(import_tensor(seq[i], {kOp, "tensors[" + std::to_string(i) + "]"}, stream));
    const TensorArg& t = ins.back();
    if (i > 0) {
      check_same_device(t, ins[0]);
      check_same_shape(t, ins[0]);
      if (t.dtype != ins[0].dtype) {
        throw_type_error(t.name.prefix() + ": dtype " + dtype_name(t.dtype) + " differs from '" +
                         ins[0].name.arg + "' " + dtype_name(ins[0].dtype));
      }
    }
    check_contiguous(t);
  }
  const bool cuda = ins[0].device == DeviceKind::kCUDA;
  if (cuda) {
    if (!has_cuda()) {
      throw_type_error(std::string(kOp) +
                       ": argument 'tensors': are on CUDA but meldkit was built without CUDA");
    }
    check_dtype_in(ins[0], kCudaBegin, kCudaEnd, "CUDA");
  } else {
    check_dtype_in(ins[0], kCpuBegin, kCpuEnd, "CPU");
  }

  std::vector<float> w = import_floats(weights, {kOp, "weights"}, n);

  TensorArg o = import_tensor(out, {kOp, "out"}, stream);
  check_same_device(o, ins[0]);
  check_same_shape(o, ins[0]);
  check_contiguous(o);
  check_writable(o);
  check_dtype_in(o, cuda ? kCudaBegin : kCpuBegin, cuda ? kCudaEnd : kCpuEnd,
                 cuda ? "CUDA" : "CPU");
  check_no_partial_overlap(o, ins);

  WeightedSumParams p;
  p.numel = ins[0].numel();
  p.num_inputs = int(n);
  std::vector<const void*> ptrs(n);
  for (size_t i = 0; i < n; ++i) ptrs[i] = ins[i].data;
  p.inputs = ptrs.data();
  p.weights = w.data();
  p.in_dtype = ins[0].dtype;
  p.out = o.data;
  p.out_dtype = o.dtype;

  TensorArg ws;
  const int64_t ws_numel = cuda ? weighted_sum_cuda_workspace_numel(int(n), p.numel) : 0;
  if (ws_numel > 0) {
    if (workspace.is_none()) {
      throw_value_error(std::string(kOp) + ": argument 'workspace': " + std::to_string(n) +
                        " CUDA inputs need a float32 workspace of " + std::to_string(ws_numel) +
                        " elements");
    }
    ws = import_tensor(workspace, {kOp, "workspace"}, stream);
    check_same_device(ws, ins[0]);
    check_contiguous(ws);
    check_writable(ws);
    if (ws.dtype != DType::kFloat32 || ws.numel() < ws_numel) {
      throw_value_error(ws.name.prefix() + ": must be float32 with at least " +
                        std::to_string(ws_numel) + " elements");
    }
    std::vector<TensorArg> others = ins;
    others.push_back(o);
    check_no_overlap(ws, others);
    p.workspace = static_cast<float*>(ws.data);
  }

  if (p.numel == 0) return;
  if (cuda) {
#ifdef MELDKIT_WITH_CUDA
    py::gil_scoped_release release;
    weighted_sum_cuda(p, ins[0].device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    py::gil_scoped_release release;
    weighted_sum_cpu(p);
  }
}

}  // namespace meldkit::bind

// Binding of the logit fusion solver: validate, pick the device and stream, release the GIL,
// launch.
#include "meldkit/logit_fusion.h"

#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "ops.h"
#include "tensor.h"

namespace meldkit::bind {

namespace {

constexpr const char* kOp = "logit_fusion";
const DType* const kBegin = std::begin(kFloatDtypes);
const DType* const kEnd = std::end(kFloatDtypes);

}  // namespace

py::dict logit_fusion_native_dtypes() { return float_dtype_table(/*cpu_float64=*/true); }

void logit_fusion(py::handle large, py::handle small_base, py::handle experts, py::handle alphas,
                  py::handle loss, py::handle alpha, py::handle expert, py::handle logits,
                  int64_t stream, py::handle allowed) {
  TensorArg l = import_tensor(large, {kOp, "large"}, stream);
  TensorArg s = import_tensor(small_base, {kOp, "small_base"}, stream);
  TensorArg x = import_tensor(experts, {kOp, "experts"}, stream);
  const bool cuda = l.device == DeviceKind::kCUDA;
  if (cuda && !has_cuda()) {
    throw_type_error(l.name.prefix() + ": is on CUDA but meldkit was built without CUDA");
  }
  if (l.dtype == DType::kFloat64 && !cuda) {
    // float64 runs on the CPU (tests, gradcheck-style comparisons).
  } else {
    check_dtype_in(l, kBegin, kEnd, cuda ? "CUDA" : "CPU");
  }
  for (const TensorArg* t : {&l, &s, &x}) {
    check_contiguous(*t);
    check_same_device(*t, l);
    if (t->dtype != l.dtype) {
      throw_type_error(t->name.prefix() + ": dtype " + dtype_name(t->dtype) + " differs from " +
                       "'large' " + dtype_name(l.dtype));
    }
  }
  if (l.shape.size() != 2) throw_value_error(l.name.prefix() + ": must be 2-D [B, V]");
  const int64_t B = l.shape[0], V = l.shape[1];
  if (V < 1) throw_value_error(l.name.prefix() + ": the vocabulary is empty");
  check_same_shape(s, l);
  if (x.shape.size() != 3 || x.shape[1] != B || x.shape[2] != V) {
    throw_value_error(x.name.prefix() + ": shape " + x.shape_str() + ", expected [T, " +
                      std::to_string(B) + ", " + std::to_string(V) + "]");
  }
  const int64_t T = x.shape[0];
  if (T < 1 || T > kLogitFusionMaxExperts) {
    throw_value_error(x.name.prefix() + ": needs 1 to " + std::to_string(kLogitFusionMaxExperts) +
                      " experts, got " + std::to_string(T));
  }
  const std::vector<double> grid = alphas.cast<std::vector<double>>();
  if (grid.empty() || grid.size() > size_t(kLogitFusionMaxAlphas)) {
    throw_value_error(std::string(kOp) + ": argument 'alphas': needs 1 to " +
                      std::to_string(kLogitFusionMaxAlphas) + " values, got " +
                      std::to_string(grid.size()));
  }
  for (double a : grid) {
    if (!std::isfinite(a)) throw_value_error(std::string(kOp) + ": argument 'alphas': not finite");
  }
  const int64_t n = int64_t(grid.size());
  const DType acc = l.dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  TensorArg tl = import_tensor(loss, {kOp, "loss"}, stream);
  check_fixed(tl, l, {B, T, n}, acc, true);
  TensorArg ta = import_tensor(alpha, {kOp, "alpha"}, stream);
  check_fixed(ta, l, {B}, acc, true);
  TensorArg te = import_tensor(expert, {kOp, "expert"}, stream);
  check_fixed(te, l, {B}, DType::kInt64, true);
  std::vector<TensorArg> inputs = {l, s, x};
  std::vector<const TensorArg*> outs = {&tl, &ta, &te};
  TensorArg tg;
  if (!logits.is_none()) {
    tg = import_tensor(logits, {kOp, "logits"}, stream);
    check_fixed(tg, l, {B, V}, acc, true);
    outs.push_back(&tg);
  }
  for (const TensorArg* o : outs) check_no_partial_overlap(*o, inputs);
  LogitFusionParams p;
  p.rows = B;
  p.vocab = V;
  p.num_experts = int(T);
  p.num_alphas = int(n);
  p.dtype = l.dtype;
  p.large = l.data;
  p.small = s.data;
  p.experts = x.data;
  for (int64_t j = 0; j < n; ++j) p.alphas[j] = grid[size_t(j)];
  const uint64_t all = n == 64 ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
  if (allowed.is_none()) {
    for (int64_t t = 0; t < T; ++t) p.allowed[t] = all;
  } else {
    std::vector<uint64_t> bits;
    try {
      bits = allowed.cast<std::vector<uint64_t>>();
    } catch (const py::cast_error&) {
      throw_type_error(std::string(kOp) + ": argument 'allowed': expected None or " +
                       std::to_string(T) + " non-negative ints (bit masks)");
    }
    if (int64_t(bits.size()) != T) {
      throw_value_error(std::string(kOp) + ": argument 'allowed': " + std::to_string(bits.size()) +
                        " masks for " + std::to_string(T) + " experts");
    }
    for (int64_t t = 0; t < T; ++t) {
      if ((bits[size_t(t)] & ~all) != 0) {
        throw_value_error(std::string(kOp) + ": argument 'allowed': mask " + std::to_string(t) +
                          " has bits beyond the " + std::to_string(n) + " grid points");
      }
      p.allowed[t] = bits[size_t(t)];
    }
  }
  p.loss = tl.data;
  p.alpha = ta.data;
  p.expert = static_cast<int64_t*>(te.data);
  p.logits = logits.is_none() ? nullptr : tg.data;
  if (B == 0) return;
  if (cuda) {
#ifdef MELDKIT_WITH_CUDA
    py::gil_scoped_release release;
    logit_fusion_cuda(p, l.device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    py::gil_scoped_release release;
    logit_fusion_cpu(p);
  }
}

}  // namespace meldkit::bind

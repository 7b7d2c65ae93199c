// Binding of blend in two steps (see blend.h): blend_plan validates every (out, base, tau) triple
// once and returns the plan's rows (addresses, sizes, chunk offsets, mask streams); blend_run
// takes those rows as an int64 [N, 8] tensor on the tensors' device and blends, releasing the
// GIL, with no per-tensor work. blend_run trusts its table: meldkit.ops.BlendPlan builds it from
// blend_plan and keeps the tensors it points to alive.
#include "meldkit/blend.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "ops.h"
#include "tensor.h"

namespace meldkit::bind {

namespace {
constexpr const char* kOp = "blend";
const DType* const kBegin = std::begin(kFloatDtypes);
const DType* const kEnd = std::end(kFloatDtypes);

py::sequence as_list(py::handle obj, const char* name) {
  if (!py::isinstance<py::sequence>(obj) || py::hasattr(obj, "__dlpack__")) {
    throw_type_error(std::string(kOp) + ": argument '" + name + "': expected a list");
  }
  return py::reinterpret_borrow<py::sequence>(obj);
}
}  // namespace

// One tensor's memory in the plan: [begin, end) bytes, which triple, and its role.
struct Span {
  uintptr_t begin, end;
  size_t index;
  int role;  // 0 out, 1 base, 2 tau
};

// Refuses an out that overlaps memory any other tensor of the plan uses: another out, any
// task vector, or a base other than exactly its own (an out may be its own base: in place).
// Bases and task vectors may overlap each other (tied weights are read twice). A sweep over
// the spans sorted by address: O(n log n) for the whole plan.
void check_plan_overlaps(std::vector<Span> spans) {
  static const char* const kRole[] = {"outs", "bases", "taus"};
  std::sort(spans.begin(), spans.end(),
            [](const Span& a, const Span& b) { return a.begin < b.begin; });
  std::vector<const Span*> open;
  for (const Span& s : spans) {
    open.erase(
        std::remove_if(open.begin(), open.end(), [&](const Span* o) { return o->end <= s.begin; }),
        open.end());
    for (const Span* o : open) {
      if (o->role != 0 && s.role != 0) continue;
      const Span& out = o->role == 0 ? *o : s;
      const Span& other = o->role == 0 ? s : *o;
      const bool own_base = other.role == 1 && other.index == out.index &&
                            other.begin == out.begin && other.end == out.end;
      if (own_base) continue;
      if (other.role == 2 && other.index == out.index) {
        throw_value_error(std::string(kOp) + ": argument 'outs[" + std::to_string(out.index) +
                          "]': may not be the task vector 'taus[" + std::to_string(out.index) +
                          "]' (nor overlap it)");
      }
      throw_value_error(std::string(kOp) + ": argument 'outs[" + std::to_string(out.index) +
                        "]': overlaps '" + kRole[other.role] + "[" + std::to_string(other.index) +
                        "]'; an out may be exactly its own base (in place) or separate memory");
    }
    open.push_back(&s);
  }
}

py::dict blend_native_dtypes() { return float_dtype_table(/*cpu_float64=*/false); }

py::tuple blend_plan(py::handle outs, py::handle bases, py::handle taus, py::handle dense,
                     py::handle streams1, py::handle streams2) {
  py::sequence so = as_list(outs, "outs"), sb = as_list(bases, "bases"), st = as_list(taus, "taus");
  const size_t n = sb.size();
  if (n == 0) throw_value_error(std::string(kOp) + ": argument 'bases': is empty");
  if (n > size_t(std::numeric_limits<int>::max())) {
    throw_value_error(std::string(kOp) + ": argument 'bases': too many tensors");
  }
  if (so.size() != n || st.size() != n) {
    throw_value_error(std::string(kOp) + ": arguments 'outs', 'bases' and 'taus' differ in length");
  }
  const std::vector<bool> dense_flags = dense.cast<std::vector<bool>>();
  const std::vector<uint32_t> s1 = streams1.cast<std::vector<uint32_t>>();
  const std::vector<uint32_t> s2 = streams2.cast<std::vector<uint32_t>>();
  if (dense_flags.size() != n || s1.size() != n || s2.size() != n) {
    throw_value_error(std::string(kOp) +
                      ": arguments 'dense', 'streams1' and 'streams2' need one entry per tensor");
  }
  std::vector<TensorArg> b_args;
  b_args.reserve(n);
  std::vector<int64_t> rows;
  rows.reserve(n * kBlendRowWords);
  int64_t chunks = 0;
  std::vector<Span> spans;
  spans.reserve(3 * n);
  for (size_t i = 0; i < n; ++i) {
    const std::string k = "[" + std::to_string(i) + "]";
    b_args.push_back(import_tensor(sb[i], {kOp, "bases" + k}, 0));
    const TensorArg t = import_tensor(st[i], {kOp, "taus" + k}, 0);
    const TensorArg o = import_tensor(so[i], {kOp, "outs" + k}, 0);
    const TensorArg& b = b_args.back();
    check_same_device(b, b_args[0]);
    check_dtype_in(b, kBegin, kEnd, b.device == DeviceKind::kCUDA ? "CUDA" : "CPU");
    if (b.dtype != b_args[0].dtype) {
      throw_type_error(b.name.prefix() + ": dtype " + dtype_name(b.dtype) + " differs from " +
                       "'bases[0]' " + dtype_name(b_args[0].dtype));
    }
    for (const TensorArg* x : {&t, &o}) {
      check_same_device(*x, b);
      check_same_shape(*x, b);
      if (x->dtype != b.dtype) {
        throw_type_error(x->name.prefix() + ": dtype " + dtype_name(x->dtype) + " differs from " +
                         b.name.prefix().substr(b.name.prefix().find('\'')) + " " +
                         dtype_name(b.dtype));
      }
    }
    check_contiguous(b);
    check_contiguous(t);
    check_contiguous(o);
    check_writable(o);
    for (const auto& [x, role] : {std::pair{&o, 0}, std::pair{&b, 1}, std::pair{&t, 2}}) {
      if (x->nbytes() == 0) continue;
      const auto begin = reinterpret_cast<uintptr_t>(x->data);
      spans.push_back({begin, begin + uintptr_t(x->nbytes()), i, role});
    }
    const int64_t numel = b.numel();
    rows.insert(rows.end(), {int64_t(reinterpret_cast<intptr_t>(o.data)),
                             int64_t(reinterpret_cast<intptr_t>(b.data)),
                             int64_t(reinterpret_cast<intptr_t>(t.data)), numel, chunks,
                             int64_t(s1[i]), int64_t(s2[i]), dense_flags[i] ? 1 : 0});
    chunks += (numel + kBlendChunk - 1) / kBlendChunk;
  }
  check_plan_overlaps(std::move(spans));
  if (b_args[0].device == DeviceKind::kCUDA && !has_cuda()) {
    throw_type_error(std::string(kOp) +
                     ": the tensors are on CUDA but meldkit was built without "
                     "CUDA");
  }
  return py::make_tuple(py::cast(rows), chunks);
}

void blend_run(py::handle table, int64_t num_chunks, py::handle like, py::handle g_table,
               float g_dense, float keep1, float keep2, bool draw1, bool draw2, uint64_t seed,
               int64_t stream) {
  const TensorArg l = import_tensor(like, {kOp, "like"}, stream);
  const TensorArg t = import_tensor(table, {kOp, "table"}, stream);
  check_same_device(t, l);
  check_dtype_in(l, kBegin, kEnd, l.device == DeviceKind::kCUDA ? "CUDA" : "CPU");
  if (t.dtype != DType::kInt64 || t.shape.size() != 2 || t.shape[1] != kBlendRowWords ||
      t.shape[0] < 1 || t.shape[0] > std::numeric_limits<int>::max()) {
    throw_value_error(t.name.prefix() + ": expected the int64 [N, 8] table of blend_plan, got " +
                      dtype_name(t.dtype) + " " + t.shape_str());
  }
  check_contiguous(t);
  if (num_chunks < 0) throw_value_error(std::string(kOp) + ": argument 'num_chunks' < 0");
  const std::vector<float> gt = import_floats(g_table, {kOp, "g_table"}, 4);
  for (float v : {g_dense, keep1, keep2}) {
    if (!std::isfinite(v)) throw_value_error(std::string(kOp) + ": coefficients must be finite");
  }
  const bool cuda = l.device == DeviceKind::kCUDA;
  if (cuda && !has_cuda()) {
    throw_type_error(std::string(kOp) +
                     ": the tensors are on CUDA but meldkit was built without "
                     "CUDA");
  }
  BlendParams p;
  p.rows = static_cast<const BlendRow*>(t.data);
  p.num_tensors = int(t.shape[0]);
  p.num_chunks = num_chunks;
  p.dtype = l.dtype;
  for (int k = 0; k < 4; ++k) p.g_table[k] = gt[size_t(k)];
  p.g_dense = g_dense;
  p.keep1 = keep1;
  p.keep2 = keep2;
  p.draw1 = draw1;
  p.draw2 = draw2;
  p.seed = seed;
  py::gil_scoped_release release;
  if (cuda) {
#ifdef MELDKIT_WITH_CUDA
    blend_cuda(p, l.device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    blend_cpu(p);
  }
}

}  // namespace meldkit::bind

// Binding of blend: validate every (out, base, tau) triple, precompute the stream keys, release
// the GIL, launch (see blend.h).
#include "meldkit/blend.h"

#include <pybind11/stl.h>

#include <cmath>
#include <string>
#include <vector>

#include "meldkit/random.h"
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

py::dict blend_native_dtypes() { return float_dtype_table(/*cpu_float64=*/false); }

void blend(py::handle outs, py::handle bases, py::handle taus, py::handle dense, py::handle g_table,
           float g_dense, float keep1, float keep2, bool draw1, bool draw2, uint64_t seed,
           py::handle streams1, py::handle streams2, int64_t stream) {
  py::sequence so = as_list(outs, "outs"), sb = as_list(bases, "bases"), st = as_list(taus, "taus");
  const size_t n = sb.size();
  if (n == 0) throw_value_error(std::string(kOp) + ": argument 'bases': is empty");
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
  const std::vector<float> table = import_floats(g_table, {kOp, "g_table"}, 4);
  for (float v : {g_dense, keep1, keep2}) {
    if (!std::isfinite(v)) throw_value_error(std::string(kOp) + ": coefficients must be finite");
  }

  std::vector<TensorArg> o_args, b_args, t_args;
  o_args.reserve(n);
  b_args.reserve(n);
  t_args.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string k = "[" + std::to_string(i) + "]";
    b_args.push_back(import_tensor(sb[i], {kOp, "bases" + k}, stream));
    t_args.push_back(import_tensor(st[i], {kOp, "taus" + k}, stream));
    o_args.push_back(import_tensor(so[i], {kOp, "outs" + k}, stream));
    const TensorArg &b = b_args.back(), &t = t_args.back(), &o = o_args.back();
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
    if (o.data == t.data && o.nbytes() > 0) {
      throw_value_error(o.name.prefix() + ": may not be the task vector 'taus" + k + "'");
    }
  }
  const bool cuda = b_args[0].device == DeviceKind::kCUDA;
  if (cuda && !has_cuda()) {
    throw_type_error(std::string(kOp) +
                     ": the tensors are on CUDA but meldkit was built without "
                     "CUDA");
  }

  std::vector<void*> out_ptrs(n);
  std::vector<const void*> base_ptrs(n), tau_ptrs(n);
  std::vector<int64_t> numels(n);
  std::vector<uint32_t> keys1(n), keys2(n);
  std::vector<uint8_t> dense_u8(n);
  for (size_t i = 0; i < n; ++i) {
    out_ptrs[i] = o_args[i].data;
    base_ptrs[i] = b_args[i].data;
    tau_ptrs[i] = t_args[i].data;
    numels[i] = b_args[i].numel();
    keys1[i] = stream_key(seed, s1[i]);
    keys2[i] = stream_key(seed, s2[i]);
    dense_u8[i] = dense_flags[i] ? 1 : 0;
  }
  BlendParams p;
  p.num_tensors = int(n);
  p.outs = out_ptrs.data();
  p.bases = base_ptrs.data();
  p.taus = tau_ptrs.data();
  p.numels = numels.data();
  p.keys1 = keys1.data();
  p.keys2 = keys2.data();
  p.dense = dense_u8.data();
  p.dtype = b_args[0].dtype;
  for (int k = 0; k < 4; ++k) p.g_table[k] = table[size_t(k)];
  p.g_dense = g_dense;
  p.keep1 = keep1;
  p.keep2 = keep2;
  p.draw1 = draw1;
  p.draw2 = draw2;
  py::gil_scoped_release release;
  if (cuda) {
#ifdef MELDKIT_WITH_CUDA
    blend_cuda(p, b_args[0].device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    blend_cpu(p);
  }
}

}  // namespace meldkit::bind

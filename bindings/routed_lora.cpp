// Bindings of routed_lora's forward and backward: validate, pick the device and stream, release
// the GIL, launch.
#include "meldkit/routed_lora.h"

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "ops.h"
#include "tensor.h"

namespace meldkit::bind {

namespace {

constexpr const char* kFwd = "routed_lora_forward";
constexpr const char* kBwd = "routed_lora_backward";
const DType* const kBegin = std::begin(kFloatDtypes);
const DType* const kEnd = std::end(kFloatDtypes);

void check_shape(const TensorArg& t, const std::vector<int64_t>& expected, const char* what) {
  if (t.shape != expected) {
    std::string want = "[";
    for (size_t i = 0; i < expected.size(); ++i) {
      want += (i ? ", " : "") + std::to_string(expected[i]);
    }
    throw_value_error(t.name.prefix() + ": shape " + t.shape_str() + ", expected " + want + "] " +
                      what);
  }
}

// Outputs may not share memory with any input or with each other.
void check_disjoint(const std::vector<const TensorArg*>& outs,
                    const std::vector<const TensorArg*>& all) {
  for (const TensorArg* o : outs) {
    const auto* lo = static_cast<const char*>(o->data);
    if (o->nbytes() == 0) continue;
    for (const TensorArg* t : all) {
      if (t == o || t->nbytes() == 0) continue;
      const auto* tlo = static_cast<const char*>(t->data);
      if (lo < tlo + t->nbytes() && tlo < lo + o->nbytes()) {
        throw_value_error(o->name.prefix() + ": overlaps '" + t->name.arg + "'");
      }
    }
  }
}

// Everything both passes take, imported and checked; params filled.
struct Call {
  TensorArg x, a, b, scaling, router, gates;
  bool has_router = false, has_gates = false, cuda = false, f64 = false;
  std::vector<const TensorArg*> all;
  RoutedLoraParams p;
};

TensorArg import_optional(py::handle obj, ArgName name, int64_t stream, bool* present) {
  *present = !obj.is_none();
  return *present ? import_tensor(obj, std::move(name), stream) : TensorArg{};
}

void import_common(const char* op, bool forward, Call& c, py::handle x, py::handle lora_a,
                   py::handle lora_b, py::handle scaling, py::handle router, py::handle gates,
                   int64_t top_k, double dropout, uint64_t seed, int64_t stream) {
  c.x = import_tensor(x, {op, "x"}, stream);
  c.a = import_tensor(lora_a, {op, "lora_a"}, stream);
  c.b = import_tensor(lora_b, {op, "lora_b"}, stream);
  c.scaling = import_tensor(scaling, {op, "scaling"}, stream);
  c.router = import_optional(router, {op, "router_weight"}, stream, &c.has_router);
  c.gates = import_optional(gates, {op, "gates"}, stream, &c.has_gates);
  c.cuda = c.x.device == DeviceKind::kCUDA;
  if (c.cuda && !has_cuda()) {
    throw_type_error(c.x.name.prefix() + ": is on CUDA but meldkit was built without CUDA");
  }
  c.f64 = c.x.dtype == DType::kFloat64 && !c.cuda;
  c.all = {&c.x, &c.a, &c.b, &c.scaling};
  if (c.has_router) c.all.push_back(&c.router);
  if (c.has_gates) c.all.push_back(&c.gates);
  for (const TensorArg* t : c.all) {
    check_contiguous(*t);
    check_same_device(*t, c.x);
    if (t == &c.scaling) continue;
    if (c.f64) {
      if (t->dtype != DType::kFloat64) {
        throw_type_error(t->name.prefix() + ": dtype " + dtype_name(t->dtype) +
                         "; with a float64 'x' every floating input is float64");
      }
    } else {
      check_dtype_in(*t, kBegin, kEnd, c.cuda ? "CUDA" : "CPU");
    }
  }
  const DType scaling_dtype = c.f64 ? DType::kFloat64 : DType::kFloat32;
  if (c.scaling.dtype != scaling_dtype) {
    throw_type_error(c.scaling.name.prefix() + ": must be " + dtype_name(scaling_dtype) + ", got " +
                     dtype_name(c.scaling.dtype));
  }
  // The backward pass takes no gates (their values are in `weights`): gate mode is no router.
  if (c.has_router == c.has_gates && (c.has_gates || forward)) {
    throw_value_error(std::string(op) +
                      ": exactly one of 'router_weight' and 'gates' must be given");
  }
  if (c.x.shape.size() != 2) throw_value_error(c.x.name.prefix() + ": must be 2-D [N, d_in]");
  if (c.a.shape.size() != 3) throw_value_error(c.a.name.prefix() + ": must be 3-D [E, R, d_in]");
  if (c.b.shape.size() != 3) {
    throw_value_error(c.b.name.prefix() + ": must be 3-D [E, d_out, R]");
  }
  const int64_t N = c.x.shape[0], din = c.x.shape[1], E = c.a.shape[0], R = c.a.shape[1];
  const int64_t dout = c.b.shape[1];
  if (E < 1 || E > kRoutedLoraMaxExperts) {
    throw_value_error(c.a.name.prefix() + ": needs 1 to " + std::to_string(kRoutedLoraMaxExperts) +
                      " experts, got " + std::to_string(E));
  }
  if (R < 1) throw_value_error(c.a.name.prefix() + ": rank must be at least 1");
  // The kernels hold these sizes in int.
  auto check_int_size = [](const TensorArg& t, const char* what, int64_t size) {
    constexpr int64_t kMax = std::numeric_limits<int>::max();
    if (size > kMax) {
      throw_value_error(t.name.prefix() + ": " + what + " " + std::to_string(size) + " exceeds " +
                        std::to_string(kMax));
    }
  };
  check_int_size(c.x, "d_in", din);
  check_int_size(c.b, "d_out", dout);
  check_int_size(c.a, "rank", R);
  check_shape(c.a, {E, R, din}, "(E, R, d_in of x)");
  check_shape(c.b, {E, dout, R}, "(E, d_out, R of lora_a)");
  check_shape(c.scaling, {E}, "(one scale per expert)");
  if (c.has_router) {
    check_shape(c.router, {E, din}, "(E, d_in)");
    if (top_k < 1 || top_k > E) {
      throw_value_error(std::string(op) + ": argument 'top_k': must be in [1, " +
                        std::to_string(E) + "], got " + std::to_string(top_k));
    }
  } else {
    if (c.has_gates) check_shape(c.gates, {N, E}, "(N, E)");
    if (top_k != 0) {
      throw_value_error(std::string(op) + ": argument 'top_k': must be 0 in gate mode");
    }
  }
  if (!(dropout >= 0.0 && dropout < 1.0)) {
    throw_value_error(std::string(op) + ": argument 'dropout': must be in [0, 1)");
  }
  RoutedLoraParams& p = c.p;
  p.num_tokens = N;
  p.d_in = int(din);
  p.d_out = int(dout);
  p.num_experts = int(E);
  p.rank = int(R);
  p.top_k = int(top_k);
  p.dropout = dropout;
  p.seed = seed;
  p.x = c.x.data;
  p.x_dtype = c.x.dtype;
  p.lora_a = c.a.data;
  p.a_dtype = c.a.dtype;
  p.lora_b = c.b.data;
  p.b_dtype = c.b.dtype;
  if (c.f64) {
    p.scaling_f64 = static_cast<const double*>(c.scaling.data);
  } else {
    p.scaling = static_cast<const float*>(c.scaling.data);
  }
  if (c.has_router) {
    p.router = c.router.data;
    p.router_dtype = c.router.dtype;
  } else {
    p.gates = c.gates.data;
    p.gates_dtype = c.gates.dtype;
  }
}

// An output (or an input saved by the forward) of a fixed shape and dtype.
TensorArg import_fixed(py::handle obj, ArgName name, int64_t stream, const Call& c,
                       const std::vector<int64_t>& shape, DType dtype, bool writable) {
  TensorArg t = import_tensor(obj, std::move(name), stream);
  check_fixed(t, c.x, shape, dtype, writable);
  return t;
}

}  // namespace

py::dict routed_lora_native_dtypes() { return float_dtype_table(/*cpu_float64=*/true); }

void routed_lora_forward(py::handle x, py::handle lora_a, py::handle lora_b, py::handle scaling,
                         py::handle router_weight, py::handle gates, int64_t top_k, double dropout,
                         uint64_t seed, py::handle y, py::handle probs, py::handle weights,
                         py::handle h, int64_t stream) {
  Call c;
  import_common(kFwd, true, c, x, lora_a, lora_b, scaling, router_weight, gates, top_k, dropout,
                seed, stream);
  RoutedLoraParams& p = c.p;
  const int64_t N = p.num_tokens, E = p.num_experts;
  const DType acc = c.f64 ? DType::kFloat64 : DType::kFloat32;
  TensorArg ty = import_fixed(y, {kFwd, "y"}, stream, c, {N, p.d_out}, c.x.dtype, true);
  TensorArg tw = import_fixed(weights, {kFwd, "weights"}, stream, c, {N, E}, acc, true);
  TensorArg th = import_fixed(h, {kFwd, "h"}, stream, c, {N, E * p.rank}, acc, true);
  TensorArg tp;
  std::vector<const TensorArg*> outs = {&ty, &tw, &th};
  if (c.has_router) {
    if (probs.is_none()) throw_value_error("routed_lora_forward: argument 'probs': is required");
    tp = import_fixed(probs, {kFwd, "probs"}, stream, c, {N, E}, acc, true);
    outs.push_back(&tp);
    p.probs = tp.data;
  }
  std::vector<const TensorArg*> everything = c.all;
  everything.insert(everything.end(), outs.begin(), outs.end());
  check_disjoint(outs, everything);
  p.y = ty.data;
  p.weights = tw.data;
  p.h = th.data;
  if (c.cuda) {
#ifdef MELDKIT_WITH_CUDA
    py::gil_scoped_release release;
    routed_lora_forward_cuda(p, c.x.device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    py::gil_scoped_release release;
    routed_lora_forward_cpu(p);
  }
}

void routed_lora_backward(py::handle dy, py::handle x, py::handle lora_a, py::handle lora_b,
                          py::handle scaling, py::handle router_weight, py::handle weights,
                          py::handle probs, py::handle dprobs, py::handle h, int64_t top_k,
                          double dropout, uint64_t seed, py::handle dx, py::handle da,
                          py::handle db, py::handle drouter, py::handle dgates, int64_t stream) {
  Call c;
  import_common(kBwd, false, c, x, lora_a, lora_b, scaling, router_weight, py::none(), top_k,
                dropout, seed, stream);
  RoutedLoraParams& p = c.p;
  const int64_t N = p.num_tokens, E = p.num_experts, R = p.rank;
  const DType acc = c.f64 ? DType::kFloat64 : DType::kFloat32;
  TensorArg tdy = import_fixed(dy, {kBwd, "dy"}, stream, c, {N, p.d_out}, c.x.dtype, false);
  TensorArg tw = import_fixed(weights, {kBwd, "weights"}, stream, c, {N, E}, acc, false);
  TensorArg th = import_fixed(h, {kBwd, "h"}, stream, c, {N, E * R}, acc, false);
  std::vector<const TensorArg*> ins = c.all;
  ins.insert(ins.end(), {&tdy, &tw, &th});
  TensorArg tp, tdp, tdx, tda, tdb, tdr, tdg;
  if (c.has_router) {
    if (probs.is_none()) throw_value_error("routed_lora_backward: argument 'probs': is required");
    tp = import_fixed(probs, {kBwd, "probs"}, stream, c, {N, E}, acc, false);
    ins.push_back(&tp);
    p.probs = tp.data;
    if (!dprobs.is_none()) {
      tdp = import_fixed(dprobs, {kBwd, "dprobs"}, stream, c, {N, E}, acc, false);
      ins.push_back(&tdp);
      p.dprobs = tdp.data;
    }
  } else if (!dprobs.is_none()) {
    throw_value_error("routed_lora_backward: argument 'dprobs': only in router mode");
  }
  std::vector<const TensorArg*> outs;
  if (!dx.is_none()) {
    tdx = import_fixed(dx, {kBwd, "dx"}, stream, c, {N, p.d_in}, c.x.dtype, true);
    outs.push_back(&tdx);
    p.dx = tdx.data;
  }
  if (!da.is_none()) {
    tda = import_fixed(da, {kBwd, "da"}, stream, c, c.a.shape, c.a.dtype, true);
    outs.push_back(&tda);
    p.da = tda.data;
  }
  if (!db.is_none()) {
    tdb = import_fixed(db, {kBwd, "db"}, stream, c, c.b.shape, c.b.dtype, true);
    outs.push_back(&tdb);
    p.db = tdb.data;
  }
  if (!drouter.is_none()) {
    if (!c.has_router) {
      throw_value_error("routed_lora_backward: argument 'drouter': only in router mode");
    }
    tdr = import_fixed(drouter, {kBwd, "drouter"}, stream, c, c.router.shape, c.router.dtype, true);
    outs.push_back(&tdr);
    p.drouter = tdr.data;
  }
  if (!dgates.is_none()) {
    if (c.has_router) {
      throw_value_error("routed_lora_backward: argument 'dgates': only in gate mode");
    }
    tdg = import_tensor(dgates, {kBwd, "dgates"}, stream);
    check_same_device(tdg, c.x);
    check_contiguous(tdg);
    check_writable(tdg);
    check_shape(tdg, {N, E}, "(N, E)");
    if (c.f64) {
      if (tdg.dtype != DType::kFloat64) {
        throw_type_error(tdg.name.prefix() + ": must be float64 with a float64 'x'");
      }
    } else {
      check_dtype_in(tdg, kBegin, kEnd, c.cuda ? "CUDA" : "CPU");
    }
    outs.push_back(&tdg);
    p.dgates = tdg.data;
    p.gates_dtype = tdg.dtype;
  }
  std::vector<const TensorArg*> everything = ins;
  everything.insert(everything.end(), outs.begin(), outs.end());
  check_disjoint(outs, everything);
  p.dy = tdy.data;
  p.weights = const_cast<void*>(tw.data);
  p.h = const_cast<void*>(th.data);
  if (c.cuda) {
#ifdef MELDKIT_WITH_CUDA
    py::gil_scoped_release release;
    routed_lora_backward_cuda(p, c.x.device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    py::gil_scoped_release release;
    routed_lora_backward_cpu(p);
  }
}

void routed_lora_dropout(py::handle src, py::handle out, double dropout, uint64_t seed,
                         int64_t expert, int64_t stream) {
  constexpr const char* kOp = "routed_lora_dropout";
  const TensorArg ts = import_tensor(src, {kOp, "src"}, stream);
  const TensorArg to = import_tensor(out, {kOp, "out"}, stream);
  if (ts.device == DeviceKind::kCUDA && !has_cuda()) {
    throw_type_error(ts.name.prefix() + ": is on CUDA but meldkit was built without CUDA");
  }
  if (ts.shape.size() != 2) {
    throw_value_error(ts.name.prefix() + ": expected 2 dims [rows, cols], got shape " +
                      ts.shape_str());
  }
  if (ts.dtype != DType::kFloat32 && ts.dtype != DType::kFloat64) {
    throw_type_error(ts.name.prefix() + ": dtype " + dtype_name(ts.dtype) +
                     " is not a compute dtype (float32 or float64)");
  }
  check_same_device(to, ts);
  check_same_shape(to, ts);
  if (to.dtype != ts.dtype) {
    throw_type_error(to.name.prefix() + ": dtype " + dtype_name(to.dtype) + " differs from " +
                     "'src' " + dtype_name(ts.dtype));
  }
  check_contiguous(ts);
  check_contiguous(to);
  check_writable(to);
  check_no_partial_overlap(to, {ts});  // out may be src itself, not a shifted view of it
  if (!(dropout > 0.0 && dropout < 1.0)) {
    throw_value_error(std::string(kOp) + ": argument 'dropout': " + std::to_string(dropout) +
                      " is not in (0, 1)");
  }
  if (expert < 0 || expert > int64_t(UINT32_MAX)) {
    throw_value_error(std::string(kOp) + ": argument 'expert': " + std::to_string(expert) +
                      " is not in [0, 2**32)");
  }
  DropoutApplyParams p;
  p.src = ts.data;
  p.out = to.data;
  p.rows = ts.shape[0];
  p.cols = ts.shape[1];
  p.dtype = ts.dtype;
  p.dropout = dropout;
  p.seed = seed;
  p.expert = uint32_t(expert);
  py::gil_scoped_release release;
  if (ts.device == DeviceKind::kCUDA) {
#ifdef MELDKIT_WITH_CUDA
    dropout_apply_cuda(p, ts.device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    dropout_apply_cpu(p);
  }
}

}  // namespace meldkit::bind

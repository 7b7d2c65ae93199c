// Bindings of the merge family: task_merge (one fused pass), merge_many (the whole pipeline over
// a list of tensors) and magnitude_select. Validate, pick the
// device and stream, release the GIL, launch.
#include "meldkit/merge.h"

#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "meldkit/side_writes.h"
#include "ops.h"
#include "tensor.h"

namespace meldkit::bind {

namespace {

const DType* const kBegin = std::begin(kFloatDtypes);
const DType* const kEnd = std::end(kFloatDtypes);

// The tensors of one merge call: base, then the N models, all alike (shape, dtype, device).
struct MergeInputs {
  TensorArg base;
  std::vector<TensorArg> models;
  std::vector<const void*> ptrs;
  bool cuda = false;
};

MergeInputs import_merge_inputs(const char* op, py::handle base, py::handle models,
                                int64_t stream) {
  MergeInputs in;
  in.base = import_tensor(base, {op, "base"}, stream);
  check_contiguous(in.base);
  in.cuda = in.base.device == DeviceKind::kCUDA;
  if (in.cuda && !has_cuda()) {
    throw_type_error(std::string(op) +
                     ": argument 'base': is on CUDA but meldkit was built "
                     "without CUDA");
  }
  check_dtype_in(in.base, kBegin, kEnd, in.cuda ? "CUDA" : "CPU");
  if (!py::isinstance<py::sequence>(models) || py::hasattr(models, "__dlpack__")) {
    throw_type_error(std::string(op) + ": argument 'models': expected a list of tensors");
  }
  auto seq = py::reinterpret_borrow<py::sequence>(models);
  if (seq.size() == 0) throw_value_error(std::string(op) + ": argument 'models': is empty");
  if (seq.size() > size_t(kMergeMaxModels)) {
    throw_value_error(std::string(op) + ": argument 'models': at most " +
                      std::to_string(kMergeMaxModels) + " per call, got " +
                      std::to_string(seq.size()));
  }
  for (size_t i = 0; i < seq.size(); ++i) {
    in.models.push_back(import_tensor(seq[i], {op, "models[" + std::to_string(i) + "]"}, stream));
    const TensorArg& t = in.models.back();
    check_same_device(t, in.base);
    check_same_shape(t, in.base);
    if (t.dtype != in.base.dtype) {
      throw_type_error(t.name.prefix() + ": dtype " + dtype_name(t.dtype) + " differs from " +
                       "'base' " + dtype_name(in.base.dtype));
    }
    check_contiguous(t);
    in.ptrs.push_back(t.data);
  }
  return in;
}

// The output of one merge: like base (shape, device, contiguous), any float dtype; it may be
// exactly `base` (read first, per element) but not a model, nor overlap one partially.
TensorArg import_merge_out(const char* op, py::handle out, const MergeInputs& in, int64_t stream) {
  TensorArg o = import_tensor(out, {op, "out"}, stream);
  check_same_device(o, in.base);
  check_same_shape(o, in.base);
  check_contiguous(o);
  check_writable(o);
  check_dtype_in(o, kBegin, kEnd, in.cuda ? "CUDA" : "CPU");
  for (const TensorArg& m : in.models) {
    if (m.data == o.data && o.nbytes() > 0) {
      throw_value_error(o.name.prefix() + ": may be 'base' but not one of the models");
    }
  }
  std::vector<TensorArg> all = in.models;
  all.push_back(in.base);
  check_no_partial_overlap(o, all);
  return o;
}

std::vector<float> optional_floats(py::handle obj, const char* op, const char* name, size_t n,
                                   bool required, bool allow_inf = false) {
  if (obj.is_none()) {
    if (required) throw_value_error(std::string(op) + ": argument '" + name + "': is required");
    return {};
  }
  return import_floats(obj, {op, name}, n, allow_inf);
}

Sparsify parse_sparsify(const std::string& s) {
  if (s == "none") return Sparsify::kNone;
  if (s == "magnitude") return Sparsify::kMagnitude;
  if (s == "random") return Sparsify::kRandom;
  throw_value_error("task_merge: argument 'sparsify': must be none, magnitude or random, got '" +
                    s + "'");
}

Consensus parse_consensus(const std::string& s) {
  if (s == "none") return Consensus::kNone;
  if (s == "sum") return Consensus::kSum;
  if (s == "count") return Consensus::kCount;
  throw_value_error("task_merge: argument 'consensus': must be none, sum or count, got '" + s +
                    "'");
}

// Fills the per-model mask parts of TaskMergeParams for task_merge.
struct SparsifyArgs {
  std::vector<float> thresholds, densities;
  std::vector<uint32_t> streams;
};

SparsifyArgs import_sparsify(const char* op, Sparsify sparsify, size_t n, py::handle thresholds,
                             py::handle densities, py::handle streams, TaskMergeParams& p) {
  SparsifyArgs s;
  // +-inf are valid thresholds (keep nothing / everything); NaN is not.
  s.thresholds = optional_floats(thresholds, op, "thresholds", n, sparsify == Sparsify::kMagnitude,
                                 /*allow_inf=*/true);
  s.densities = optional_floats(densities, op, "densities", n, sparsify == Sparsify::kRandom);
  if (sparsify == Sparsify::kRandom) {
    for (size_t t = 0; t < n; ++t) {
      if (!(s.densities[t] >= 0.f && s.densities[t] <= 1.f)) {
        throw_value_error(std::string(op) + ": argument 'densities[" + std::to_string(t) +
                          "]': must be in [0, 1]");
      }
    }
    if (streams.is_none()) {
      throw_value_error(std::string(op) + ": argument 'streams': is required for random masks");
    }
    s.streams = streams.cast<std::vector<uint32_t>>();
    if (s.streams.size() != n) {
      throw_value_error(std::string(op) + ": argument 'streams': has " +
                        std::to_string(s.streams.size()) + " entries for " + std::to_string(n) +
                        " models");
    }
  }
  p.sparsify = sparsify;
  p.thresholds = s.thresholds.empty() ? nullptr : s.thresholds.data();
  p.densities = s.densities.empty() ? nullptr : s.densities.data();
  p.streams = s.streams.empty() ? nullptr : s.streams.data();
  return s;
}

}  // namespace

py::dict merge_native_dtypes() { return float_dtype_table(/*cpu_float64=*/false); }

void task_merge(py::handle base, py::handle models, py::handle out, py::handle weights,
                py::handle scales, py::handle thresholds, py::handle densities, uint64_t seed,
                py::handle streams, const std::string& sparsify, const std::string& consensus,
                bool normalize, float lam, int64_t stream) {
  constexpr const char* kOp = "task_merge";
  MergeInputs in = import_merge_inputs(kOp, base, models, stream);
  const size_t n = in.models.size();
  TaskMergeParams p;
  std::vector<float> w = import_floats(weights, {kOp, "weights"}, n);
  std::vector<float> sc = import_floats(scales, {kOp, "scales"}, n);
  const SparsifyArgs storage =
      import_sparsify(kOp, parse_sparsify(sparsify), n, thresholds, densities, streams, p);
  if (!std::isfinite(lam)) throw_value_error("task_merge: argument 'lam': must be finite");

  TensorArg o = import_merge_out(kOp, out, in, stream);

  p.numel = in.base.numel();
  p.num_models = int(n);
  p.base = in.base.data;
  p.models = in.ptrs.data();
  p.in_dtype = in.base.dtype;
  p.out = o.data;
  p.out_dtype = o.dtype;
  p.consensus = parse_consensus(consensus);
  p.normalize = normalize;
  p.lambda = lam;
  p.weights = w.data();
  p.scales = sc.data();
  p.seed = seed;
  if (p.numel == 0) return;
  if (in.cuda) {
#ifdef MELDKIT_WITH_CUDA
    py::gil_scoped_release release;
    task_merge_cuda(p, in.base.device_id, reinterpret_cast<void*>(stream));
#endif
  } else {
    py::gil_scoped_release release;
    task_merge_cpu(p);
  }
}

int64_t merge_many_workspace_numel(int64_t num_models, int64_t max_numel) {
  if (num_models < 0 || max_numel < 0) {
    throw_value_error("merge_many_workspace_numel: num_models and max_numel must be >= 0");
  }
  // The L1 pass's partial sums, or the magnitude selection's counters for every model.
  return std::max<int64_t>(task_l1_cuda_partials(max_numel, num_models),
                           std::max<int64_t>(num_models, 1) * kMagnitudeSelectCudaWorkspace);
}

void merge_many(py::handle bases, py::handle models, py::handle outs, py::handle weights,
                py::handle densities, py::handle thresholds, const std::string& sparsify,
                const std::string& consensus, bool normalize, const std::string& rescale, float lam,
                uint64_t seed, py::handle tensor_indices, py::handle workspace, int64_t stream,
                bool exact_k) {
  constexpr const char* kOp = "merge_many";
  auto as_list = [](py::handle obj, const char* name) {
    if (!py::isinstance<py::sequence>(obj) || py::hasattr(obj, "__dlpack__")) {
      throw_type_error(std::string(kOp) + ": argument '" + name + "': expected a list");
    }
    return py::reinterpret_borrow<py::sequence>(obj);
  };
  py::sequence sb = as_list(bases, "bases"), sm = as_list(models, "models"),
               so = as_list(outs, "outs");
  const size_t num_tensors = sb.size();
  if (num_tensors == 0) throw_value_error(std::string(kOp) + ": argument 'bases': is empty");
  if (sm.size() == 0) throw_value_error(std::string(kOp) + ": argument 'models': is empty");
  if (sm.size() > size_t(kMergeMaxModels)) {
    throw_value_error(std::string(kOp) + ": argument 'models': at most " +
                      std::to_string(kMergeMaxModels) + " models, got " +
                      std::to_string(sm.size()));
  }
  const size_t n = sm.size();
  std::vector<py::sequence> per_model;
  for (size_t t = 0; t < n; ++t) {
    per_model.push_back(as_list(sm[t], "models[t]"));
    if (per_model.back().size() != num_tensors) {
      throw_value_error(std::string(kOp) + ": argument 'models[" + std::to_string(t) + "]': has " +
                        std::to_string(per_model.back().size()) + " tensors for " +
                        std::to_string(num_tensors) + " bases");
    }
  }
  if (so.size() != num_tensors) {
    throw_value_error(std::string(kOp) + ": argument 'outs': has " + std::to_string(so.size()) +
                      " tensors for " + std::to_string(num_tensors) + " bases");
  }
  const std::vector<uint32_t> indices = tensor_indices.cast<std::vector<uint32_t>>();
  if (indices.size() != num_tensors) {
    throw_value_error(std::string(kOp) + ": argument 'tensor_indices': has " +
                      std::to_string(indices.size()) + " entries for " +
                      std::to_string(num_tensors) + " bases");
  }
  const Sparsify sp = parse_sparsify(sparsify);
  if (rescale != "none" && rescale != "inverse_density" && rescale != "l1") {
    throw_value_error(std::string(kOp) +
                      ": argument 'rescale': must be none, inverse_density or l1, got '" + rescale +
                      "'");
  }
  const std::vector<float> w = import_floats(weights, {kOp, "weights"}, n);
  // Densities stay double: k = int(numel * density) must truncate as Python's does.
  const std::vector<double> dens = densities.cast<std::vector<double>>();
  if (dens.size() != n) throw_value_error(std::string(kOp) + ": argument 'densities': wrong count");
  for (size_t t = 0; t < n; ++t) {
    if (!(dens[t] >= 0.0 && dens[t] <= 1.0)) {
      throw_value_error(std::string(kOp) + ": argument 'densities[" + std::to_string(t) +
                        "]': must be in [0, 1]");
    }
  }
  std::vector<float> dens_f(dens.begin(), dens.end());
  // Precomputed (global) thresholds apply to every tensor; otherwise each tensor selects its own.
  const std::vector<float> given_thr =
      optional_floats(thresholds, kOp, "thresholds", n, false, /*allow_inf=*/true);
  if (!std::isfinite(lam)) throw_value_error(std::string(kOp) + ": argument 'lam': must be finite");

  std::vector<MergeInputs> inputs;
  std::vector<TensorArg> out_args;
  for (size_t j = 0; j < num_tensors; ++j) {
    py::list column;
    for (size_t t = 0; t < n; ++t) column.append(per_model[t][j]);
    inputs.push_back(import_merge_inputs(kOp, sb[j], column, stream));
    out_args.push_back(import_merge_out(kOp, so[j], inputs.back(), stream));
    if (j > 0) check_same_device(inputs.back().base, inputs[0].base);
  }
  const bool cuda = inputs[0].cuda;
  TensorArg ws;
  if (cuda) {
    int64_t max_numel = 0;
    for (const MergeInputs& in : inputs) max_numel = std::max(max_numel, in.base.numel());
    const int64_t need = merge_many_workspace_numel(int64_t(n), max_numel);
    if (workspace.is_none()) {
      throw_value_error(std::string(kOp) + ": argument 'workspace': CUDA needs a float64 " +
                        "workspace of " + std::to_string(need) + " elements");
    }
    ws = import_tensor(workspace, {kOp, "workspace"}, stream);
    check_same_device(ws, inputs[0].base);
    check_contiguous(ws);
    check_writable(ws);
    if (ws.dtype != DType::kFloat64 || ws.numel() < need) {
      throw_value_error(ws.name.prefix() + ": must be float64 with at least " +
                        std::to_string(need) + " elements");
    }
    std::vector<TensorArg> others = out_args;
    for (const MergeInputs& in : inputs) {
      others.push_back(in.base);
      others.insert(others.end(), in.models.begin(), in.models.end());
    }
    check_no_overlap(ws, others);
  }
  const Consensus cs = parse_consensus(consensus);
  // mergekit's exactly-k rule: per-tensor selections on the CPU, the mask's rescale not
  // depending on it (the L1 pass does not take the cutoffs).
  if (exact_k && (cuda || sp != Sparsify::kMagnitude || !given_thr.empty() || rescale == "l1")) {
    throw_value_error(std::string(kOp) +
                      ": argument 'exact_k': needs CPU tensors, magnitude masks selected per "
                      "tensor and no L1 rescale");
  }

  py::gil_scoped_release release;
  std::vector<float> thr(n), scales(n);
  std::vector<uint32_t> streams(n);
  std::vector<double> norms(2 * n);
  // DARE with L1 rescaling on the CPU: the L1 pass keeps its mask bits for the merge pass (one
  // byte per element of the largest tensor) instead of both passes drawing every mask.
  std::vector<uint8_t> mask_bits;
  if (!cuda && sp == Sparsify::kRandom && rescale == "l1" && n <= size_t(kMaskBitsMaxModels)) {
    int64_t largest = 0;
    for (const MergeInputs& in : inputs) largest = std::max(largest, in.base.numel());
    mask_bits.resize(size_t(largest));
  }
  std::vector<int64_t> cutoffs(n);
  for (size_t j = 0; j < num_tensors; ++j) {
    const MergeInputs& in = inputs[j];
    TaskMergeParams p;
    p.numel = in.base.numel();
    p.num_models = int(n);
    p.base = in.base.data;
    p.models = in.ptrs.data();
    p.in_dtype = in.base.dtype;
    p.out = out_args[j].data;
    p.out_dtype = out_args[j].dtype;
    p.sparsify = sp;
    p.consensus = cs;
    p.normalize = normalize;
    p.lambda = lam;
    p.weights = w.data();
    p.seed = seed;
    if (p.numel == 0) continue;
    if (sp == Sparsify::kMagnitude) {
      // Every model in one call: on the CPU one fused pass reads the base once; on CUDA each
      // radix pass covers every model in one launch and one read-back.
      std::vector<const void*> sel_ptrs;
      std::vector<int64_t> sel_ks;
      std::vector<size_t> sel_models;
      if (exact_k) {
        // A model that keeps nothing (k <= 0) gets the cutoff 0: its threshold is +inf, and
        // +inf entries equal to it must not be kept either. The others default to keeping
        // every tie until the selection below finds their cutoffs.
        std::fill(cutoffs.begin(), cutoffs.end(), p.numel);
        p.tie_cutoffs = cutoffs.data();
      }
      for (size_t t = 0; t < n; ++t) {
        if (!given_thr.empty()) {
          thr[t] = given_thr[t];
          continue;
        }
        int64_t k = int64_t(double(p.numel) * dens[t]);
        // mergekit's magnitude keeps at least one entry of a non-empty tensor (exact_k is its rule)
        if (exact_k && dens[t] > 0.0) k = std::max<int64_t>(k, 1);
        if (k <= 0) {
          thr[t] = INFINITY;
          if (exact_k) cutoffs[t] = 0;
        } else if (k >= p.numel) {
          thr[t] = -INFINITY;
        } else {
          sel_ptrs.push_back(in.ptrs[t]);
          sel_ks.push_back(k);
          sel_models.push_back(t);
        }
      }
      if (cuda && !sel_models.empty()) {  // every model's passes together: 3 synchronisations
        const size_t m = sel_models.size();
        std::vector<uint32_t> bits(m);
#ifdef MELDKIT_WITH_CUDA
        magnitude_select_models_cuda(p.base, sel_ptrs.data(), int(m), p.numel, p.in_dtype,
                                     sel_ks.data(), bits.data(),
                                     static_cast<unsigned long long*>(ws.data), in.base.device_id,
                                     reinterpret_cast<void*>(stream));
#endif
        for (size_t i = 0; i < m; ++i) std::memcpy(&thr[sel_models[i]], &bits[i], sizeof(float));
      } else if (!sel_models.empty()) {
        const size_t m = sel_models.size();
        std::vector<uint32_t> bits(m);
        std::vector<int64_t> sel_cut(m, -1);
        magnitude_select_models_cpu(p.base, sel_ptrs.data(), int(m), p.numel, p.in_dtype,
                                    sel_ks.data(), bits.data(), exact_k ? sel_cut.data() : nullptr);
        for (size_t i = 0; i < m; ++i) std::memcpy(&thr[sel_models[i]], &bits[i], sizeof(float));
        if (exact_k) {  // models with k <= 0 or k >= numel keep none or all: no cutoff
          // The selection's pass found the cutoffs of thresholds on its brackets' ends; one
          // counting pass finds the others.
          std::vector<const void*> rest_ptrs;
          std::vector<int64_t> rest_ks;
          std::vector<uint32_t> rest_bits;
          std::vector<size_t> rest;
          for (size_t i = 0; i < m; ++i) {
            if (sel_cut[i] >= 0) continue;
            rest.push_back(i);
            rest_ptrs.push_back(sel_ptrs[i]);
            rest_ks.push_back(sel_ks[i]);
            rest_bits.push_back(bits[i]);
          }
          if (!rest.empty()) {
            std::vector<int64_t> rest_cut(rest.size());
            magnitude_tie_cutoffs_cpu(p.base, rest_ptrs.data(), int(rest.size()), p.numel,
                                      p.in_dtype, rest_bits.data(), rest_ks.data(),
                                      rest_cut.data());
            for (size_t r = 0; r < rest.size(); ++r) sel_cut[rest[r]] = rest_cut[r];
          }
          for (size_t i = 0; i < m; ++i) cutoffs[sel_models[i]] = sel_cut[i];
        }
      }
      p.thresholds = thr.data();
    } else if (sp == Sparsify::kRandom) {
      for (size_t t = 0; t < n; ++t) {
        streams[t] = uint32_t(uint64_t(indices[j]) * n + t);  // merge_ref.stream_of
      }
      p.densities = dens_f.data();
      p.streams = streams.data();
    }
    for (size_t t = 0; t < n; ++t) scales[t] = 1.f;
    if (sp != Sparsify::kNone && rescale == "inverse_density") {
      for (size_t t = 0; t < n; ++t) scales[t] = dens[t] > 0 ? float(1.0 / dens[t]) : 1.f;
    } else if (sp != Sparsify::kNone && rescale == "l1") {
      if (cuda) {
#ifdef MELDKIT_WITH_CUDA
        task_l1_cuda(p, static_cast<double*>(ws.data), norms.data(), in.base.device_id,
                     reinterpret_cast<void*>(stream));
#endif
      } else {
        p.mask_bits = mask_bits.empty() ? nullptr : mask_bits.data();
        task_l1_cpu(p, norms.data());
      }
      for (size_t t = 0; t < n; ++t) {
        // As the reference: unscaled when nothing was kept; a factor not finite in float32 (NaN
        // or +-inf in tau, or an overflowing ratio) is NaN, which makes every element NaN.
        const float f = norms[2 * t + 1] == 0 ? 1.f : float(norms[2 * t] / norms[2 * t + 1]);
        scales[t] = std::isfinite(f) ? f : NAN;
      }
    }
    p.scales = scales.data();
    if (cuda) {
#ifdef MELDKIT_WITH_CUDA
      task_merge_cuda(p, in.base.device_id, reinterpret_cast<void*>(stream));
#endif
    } else {
      task_merge_cpu(p);
    }
  }
}

float magnitude_select(py::handle a, py::handle b, int64_t k, py::handle workspace,
                       int64_t stream) {
  constexpr const char* kOp = "magnitude_select";
  if (!py::isinstance<py::sequence>(a) || py::hasattr(a, "__dlpack__")) {
    throw_type_error(std::string(kOp) + ": argument 'a': expected a list of tensors");
  }
  auto sa = py::reinterpret_borrow<py::sequence>(a);
  if (sa.size() == 0) throw_value_error(std::string(kOp) + ": argument 'a': is empty");
  const bool has_b = !b.is_none();
  py::sequence sb;
  if (has_b) {
    if (!py::isinstance<py::sequence>(b) || py::hasattr(b, "__dlpack__")) {
      throw_type_error(std::string(kOp) + ": argument 'b': expected a list of tensors or None");
    }
    sb = py::reinterpret_borrow<py::sequence>(b);
    if (sb.size() != sa.size()) {
      throw_value_error(std::string(kOp) + ": argument 'b': has " + std::to_string(sb.size()) +
                        " tensors for " + std::to_string(sa.size()) + " in 'a'");
    }
  }
  std::vector<TensorArg> ta, tb;
  std::vector<const void*> pa, pb;
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (size_t i = 0; i < sa.size(); ++i) {
    ta.push_back(import_tensor(sa[i], {kOp, "a[" + std::to_string(i) + "]"}, stream));
    check_contiguous(ta.back());
    if (i > 0) {
      check_same_device(ta.back(), ta[0]);
      if (ta.back().dtype != ta[0].dtype) {
        throw_type_error(ta.back().name.prefix() + ": dtype differs from 'a[0]'");
      }
    }
    if (has_b) {
      tb.push_back(import_tensor(sb[i], {kOp, "b[" + std::to_string(i) + "]"}, stream));
      check_same_device(tb.back(), ta[0]);
      check_same_shape(tb.back(), ta.back());
      check_contiguous(tb.back());
      if (tb.back().dtype != ta[0].dtype) {
        throw_type_error(tb.back().name.prefix() + ": dtype differs from 'a[0]'");
      }
      pb.push_back(tb.back().data);
    }
    pa.push_back(ta.back().data);
    numels.push_back(ta.back().numel());
    total += numels.back();
  }
  const bool cuda = ta[0].device == DeviceKind::kCUDA;
  if (cuda && !has_cuda()) {
    throw_type_error(std::string(kOp) +
                     ": argument 'a': is on CUDA but meldkit was built "
                     "without CUDA");
  }
  check_dtype_in(ta[0], kBegin, kEnd, cuda ? "CUDA" : "CPU");
  if (k < 1 || k > total) {
    throw_value_error(std::string(kOp) + ": argument 'k': must be in [1, " + std::to_string(total) +
                      "], got " + std::to_string(k));
  }
  MagnitudeSelectParams p;
  p.num_tensors = int(ta.size());
  p.a = pa.data();
  p.b = has_b ? pb.data() : nullptr;
  p.numels = numels.data();
  p.dtype = ta[0].dtype;
  p.k = k;
  uint32_t bits = 0;
  if (cuda) {
#ifdef MELDKIT_WITH_CUDA
    if (workspace.is_none()) {
      throw_value_error(std::string(kOp) +
                        ": argument 'workspace': CUDA needs a float64 "
                        "workspace (used as counters) of " +
                        std::to_string(kMagnitudeSelectCudaWorkspace) + " elements");
    }
    TensorArg ws = import_tensor(workspace, {kOp, "workspace"}, stream);
    check_same_device(ws, ta[0]);
    check_contiguous(ws);
    check_writable(ws);
    if (ws.dtype != DType::kFloat64 || ws.numel() < kMagnitudeSelectCudaWorkspace) {
      throw_value_error(ws.name.prefix() + ": must be float64 with at least " +
                        std::to_string(kMagnitudeSelectCudaWorkspace) + " elements");
    }
    std::vector<TensorArg> others(ta.begin(), ta.end());
    others.insert(others.end(), tb.begin(), tb.end());
    check_no_overlap(ws, others);
    py::gil_scoped_release release;
    bits = magnitude_select_cuda(p, static_cast<unsigned long long*>(ws.data), ta[0].device_id,
                                 reinterpret_cast<void*>(stream));
#endif
  } else {
    py::gil_scoped_release release;
    bits = magnitude_select_cpu(p);
  }
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

namespace {

// theta, base and out of the CPU-only selections (band_select, della_select): CPU, one float
// dtype and shape, contiguous, out writable and distinct from both inputs.
struct SelectTensors {
  TensorArg theta, base, out;
};

SelectTensors import_select_tensors(const char* op, py::handle theta, py::handle base,
                                    py::handle out, const char* kernel, const char* elsewhere) {
  SelectTensors in{import_tensor(theta, {op, "theta"}, 0), import_tensor(base, {op, "base"}, 0),
                   import_tensor(out, {op, "out"}, 0)};
  const TensorArg &t = in.theta, &b = in.base, &o = in.out;
  if (t.device != DeviceKind::kCPU) {
    throw_type_error(t.name.prefix() + ": " + kernel + " runs on the CPU; meldkit.ops uses " +
                     elsewhere + " on " + t.device_str());
  }
  check_dtype_in(t, kBegin, kEnd, "CPU");
  for (const TensorArg* x : {&b, &o}) {
    check_same_device(*x, t);
    check_same_shape(*x, t);
    if (x->dtype != t.dtype) {
      throw_type_error(x->name.prefix() + ": dtype " + dtype_name(x->dtype) + " differs from " +
                       "'theta' " + dtype_name(t.dtype));
    }
  }
  check_contiguous(t);
  check_contiguous(b);
  check_contiguous(o);
  check_writable(o);
  if (o.nbytes() > 0 && (o.data == t.data || o.data == b.data)) {
    throw_value_error(o.name.prefix() + ": may not be 'theta' or 'base'");
  }
  return in;
}

}  // namespace

int64_t magnitude_histogram(py::handle theta, py::handle base, py::handle hist, int64_t prefix) {
  constexpr const char* kOp = "magnitude_histogram";
  const TensorArg t = import_tensor(theta, {kOp, "theta"}, 0);
  const TensorArg b = import_tensor(base, {kOp, "base"}, 0);
  const TensorArg h = import_tensor(hist, {kOp, "hist"}, 0);
  for (const TensorArg* x : {&t, &h}) {
    if (x->device != DeviceKind::kCPU) {
      throw_type_error(x->name.prefix() + ": the histogram kernel runs on the CPU, not on " +
                       x->device_str());
    }
  }
  check_dtype_in(t, kBegin, kEnd, "CPU");
  check_same_device(b, t);
  check_same_shape(b, t);
  if (b.dtype != t.dtype) {
    throw_type_error(b.name.prefix() + ": dtype " + dtype_name(b.dtype) + " differs from " +
                     "'theta' " + dtype_name(t.dtype));
  }
  if (h.dtype != DType::kInt64 || h.numel() != kRadixBins) {
    throw_type_error(h.name.prefix() + ": expected " + std::to_string(kRadixBins) +
                     " int64 counts, got " + std::to_string(h.numel()) + " " + dtype_name(h.dtype));
  }
  check_contiguous(t);
  check_contiguous(b);
  check_contiguous(h);
  check_writable(h);
  if (prefix < -1 || prefix >= kRadixBins) {
    throw_value_error(std::string(kOp) + ": argument 'prefix': " + std::to_string(prefix) +
                      " is not -1 (high digits) or a digit in [0, 65536)");
  }
  MagnitudeSelectParams p;
  const int64_t numel = t.numel();
  p.num_tensors = 1;
  p.a = &t.data;
  p.b = &b.data;
  p.numels = &numel;
  p.dtype = t.dtype;
  py::gil_scoped_release release;
  return int64_t(magnitude_histogram_cpu(p, prefix, static_cast<uint64_t*>(h.data)));
}

void band_select(py::handle theta, py::handle base, py::handle out, py::handle lo, py::handle hi,
                 int64_t start, int64_t stop, bool lo_ties_first) {
  constexpr const char* kOp = "band_select";
  const SelectTensors in =
      import_select_tensors(kOp, theta, base, out, "the band selection kernel", "PyTorch ops");
  const TensorArg &t = in.theta, &b = in.base, &o = in.out;
  BandSelectParams p;
  p.theta = t.data;
  p.base = b.data;
  p.out = o.data;
  p.numel = t.numel();
  p.dtype = t.dtype;
  p.has_lo = !lo.is_none();
  p.has_hi = !hi.is_none();
  if (p.has_lo) p.lo = lo.cast<float>();
  if (p.has_hi) p.hi = hi.cast<float>();
  // +inf is a magnitude (an inf in a task vector ranks last); NaN and negatives are not.
  if ((p.has_lo && !(p.lo >= 0.f)) || (p.has_hi && !(p.hi >= 0.f))) {
    throw_value_error(std::string(kOp) +
                      ": arguments 'lo' and 'hi' must be magnitudes (>= 0, +inf allowed)");
  }
  if (p.has_lo && p.has_hi && p.lo > p.hi) {
    throw_value_error(std::string(kOp) + ": argument 'lo' is above 'hi'");
  }
  if (!(0 <= start && start < stop && stop <= p.numel) || p.has_lo != (start > 0) ||
      p.has_hi != (stop < p.numel)) {
    throw_value_error(std::string(kOp) +
                      ": arguments 'start' and 'stop' must satisfy 0 <= start < stop <= numel, "
                      "with 'lo' given exactly when start > 0 and 'hi' exactly when stop < numel");
  }
  if (lo_ties_first && p.has_hi) {
    throw_value_error(std::string(kOp) +
                      ": argument 'lo_ties_first': only without an upper cut (stop == numel)");
  }
  p.start = start;
  p.stop = stop;
  p.lo_ties_first = lo_ties_first;
  py::gil_scoped_release release;
  band_select_cpu(p);
}

py::tuple della_select(py::handle theta, py::handle base, py::handle out, int64_t row_len,
                       double density, double epsilon, uint64_t seed, uint32_t stream_id) {
  constexpr const char* kOp = "della_select";
  const SelectTensors in =
      import_select_tensors(kOp, theta, base, out, "the DELLA selection kernel", "the reference");
  const TensorArg &t = in.theta, &b = in.base, &o = in.out;
  const int64_t numel = t.numel();
  if (row_len < 1 || row_len > int64_t(UINT32_MAX) || numel % row_len != 0) {
    throw_value_error(std::string(kOp) + ": argument 'row_len': " + std::to_string(row_len) +
                      " must be in [1, 2**32) and divide the " + std::to_string(numel) +
                      " elements");
  }
  if (!(density - epsilon > 0.0 && density + epsilon <= 1.0 && epsilon >= 0.0)) {
    throw_value_error(std::string(kOp) +
                      ": arguments 'density' and 'epsilon' need 0 < density - epsilon and "
                      "density + epsilon <= 1");
  }
  DellaSelectParams p;
  p.theta = t.data;
  p.base = b.data;
  p.out = o.data;
  p.numel = numel;
  p.row_len = row_len;
  p.dtype = t.dtype;
  p.density = density;
  p.epsilon = epsilon;
  p.seed = seed;
  p.stream = stream_id;
  double l1[2] = {0.0, 0.0};
  p.l1 = l1;
  {
    py::gil_scoped_release release;
    della_select_cpu(p);
  }
  return py::make_tuple(l1[0], l1[1]);
}

int64_t side_write(int fd, int64_t offset, uintptr_t data, int64_t nbytes) {
  return side_write_queue(fd, offset, reinterpret_cast<const void*>(data), nbytes);
}

void side_write_wait(int64_t ticket) {
  py::gil_scoped_release release;
  meldkit::side_write_wait(ticket);
}

int64_t side_writes_done() { return meldkit::side_writes_done(); }

int64_t side_advise(int fd, int64_t offset, int64_t nbytes) {
  return side_advise_queue(fd, offset, nbytes);
}

void side_jobs_wait(int64_t ticket) {
  py::gil_scoped_release release;
  meldkit::side_jobs_wait(ticket);
}

}  // namespace meldkit::bind

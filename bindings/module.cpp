// meldkit._C: the compiled core's Python module. Only m.def lines live here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "meldkit/logit_fusion.h"
#include "meldkit/merge.h"
#include "meldkit/routed_lora.h"
#include "meldkit/status.h"
#include "meldkit/weighted_sum.h"
#include "ops.h"
#include "tensor.h"

namespace py = pybind11;
namespace mb = meldkit::bind;

PYBIND11_MODULE(_C, m) {
  m.doc() = "meldkit's compiled kernels. Use meldkit.ops; these bindings take DLPack tensors.";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const meldkit::Error& e) {
      // The core names the op ("task_merge: ..."); users see it as meldkit's, like the Python
      // layer's own errors ("meldkit.task_merge: ...").
      std::string msg = e.what();
      if (msg.rfind("meldkit.", 0) != 0) msg = "meldkit." + msg;
      switch (e.kind()) {
        case meldkit::ErrorKind::kValue:
          PyErr_SetString(PyExc_ValueError, msg.c_str());
          break;
        case meldkit::ErrorKind::kType:
          PyErr_SetString(PyExc_TypeError, msg.c_str());
          break;
        case meldkit::ErrorKind::kRuntime:
          PyErr_SetString(PyExc_RuntimeError, msg.c_str());
          break;
      }
    }
  });

  m.def("has_cuda", &mb::has_cuda, "Whether the CUDA kernels were compiled.");
  m.def("build_info", &mb::build_info, "Compiler, OpenMP, CUDA runtime and archs of this build.");
  m.def("cuda_device_count", &mb::cuda_device_count,
        "(count, reason): usable CUDA devices, and why there are none when count is 0.");
  m.def("set_dlpack_exchange", &mb::set_dlpack_exchange,
        "Whether torch tensors may come in through DLPack's C exchange table (default True) "
        "rather than __dlpack__; returns the previous setting. For A/B timing and debugging.",
        py::arg("enabled"));

  m.def("weighted_sum", &mb::weighted_sum,
        "out[:] = sum_i weights[i] * tensors[i]; all contiguous, same shape and device.",
        py::arg("tensors"), py::arg("weights"), py::arg("out"), py::arg("workspace") = py::none(),
        py::arg("stream") = 0);
  m.def("weighted_sum_native_dtypes", &mb::weighted_sum_native_dtypes,
        "{device: [dtype names]} the native kernels accept.");
  m.def("weighted_sum_workspace_numel", &mb::weighted_sum_workspace_numel,
        "float32 workspace elements a call needs on `device` ('cpu' or 'cuda').",
        py::arg("num_inputs"), py::arg("numel"), py::arg("device"));
  m.attr("WEIGHTED_SUM_MAX_INPUTS_PER_LAUNCH") = meldkit::kWeightedSumMaxInputsPerLaunch;

  m.def("task_merge", &mb::task_merge,
        "out[:] = base + lam * delta, the fused task-vector merge of one tensor (see merge.h).",
        py::arg("base"), py::arg("models"), py::arg("out"), py::arg("weights"), py::arg("scales"),
        py::arg("thresholds"), py::arg("densities"), py::arg("seed"), py::arg("streams"),
        py::arg("sparsify"), py::arg("consensus"), py::arg("normalize"), py::arg("lam"),
        py::arg("stream") = 0);
  m.def("merge_many", &mb::merge_many,
        "The native merge pipeline over J tensor positions: per-tensor magnitude thresholds\n"
        "(unless `thresholds` gives global ones), L1 rescaling, then task_merge into outs[j].\n"
        "models[t][j] is model t's tensor j. exact_k (CPU): mergekit's exactly-k magnitude\n"
        "masks, equal magnitudes ranked by index, instead of keeping every tie.",
        py::arg("bases"), py::arg("models"), py::arg("outs"), py::arg("weights"),
        py::arg("densities"), py::arg("thresholds"), py::arg("sparsify"), py::arg("consensus"),
        py::arg("normalize"), py::arg("rescale"), py::arg("lam"), py::arg("seed"),
        py::arg("tensor_indices"), py::arg("workspace") = py::none(), py::arg("stream") = 0,
        py::arg("exact_k") = false);
  m.def(
      "merge_many_workspace_numel", &mb::merge_many_workspace_numel,
      "float64 workspace elements merge_many needs on CUDA, for num_models models over tensors of "
      "at most max_numel elements.",
      py::arg("num_models"), py::arg("max_numel"));
  m.def("side_write", &mb::side_write,
        "Queues pwrite(fd, data[:nbytes], offset) for the CPU merge kernels to run on one of\n"
        "their threads (meldkit/side_writes.h); returns its ticket. The memory at `data` and\n"
        "the descriptor must stay valid until the ticket is done.",
        py::arg("fd"), py::arg("offset"), py::arg("data"), py::arg("nbytes"));
  m.def("side_write_wait", &mb::side_write_wait,
        "Waits until a queued write is done, running queued writes on this thread; raises\n"
        "RuntimeError for a failed write.",
        py::arg("ticket"));
  m.def("side_writes_done", &mb::side_writes_done, "The highest ticket whose write is done.");
  m.def("side_advise", &mb::side_advise,
        "Queues posix_fadvise(fd, offset, nbytes, WILLNEED) for the CPU merge kernels to run on\n"
        "one of their threads, in the same queue as side_write; returns its ticket. Failures\n"
        "are ignored. The descriptor must stay valid until the ticket is done.",
        py::arg("fd"), py::arg("offset"), py::arg("nbytes"));
  m.def("side_jobs_wait", &mb::side_jobs_wait,
        "Waits until a queued job (write or advice) is done, running queued jobs on this\n"
        "thread; a failed write's error stays for side_write_wait.",
        py::arg("ticket"));
  m.def("magnitude_select", &mb::magnitude_select,
        "The k-th largest |a - b| over lists of tensors, exactly (radix selection).", py::arg("a"),
        py::arg("b"), py::arg("k"), py::arg("workspace") = py::none(), py::arg("stream") = 0);
  m.def("magnitude_histogram", &mb::magnitude_histogram,
        "Adds to hist (65536 int64 counts) the histogram of one 16-bit digit of the float32 bits\n"
        "of |theta - base| on the CPU: the high digit of every element (prefix -1), or the low\n"
        "digit of the elements whose high digit is prefix. Returns the NaN count.",
        py::arg("theta"), py::arg("base"), py::arg("hist"), py::arg("prefix"));
  m.def("band_select", &mb::band_select,
        "Model Breadcrumbs on the CPU: out = theta where the ascending rank of |theta - base|\n"
        "(equal magnitudes by index) is in [start, stop), base elsewhere; lo and hi are the\n"
        "magnitudes at ranks start and stop - 1 (None when start == 0 / stop == numel).\n"
        "lo_ties_first (no upper cut): keep the first ties at lo in index order instead of the\n"
        "last (the top ranks of a descending stable order: TIES with tie='exact_k').",
        py::arg("theta"), py::arg("base"), py::arg("out"), py::arg("lo"), py::arg("hi"),
        py::arg("start"), py::arg("stop"), py::arg("lo_ties_first") = false);
  m.def("della_select", &mb::della_select,
        "DELLA's MagPrune on the CPU: out = theta where the counter-based draw of element e\n"
        "(seed, stream_id) falls below its keep probability (d - eps) + 2 eps r / (n - 1), r the\n"
        "ascending rank of |theta - base| in its row of row_len elements; base elsewhere.\n"
        "Returns (sum |tau|, sum of the kept |tau|) in float64 for the L1 rescale.",
        py::arg("theta"), py::arg("base"), py::arg("out"), py::arg("row_len"), py::arg("density"),
        py::arg("epsilon"), py::arg("seed"), py::arg("stream_id"));
  m.def("merge_native_dtypes", &mb::merge_native_dtypes,
        "{device: [dtype names]} the native merge kernels accept.");
  m.attr("MERGE_MAX_MODELS") = meldkit::kMergeMaxModels;

  m.def("blend_plan", &mb::blend_plan,
        "Validates outs[i], bases[i], taus[i] and returns (rows, num_chunks): the blend plan's\n"
        "int64 rows (8 per tensor: addresses, numel, first chunk, mask streams, dense; see\n"
        "blend.h), to be put in a [N, 8] tensor on the tensors' device for blend_run.",
        py::arg("outs"), py::arg("bases"), py::arg("taus"), py::arg("dense"), py::arg("streams1"),
        py::arg("streams2"));
  m.def("blend_run", &mb::blend_run,
        "outs[i][:] = bases[i] + taus[i] * g over a plan's table, g from the float32 table by the\n"
        "two regenerated DARE masks (or g_dense for dense tensors): ExDe's per-step blend, one\n"
        "kernel launch on CUDA. `like` is any tensor of the plan (dtype and device).",
        py::arg("table"), py::arg("num_chunks"), py::arg("like"), py::arg("g_table"),
        py::arg("g_dense"), py::arg("keep1"), py::arg("keep2"), py::arg("draw1"), py::arg("draw2"),
        py::arg("seed"), py::arg("stream") = 0);
  m.def("blend_native_dtypes", &mb::blend_native_dtypes,
        "{device: [dtype names]} the native blend kernels accept.");
  m.attr("MAGNITUDE_SELECT_CUDA_WORKSPACE") = meldkit::kMagnitudeSelectCudaWorkspace;

  m.def("routed_lora_forward", &mb::routed_lora_forward,
        "Fused routed low-rank experts forward (see routed_lora.h): writes y, probs (router\n"
        "mode), the applied weights and the shrink activations h.",
        py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scaling"),
        py::arg("router_weight"), py::arg("gates"), py::arg("top_k"), py::arg("dropout"),
        py::arg("seed"), py::arg("y"), py::arg("probs"), py::arg("weights"), py::arg("h"),
        py::arg("stream") = 0);
  m.def("routed_lora_backward", &mb::routed_lora_backward,
        "Fused routed low-rank experts backward: writes each gradient that is not None.",
        py::arg("dy"), py::arg("x"), py::arg("lora_a"), py::arg("lora_b"), py::arg("scaling"),
        py::arg("router_weight"), py::arg("weights"), py::arg("probs"), py::arg("dprobs"),
        py::arg("h"), py::arg("top_k"), py::arg("dropout"), py::arg("seed"), py::arg("dx"),
        py::arg("da"), py::arg("db"), py::arg("drouter"), py::arg("dgates"), py::arg("stream") = 0);
  m.def("routed_lora_dropout", &mb::routed_lora_dropout,
        "out = src * expert's dropout mask / (1 - dropout), src [rows, cols] float32 or\n"
        "float64: element (t, j) is kept when uniform01(stream_key(seed, expert), t * cols + j)\n"
        "< 1 - dropout (the per-token kernels' masks). out may be src.",
        py::arg("src"), py::arg("out"), py::arg("dropout"), py::arg("seed"), py::arg("expert"),
        py::arg("stream") = 0);
  m.def("routed_lora_native_dtypes", &mb::routed_lora_native_dtypes,
        "{device: [dtype names]} the native routed_lora kernels accept.");
  m.attr("ROUTED_LORA_MAX_EXPERTS") = meldkit::kRoutedLoraMaxExperts;

  m.def("logit_fusion", &mb::logit_fusion,
        "Dynamic Logit Fusion's per-row solver (see logit_fusion.h): losses of every (expert,\n"
        "alpha) candidate, the chosen alpha and expert, and optionally the fused logits.\n"
        "allowed: None (every candidate) or T ints, bit j of the t-th set when candidate\n"
        "(t, alphas[j]) takes part (per-expert ranges); excluded candidates get loss +inf.",
        py::arg("large"), py::arg("small_base"), py::arg("experts"), py::arg("alphas"),
        py::arg("loss"), py::arg("alpha"), py::arg("expert"), py::arg("logits"),
        py::arg("stream") = 0, py::arg("allowed") = py::none());
  m.def("logit_fusion_native_dtypes", &mb::logit_fusion_native_dtypes,
        "{device: [dtype names]} the native logit_fusion kernels accept.");
  m.attr("LOGIT_FUSION_MAX_ALPHAS") = meldkit::kLogitFusionMaxAlphas;
  m.attr("LOGIT_FUSION_CPU_MAX_RUN") = meldkit::kLogitFusionCpuMaxRun;
  m.attr("LOGIT_FUSION_MAX_EXPERTS") = meldkit::kLogitFusionMaxExperts;
}

// Every binding the module exports; module.cpp holds only their m.def lines.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace meldkit::bind {

namespace py = pybind11;

// weighted_sum.cpp
void weighted_sum(py::handle tensors, py::handle weights, py::handle out, py::handle workspace,
                  int64_t stream);
py::dict weighted_sum_native_dtypes();
int64_t weighted_sum_workspace_numel(int64_t num_inputs, int64_t numel, const std::string& device);

// merge.cpp
void task_merge(py::handle base, py::handle models, py::handle out, py::handle weights,
                py::handle scales, py::handle thresholds, py::handle densities, uint64_t seed,
                py::handle streams, const std::string& sparsify, const std::string& consensus,
                bool normalize, float lam, int64_t stream);
void merge_many(py::handle bases, py::handle models, py::handle outs, py::handle weights,
                py::handle densities, py::handle thresholds, const std::string& sparsify,
                const std::string& consensus, bool normalize, const std::string& rescale, float lam,
                uint64_t seed, py::handle tensor_indices, py::handle workspace, int64_t stream,
                bool exact_k);
int64_t merge_many_workspace_numel(int64_t num_models, int64_t max_numel);
int64_t side_write(int fd, int64_t offset, uintptr_t data, int64_t nbytes);
void side_write_wait(int64_t ticket);
int64_t side_writes_done();
int64_t side_advise(int fd, int64_t offset, int64_t nbytes);
void side_jobs_wait(int64_t ticket);
float magnitude_select(py::handle a, py::handle b, int64_t k, py::handle workspace, int64_t stream);
int64_t magnitude_histogram(py::handle theta, py::handle base, py::handle hist, int64_t prefix);
void band_select(py::handle theta, py::handle base, py::handle out, py::handle lo, py::handle hi,
                 int64_t start, int64_t stop, bool lo_ties_first);
py::tuple della_select(py::handle theta, py::handle base, py::handle out, int64_t row_len,
                       double density, double epsilon, uint64_t seed, uint32_t stream_id);
py::dict merge_native_dtypes();

// routed_lora.cpp
void routed_lora_forward(py::handle x, py::handle lora_a, py::handle lora_b, py::handle scaling,
                         py::handle router_weight, py::handle gates, int64_t top_k, double dropout,
                         uint64_t seed, py::handle y, py::handle probs, py::handle weights,
                         py::handle h, int64_t stream);
void routed_lora_backward(py::handle dy, py::handle x, py::handle lora_a, py::handle lora_b,
                          py::handle scaling, py::handle router_weight, py::handle weights,
                          py::handle probs, py::handle dprobs, py::handle h, int64_t top_k,
                          double dropout, uint64_t seed, py::handle dx, py::handle da,
                          py::handle db, py::handle drouter, py::handle dgates, int64_t stream);
py::dict routed_lora_native_dtypes();
void routed_lora_dropout(py::handle src, py::handle out, double dropout, uint64_t seed,
                         int64_t expert, int64_t stream);

// logit_fusion.cpp
void logit_fusion(py::handle large, py::handle small_base, py::handle experts, py::handle alphas,
                  py::handle loss, py::handle alpha, py::handle expert, py::handle logits,
                  int64_t stream, py::handle allowed);
py::dict logit_fusion_native_dtypes();

// blend.cpp
py::tuple blend_plan(py::handle outs, py::handle bases, py::handle taus, py::handle dense,
                     py::handle streams1, py::handle streams2);
void blend_run(py::handle table, int64_t num_chunks, py::handle like, py::handle g_table,
               float g_dense, float keep1, float keep2, bool draw1, bool draw2, uint64_t seed,
               int64_t stream);
py::dict blend_native_dtypes();

// info.cpp
py::dict build_info();
py::tuple cuda_device_count();
bool has_cuda();

}  // namespace meldkit::bind

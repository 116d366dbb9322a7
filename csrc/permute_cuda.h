// Declarations shared by permute_cuda.cu (kernels + launchers) and
// permute_bindings.cpp (pybind11 module megatron_evomoe._C_cuda).
// The semantics are documented in megatron_evomoe/ops/_ext.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace evomoe {

// The rank kernel keeps per-warp counts of every expert in shared memory.
constexpr int64_t kMaxExperts = 1024;

// topk_idx [T, K] int64 -> counts [E] int64.
at::Tensor expert_histogram_cuda(const at::Tensor& topk_idx, int64_t num_experts);

// x [T, C], topk_idx [T, K] -> (x_perm [T*K, C], row_map [T, K] int64, counts [E] int64).
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x,
                                                            const at::Tensor& topk_idx,
                                                            int64_t num_experts);

// y_perm [N, C], row_map [T, K], gates [T, K] or none -> y [T, C].
at::Tensor unpermute_cuda(const at::Tensor& y_perm, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& gates);

// grad_x_perm [N, C], row_map [T, K] -> grad_x [T, C].
at::Tensor permute_backward_cuda(const at::Tensor& grad_x_perm, const at::Tensor& row_map);

// grad_y [T, C], y_perm [N, C], row_map [T, K], gates [T, K] -> (grad_y_perm [N, C], grad_gates [T, K]).
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y,
                                                           const at::Tensor& y_perm,
                                                           const at::Tensor& row_map,
                                                           const at::Tensor& gates);

}  // namespace evomoe

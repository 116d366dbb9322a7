// CPU kernels of megatron_evomoe._C_cpu. Semantics: the contract in megatron_evomoe/ops/_ext.py
// (the same one the CUDA permute kernels and the PyTorch backend follow) and, for the grouped
// GEMM, megatron_evomoe/ops/grouped_gemm.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace evomoe_cpu {

// Grouped GEMM over expert-sorted rows; offsets [E] = cumulative end rows (int32/int64).
at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets);
at::Tensor grouped_mm_dgrad(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& offsets);
at::Tensor grouped_mm_wgrad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& offsets);

// Token permutation for MoE dispatch (stable by slot t*K+k; ids outside [0, E) dropped).
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& topk_idx,
                                                       int64_t num_experts);
at::Tensor unpermute(const at::Tensor& y_perm, const at::Tensor& row_map, const c10::optional<at::Tensor>& gates);
at::Tensor permute_backward(const at::Tensor& grad_x_perm, const at::Tensor& row_map);
std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_y, const at::Tensor& y_perm,
                                                      const at::Tensor& row_map, const at::Tensor& gates);

}  // namespace evomoe_cpu

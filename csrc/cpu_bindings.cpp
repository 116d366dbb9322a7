// Python bindings of megatron_evomoe._C_cpu (kernels in grouped_gemm_cpu.cpp and permute_cpu.cpp).
// Semantics: megatron_evomoe/ops/_ext.py; the torch.library ops and autograd around them are
// megatron_evomoe/ops/grouped_gemm.py's and permute.py's job (backend "cpu_ext").
#include <torch/extension.h>

#include "cpu_ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_evomoe CPU kernels: expert-parallel grouped GEMM and MoE token permutation";
  m.def("grouped_mm", &evomoe_cpu::grouped_mm, py::arg("x"), py::arg("w"), py::arg("offsets"),
        "grouped_mm(x [T, K], w [E, K, N], offsets [E]) -> y [T, N]");
  m.def("grouped_mm_dgrad", &evomoe_cpu::grouped_mm_dgrad, py::arg("dy"), py::arg("w"), py::arg("offsets"),
        "grouped_mm_dgrad(dy [T, N], w [E, K, N], offsets [E]) -> dx [T, K]");
  m.def("grouped_mm_wgrad", &evomoe_cpu::grouped_mm_wgrad, py::arg("x"), py::arg("dy"), py::arg("offsets"),
        "grouped_mm_wgrad(x [T, K], dy [T, N], offsets [E]) -> dw [E, K, N]");
  m.def("permute", &evomoe_cpu::permute, py::arg("x"), py::arg("topk_idx"), py::arg("num_experts"),
        "permute(x [T, C], topk_idx [T, K], num_experts) -> (x_perm [T*K, C], row_map [T, K], counts [E])");
  m.def("unpermute", &evomoe_cpu::unpermute, py::arg("y_perm"), py::arg("row_map"), py::arg("gates") = py::none(),
        "unpermute(y_perm [N, C], row_map [T, K], gates [T, K] | None) -> y [T, C]");
  m.def("permute_backward", &evomoe_cpu::permute_backward, py::arg("grad_x_perm"), py::arg("row_map"),
        "permute_backward(grad_x_perm [N, C], row_map [T, K]) -> grad_x [T, C]");
  m.def("unpermute_backward", &evomoe_cpu::unpermute_backward, py::arg("grad_y"), py::arg("y_perm"),
        py::arg("row_map"), py::arg("gates"),
        "unpermute_backward(grad_y, y_perm, row_map, gates) -> (grad_y_perm [N, C], grad_gates [T, K])");
}

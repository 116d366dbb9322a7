// Python bindings of megatron_evomoe._C_cuda (kernels in permute_cuda.cu).
// Semantics: megatron_evomoe/ops/_ext.py. The wrapping into torch.library
// custom ops and autograd Functions is megatron_evomoe/ops/permute.py's job.
#include <torch/extension.h>

#include "permute_cuda.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_evomoe CUDA kernels: MoE token permute/unpermute and expert histogram";
  m.attr("MAX_EXPERTS") = evomoe::kMaxExperts;
  m.def("expert_histogram", &evomoe::expert_histogram_cuda, py::arg("topk_idx"),
        py::arg("num_experts"),
        "expert_histogram(topk_idx [T, K] int64, num_experts) -> counts [E] int64");
  m.def("permute", &evomoe::permute_cuda, py::arg("x"), py::arg("topk_idx"), py::arg("num_experts"),
        "permute(x [T, C], topk_idx [T, K] int64, num_experts)\n"
        "  -> (x_perm [T*K, C], row_map [T, K] int64, counts [E] int64); stable by slot t*K+k");
  m.def("unpermute", &evomoe::unpermute_cuda, py::arg("y_perm"), py::arg("row_map"),
        py::arg("gates") = py::none(),
        "unpermute(y_perm [N, C], row_map [T, K], gates [T, K] | None) -> y [T, C]");
  m.def("permute_backward", &evomoe::permute_backward_cuda, py::arg("grad_x_perm"),
        py::arg("row_map"), "permute_backward(grad_x_perm [N, C], row_map [T, K]) -> grad_x [T, C]");
  m.def("unpermute_backward", &evomoe::unpermute_backward_cuda, py::arg("grad_y"),
        py::arg("y_perm"), py::arg("row_map"), py::arg("gates"),
        "unpermute_backward(grad_y [T, C], y_perm [N, C], row_map [T, K], gates [T, K])\n"
        "  -> (grad_y_perm [N, C], grad_gates [T, K])");
}

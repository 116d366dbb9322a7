// MoE token permutation on the CPU: one counting sort of the T*K slots (serial: it is a few
// thousand integers), then row copies and k-way weighted sums parallel over tokens, in one pass
// each. The PyTorch backend needs a sort, gathers, wheres and [T, K, C] temporaries for the same.
// Contract: megatron_evomoe/ops/_ext.py.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <vector>

#include "cpu_ops.h"

namespace evomoe_cpu {
namespace {

constexpr int64_t kGrain = 32;  // tokens per parallel task

bool valid_row(int64_t r, int64_t num_rows) { return r >= 0 && r < num_rows; }

void check_map(const at::Tensor& row_map, const char* name) {
  TORCH_CHECK(row_map.dim() == 2, name, ": row_map must be [T, K], got ", row_map.sizes());
  TORCH_CHECK(row_map.scalar_type() == at::kLong || row_map.scalar_type() == at::kInt, name,
              ": row_map must be int64 or int32");
}

// y[t] = sum_k weight(t, k) * src[map[t, k]] (fp32 accumulation); weight 1 where gates is null.
template <typename scalar_t>
void weighted_gather_sum(const scalar_t* src, int64_t num_rows, const int64_t* map, const float* gates,
                         scalar_t* out, int64_t T, int64_t K, int64_t C) {
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(C);
    for (int64_t t = begin; t < end; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r = map[t * K + k];
        if (!valid_row(r, num_rows)) continue;
        const float w = gates ? gates[t * K + k] : 1.f;
        const scalar_t* row = src + r * C;
        for (int64_t c = 0; c < C; ++c) acc[c] += w * static_cast<float>(row[c]);
      }
      scalar_t* o = out + t * C;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

at::Tensor weighted_sum(const at::Tensor& src, const at::Tensor& row_map, const at::Tensor* gates) {
  auto s = src.detach().contiguous();
  auto map = row_map.to(at::kLong).contiguous();
  at::Tensor g = gates ? gates->detach().to(at::kFloat).contiguous() : at::Tensor();
  const int64_t T = map.size(0), K = map.size(1), C = s.size(1);
  auto out = at::empty({T, C}, s.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "evomoe_unpermute", [&] {
    weighted_gather_sum<scalar_t>(s.data_ptr<scalar_t>(), s.size(0), map.data_ptr<int64_t>(),
                                  gates ? g.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), T, K, C);
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute(const at::Tensor& x, const at::Tensor& topk_idx,
                                                       int64_t num_experts) {
  TORCH_CHECK(x.dim() == 2 && topk_idx.dim() == 2 && topk_idx.size(0) == x.size(0),
              "permute: expects x [T, C] and topk_idx [T, K], got ", x.sizes(), " and ", topk_idx.sizes());
  TORCH_CHECK(num_experts >= 1, "permute: num_experts must be >= 1");
  auto xc = x.detach().contiguous();
  auto idx = topk_idx.to(at::kLong).contiguous();
  const int64_t T = idx.size(0), K = idx.size(1), C = xc.size(1), S = T * K;
  const int64_t* id = idx.data_ptr<int64_t>();

  auto counts = at::zeros({num_experts}, idx.options());
  int64_t* cnt = counts.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)
    if (id[s] >= 0 && id[s] < num_experts) ++cnt[id[s]];
  std::vector<int64_t> cursor(num_experts, 0);
  for (int64_t e = 1; e < num_experts; ++e) cursor[e] = cursor[e - 1] + cnt[e - 1];
  const int64_t routed = num_experts ? cursor[num_experts - 1] + cnt[num_experts - 1] : 0;

  auto row_map = at::empty({T, K}, idx.options());
  int64_t* map = row_map.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s)  // slots in increasing order: the sort is stable
    map[s] = (id[s] >= 0 && id[s] < num_experts) ? cursor[id[s]]++ : -1;

  auto x_perm = at::empty({S, C}, xc.options());
  if (routed < S) x_perm.narrow(0, routed, S - routed).zero_();
  const int64_t row_bytes = C * xc.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(x_perm.data_ptr());
  at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = 0; k < K; ++k)
        if (map[t * K + k] >= 0) std::memcpy(dst + map[t * K + k] * row_bytes, src + t * row_bytes, row_bytes);
  });
  return {x_perm, row_map, counts};
}

at::Tensor unpermute(const at::Tensor& y_perm, const at::Tensor& row_map, const c10::optional<at::Tensor>& gates) {
  check_map(row_map, "unpermute");
  TORCH_CHECK(y_perm.dim() == 2, "unpermute: y_perm must be [N, C], got ", y_perm.sizes());
  if (gates.has_value()) {
    TORCH_CHECK(gates->sizes() == row_map.sizes(), "unpermute: gates must be shaped like row_map");
    return weighted_sum(y_perm, row_map, &gates.value());
  }
  return weighted_sum(y_perm, row_map, nullptr);
}

at::Tensor permute_backward(const at::Tensor& grad_x_perm, const at::Tensor& row_map) {
  check_map(row_map, "permute_backward");
  return weighted_sum(grad_x_perm, row_map, nullptr);
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward(const at::Tensor& grad_y, const at::Tensor& y_perm,
                                                      const at::Tensor& row_map, const at::Tensor& gates) {
  check_map(row_map, "unpermute_backward");
  TORCH_CHECK(gates.sizes() == row_map.sizes(), "unpermute_backward: gates must be shaped like row_map");
  auto gy = grad_y.detach().contiguous();
  auto y = y_perm.detach().contiguous();
  auto map_t = row_map.to(at::kLong).contiguous();
  auto g = gates.detach().to(at::kFloat).contiguous();
  const int64_t T = map_t.size(0), K = map_t.size(1), N = y.size(0), C = y.size(1);
  const int64_t* map = map_t.data_ptr<int64_t>();
  int64_t owned = 0;
  for (int64_t s = 0; s < T * K; ++s) owned += valid_row(map[s], N);
  // Rows no slot owns get zero gradient; in the usual dropless case every row is owned.
  auto grad_y_perm = owned == N ? at::empty_like(y) : at::zeros_like(y);
  auto grad_gates = at::empty({T, K}, g.options());
  float* gg = grad_gates.data_ptr<float>();
  const float* gw = g.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "evomoe_unpermute_backward", [&] {
    const scalar_t* dy = gy.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* dyp = grad_y_perm.data_ptr<scalar_t>();
    at::parallel_for(0, T, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* d = dy + t * C;
        for (int64_t k = 0; k < K; ++k) {
          const int64_t r = map[t * K + k];
          if (!valid_row(r, N)) {
            gg[t * K + k] = 0.f;
            continue;
          }
          const float w = gw[t * K + k];
          const scalar_t* row = yp + r * C;
          scalar_t* out = dyp + r * C;
          float dot = 0.f;
          for (int64_t c = 0; c < C; ++c) {
            const float dc = static_cast<float>(d[c]);
            dot += dc * static_cast<float>(row[c]);
            out[c] = static_cast<scalar_t>(w * dc);
          }
          gg[t * K + k] = dot;
        }
      }
    });
  });
  return {grad_y_perm, grad_gates.to(gates.scalar_type())};
}

}  // namespace evomoe_cpu

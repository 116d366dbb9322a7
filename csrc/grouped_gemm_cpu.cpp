// Grouped GEMM on the CPU: one MKL/oneDNN GEMM per expert, with the experts spread over the
// intra-op threads (each GEMM single-threaded inside the parallel region) instead of every
// small GEMM being split over all threads. With many experts and few rows each (64 experts,
// ~64 rows), splitting one small GEMM over threads scales poorly; whole experts per thread
// scale almost linearly. Experts are assigned longest-first to the least-loaded thread, so
// unbalanced routing still balances. With fewer non-empty experts than 2 x threads, each GEMM
// uses all threads as usual.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cpu_ops.h"

namespace evomoe_cpu {
namespace {

struct Segment {
  int64_t expert, lo, hi;
  int64_t rows() const { return hi - lo; }
};

// Non-empty [lo, hi) row ranges of the experts; checks offsets are non-decreasing and <= T.
std::vector<Segment> segments(const at::Tensor& offsets, int64_t num_rows) {
  TORCH_CHECK(offsets.dim() == 1, "offsets must be 1-D, got ", offsets.sizes());
  auto ends = offsets.to(at::kLong).contiguous();
  const int64_t* end = ends.data_ptr<int64_t>();
  std::vector<Segment> out;
  int64_t lo = 0;
  for (int64_t e = 0; e < ends.size(0); ++e) {
    TORCH_CHECK(end[e] >= lo && end[e] <= num_rows, "offsets must be non-decreasing and <= ", num_rows,
                ", got offsets[", e, "] = ", end[e]);
    if (end[e] > lo) out.push_back({e, lo, end[e]});
    lo = end[e];
  }
  return out;
}

int64_t routed_rows(const at::Tensor& offsets) {
  return offsets.numel() ? offsets[-1].item<int64_t>() : 0;
}

// Runs fn(segment) for every segment: expert-parallel when there are enough of them.
// Callers pass detached tensors: OpenMP worker threads do not inherit the caller's thread-local
// "below autograd" dispatch state, so a tensor that requires grad would reach autograd there.
template <typename Fn>
void for_each_segment(std::vector<Segment> segs, const Fn& fn) {
  const int64_t num_threads = at::get_num_threads();
  if (num_threads <= 1 || static_cast<int64_t>(segs.size()) < 2 * num_threads) {
    for (const auto& s : segs) fn(s);
    return;
  }
  std::sort(segs.begin(), segs.end(), [](const Segment& a, const Segment& b) { return a.rows() > b.rows(); });
  std::vector<std::vector<Segment>> plan(num_threads);
  std::vector<int64_t> load(num_threads, 0);
  for (const auto& s : segs) {  // longest processing time first
    int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    plan[t].push_back(s);
    load[t] += s.rows() + 16;  // + a per-GEMM constant: tiny experts are not free
  }
  at::parallel_for(0, num_threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (const auto& s : plan[t]) fn(s);
  });
}

void check_args(const at::Tensor& a, const at::Tensor& w, const at::Tensor& offsets, const char* name) {
  TORCH_CHECK(a.device().is_cpu() && w.device().is_cpu() && offsets.device().is_cpu(),
              name, ": the CPU extension takes CPU tensors");
  TORCH_CHECK(a.dim() == 2 && w.dim() == 3, name, ": expects a 2-D and a 3-D tensor, got ", a.sizes(), " and ",
              w.sizes());
  TORCH_CHECK(a.scalar_type() == w.scalar_type(), name, ": dtypes differ (", a.scalar_type(), " vs ",
              w.scalar_type(), ")");
  TORCH_CHECK(offsets.size(0) == w.size(0), name, ": offsets has ", offsets.size(0), " entries for ", w.size(0),
              " experts");
}

// out[rows_e] = a[rows_e] @ weight(e) for every expert; rows past offsets[-1] get zeros.
template <typename WeightFn>
at::Tensor rows_times_expert_weight(const at::Tensor& a, const at::Tensor& offsets, int64_t out_cols,
                                    const WeightFn& weight) {
  auto ac = a.detach().contiguous();
  auto out = at::empty({a.size(0), out_cols}, ac.options());
  const int64_t routed = routed_rows(offsets);
  if (routed < a.size(0)) out.narrow(0, routed, a.size(0) - routed).zero_();
  for_each_segment(segments(offsets, a.size(0)), [&](const Segment& s) {
    auto o = out.narrow(0, s.lo, s.rows());
    at::mm_out(o, ac.narrow(0, s.lo, s.rows()), weight(s.expert));
  });
  return out;
}

}  // namespace

at::Tensor grouped_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offsets) {
  check_args(x, w, offsets, "grouped_mm");
  TORCH_CHECK(x.size(1) == w.size(1), "grouped_mm: x [T, K] and w [E, K, N] disagree on K");
  auto wd = w.detach();
  return rows_times_expert_weight(x, offsets, w.size(2), [&](int64_t e) { return wd[e]; });
}

at::Tensor grouped_mm_dgrad(const at::Tensor& dy, const at::Tensor& w, const at::Tensor& offsets) {
  check_args(dy, w, offsets, "grouped_mm_dgrad");
  TORCH_CHECK(dy.size(1) == w.size(2), "grouped_mm_dgrad: dy [T, N] and w [E, K, N] disagree on N");
  auto wd = w.detach();
  return rows_times_expert_weight(dy, offsets, w.size(1), [&](int64_t e) { return wd[e].t(); });
}

at::Tensor grouped_mm_wgrad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& offsets) {
  TORCH_CHECK(x.dim() == 2 && dy.dim() == 2 && x.size(0) == dy.size(0),
              "grouped_mm_wgrad: expects x [T, K] and dy [T, N], got ", x.sizes(), " and ", dy.sizes());
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "grouped_mm_wgrad: dtypes differ");
  auto xc = x.detach().contiguous();
  auto dyc = dy.detach().contiguous();
  const int64_t num_experts = offsets.size(0);
  auto segs = segments(offsets, x.size(0));
  auto dw = at::empty({num_experts, x.size(1), dy.size(1)}, xc.options());
  std::vector<char> filled(num_experts, 0);
  for (const auto& s : segs) filled[s.expert] = 1;
  for (int64_t e = 0; e < num_experts; ++e)
    if (!filled[e]) dw[e].zero_();  // experts without rows get a zero gradient
  for_each_segment(segs, [&](const Segment& s) {
    auto o = dw[s.expert];
    at::mm_out(o, xc.narrow(0, s.lo, s.rows()).t(), dyc.narrow(0, s.lo, s.rows()));
  });
  return dw;
}

}  // namespace evomoe_cpu

// CUDA kernels of megatron_evomoe._C_cuda: MoE token permutation.
//
// The contract (stable sort of slots s = t*K + k by expert, row_map [T, K],
// dropped slots with ids outside [0, E) get row -1 and no row, rows after
// sum(counts) are zero) is documented in megatron_evomoe/ops/_ext.py, next to
// its PyTorch reference. Python bindings: permute_bindings.cpp.
//
// permute:
//   1. chunk_count_kernel: slots are cut into chunks of kChunk; per chunk and
//      expert, how many slots (shared-memory atomics) -> chunk_counts [num_chunks, E].
//   2. ATen: counts = column sums; the first row of chunk e in expert e's
//      segment = offset_e + (exclusive cumsum over chunks).
//   3. rank_kernel: within a chunk, rounds of kThreads slots; a slot's rank
//      among same-expert slots of its warp comes from __match_any_sync, warps
//      are ordered through a small shared-memory scan, rounds through a running
//      per-expert cursor. Gives row_map with the stable order, no sort.
//   4. invert_kernel: row -> slot (inverse of row_map), -1 for unowned rows.
//   5. gather_rows_kernel: x_perm[r] = x[slot / K] (zero when unowned).
// unpermute / permute_backward: reduce_rows_kernel, one block per token.
// unpermute_backward: gather_rows_kernel with gate scales for grad_y_perm,
//   slot_dot_kernel (one warp per slot) for grad_gates.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// Only c10/cuda headers, not ATen/cuda/CUDAContext.h: that one pulls in the
// cuBLAS/cuSPARSE/cuSOLVER headers, which this kernel file does not need.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "permute_cuda.h"

namespace evomoe {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRounds = 8;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kRounds;  // slots per chunk
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kHistSlotsPerBlock = static_cast<int64_t>(kThreads) * 64;

__device__ __forceinline__ bool routed(int64_t expert, int num_experts) {
  return expert >= 0 && expert < num_experts;
}

// counts [E] (int64 viewed as unsigned long long for atomicAdd).
__global__ void histogram_kernel(const int64_t* __restrict__ topk_idx, int64_t num_slots,
                                 int num_experts, unsigned long long* __restrict__ counts) {
  extern __shared__ unsigned int s_hist[];  // [E]
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_slots;
       s += stride) {
    const int64_t e = topk_idx[s];
    if (routed(e, num_experts)) atomicAdd(&s_hist[e], 1u);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
    if (s_hist[e] != 0) atomicAdd(&counts[e], static_cast<unsigned long long>(s_hist[e]));
}

// chunk_counts [num_chunks, E]: one block per chunk of kChunk slots.
__global__ void chunk_count_kernel(const int64_t* __restrict__ topk_idx, int64_t num_slots,
                                   int num_experts, int64_t* __restrict__ chunk_counts) {
  extern __shared__ unsigned int s_hist[];  // [E]
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) s_hist[e] = 0;
  __syncthreads();
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = min(begin + kChunk, num_slots);
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int64_t e = topk_idx[s];
    if (routed(e, num_experts)) atomicAdd(&s_hist[e], 1u);
  }
  __syncthreads();
  int64_t* out = chunk_counts + static_cast<int64_t>(blockIdx.x) * num_experts;
  for (int e = threadIdx.x; e < num_experts; e += blockDim.x) out[e] = s_hist[e];
}

// row_map [num_slots]: row of each slot in the expert-sorted order, -1 when dropped.
// chunk_base [num_chunks, E]: row of the chunk's first slot of each expert.
// Launch with kThreads threads and rank_smem_bytes(E) of dynamic shared memory.
__global__ void rank_kernel(const int64_t* __restrict__ topk_idx, int64_t num_slots,
                            int num_experts, const int64_t* __restrict__ chunk_base,
                            int64_t* __restrict__ row_map) {
  extern __shared__ int64_t s_cursor[];                                  // [E] next row per expert
  int* s_warp = reinterpret_cast<int*>(s_cursor + num_experts);          // [kWarps, E] prefix
  int* s_round = s_warp + kWarps * num_experts;                          // [E] round totals
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const unsigned lanes_below = (1u << lane) - 1u;

  for (int e = threadIdx.x; e < num_experts; e += blockDim.x)
    s_cursor[e] = chunk_base[static_cast<int64_t>(blockIdx.x) * num_experts + e];

  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  for (int round = 0; round < kRounds; ++round) {
    const int64_t round_begin = chunk_begin + static_cast<int64_t>(round) * kThreads;
    if (round_begin >= num_slots) break;  // same for every thread of the block
    const int64_t s = round_begin + threadIdx.x;
    for (int j = threadIdx.x; j < kWarps * num_experts; j += blockDim.x) s_warp[j] = 0;
    __syncthreads();

    const int64_t e64 = s < num_slots ? topk_idx[s] : -1;
    const bool live = s < num_slots && routed(e64, num_experts);
    const int e = live ? static_cast<int>(e64) : -1;  // all dead slots share key -1
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int rank_in_warp = __popc(peers & lanes_below);
    const bool leader = (__ffs(peers) - 1) == lane;
    if (live && leader) s_warp[warp * num_experts + e] = __popc(peers);
    __syncthreads();

    // Exclusive scan over warps, per expert: warp w's first row of expert e.
    for (int x = threadIdx.x; x < num_experts; x += blockDim.x) {
      int running = 0;
      for (int w = 0; w < kWarps; ++w) {
        const int c = s_warp[w * num_experts + x];
        s_warp[w * num_experts + x] = running;
        running += c;
      }
      s_round[x] = running;
    }
    __syncthreads();

    if (s < num_slots) row_map[s] = live ? s_cursor[e] + s_warp[warp * num_experts + e] + rank_in_warp : -1;
    __syncthreads();
    for (int x = threadIdx.x; x < num_experts; x += blockDim.x) s_cursor[x] += s_round[x];
    // The next round writes s_warp (zeroing) and s_round (after a barrier)
    // only; s_cursor is next read after two barriers.
  }
}

// slot_of_row [num_rows] (preset to -1): slot_of_row[row_map[s]] = s.
__global__ void invert_kernel(const int64_t* __restrict__ row_map, int64_t num_slots,
                              int64_t num_rows, int64_t* __restrict__ slot_of_row) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < num_slots;
       s += stride) {
    const int64_t r = row_map[s];
    if (r >= 0 && r < num_rows) slot_of_row[r] = s;
  }
}

// Rows are moved as packs of kVec elements (16 bytes when the launcher finds
// C and the pointers aligned for it, else single elements).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// out[r] = scale[slot] * src[slot / K] for slot = slot_of_row[r]; zeros when slot < 0.
// src [T, C], out [num_rows, C], scale [T*K] float or nullptr (= 1). One block per row.
template <typename scalar_t, int kVec>
__global__ void gather_rows_kernel(const scalar_t* __restrict__ src,
                                   const int64_t* __restrict__ slot_of_row,
                                   const float* __restrict__ scale, int64_t num_rows, int top_k,
                                   int64_t channels, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const int64_t packs = channels / kVec;
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t slot = slot_of_row[r];
    P* dst = reinterpret_cast<P*>(out + r * channels);
    if (slot < 0) {
      P zero;
#pragma unroll
      for (int j = 0; j < kVec; ++j) zero.v[j] = scalar_t(0);
      for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) dst[c] = zero;
      continue;
    }
    const P* row = reinterpret_cast<const P*>(src + (slot / top_k) * channels);
    const acc_t w = scale == nullptr ? acc_t(1) : static_cast<acc_t>(scale[slot]);
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
      P p = row[c];
      if (scale != nullptr) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) p.v[j] = static_cast<scalar_t>(w * static_cast<acc_t>(p.v[j]));
      }
      dst[c] = p;
    }
  }
}

// out[t] = sum_k w[t, k] * src[row_map[t, k]] over rows in [0, num_rows), fp32 sums.
// src [num_rows, C], row_map [T, K], weights [T*K] float or nullptr (= 1), out [T, C].
template <typename scalar_t, int kVec>
__global__ void reduce_rows_kernel(const scalar_t* __restrict__ src,
                                   const int64_t* __restrict__ row_map,
                                   const float* __restrict__ weights, int64_t num_rows,
                                   int64_t num_tokens, int top_k, int64_t channels,
                                   scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, kVec>;
  const int64_t packs = channels / kVec;
  const P* src_packs = reinterpret_cast<const P*>(src);
  P* out_packs = reinterpret_cast<P*>(out);
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t* rows = row_map + t * top_k;
    const float* w = weights == nullptr ? nullptr : weights + t * top_k;
    for (int64_t c = threadIdx.x; c < packs; c += blockDim.x) {
      acc_t acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = acc_t(0);
      for (int k = 0; k < top_k; ++k) {
        const int64_t r = rows[k];
        if (r < 0 || r >= num_rows) continue;
        const acc_t wk = w == nullptr ? acc_t(1) : static_cast<acc_t>(w[k]);
        const P p = src_packs[r * packs + c];
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += wk * static_cast<acc_t>(p.v[j]);
      }
      P o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
      out_packs[t * packs + c] = o;
    }
  }
}

// out[s] = <a[s / K], b[row_map[s]]>, one warp per slot, fp32; 0 when the row is invalid.
// a [T, C], b [num_rows, C], out [T*K] float.
template <typename scalar_t, int kVec>
__global__ void slot_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                const int64_t* __restrict__ row_map, int64_t num_slots,
                                int64_t num_rows, int top_k, int64_t channels,
                                float* __restrict__ out) {
  using P = Pack<scalar_t, kVec>;
  const int64_t packs = channels / kVec;
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       s < num_slots; s += warps_per_grid) {  // s is uniform within a warp: shuffles are safe
    const int64_t r = row_map[s];
    float acc = 0.f;
    if (r >= 0 && r < num_rows) {
      const P* x = reinterpret_cast<const P*>(a + (s / top_k) * channels);
      const P* y = reinterpret_cast<const P*>(b + r * channels);
      for (int64_t c = lane; c < packs; c += 32) {
        const P px = x[c];
        const P py = y[c];
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc += static_cast<float>(px.v[j]) * static_cast<float>(py.v[j]);
      }
    }
    for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(kFullMask, acc, offset);
    if (lane == 0) out[s] = acc;
  }
}

// ---------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------

constexpr int64_t kMaxGrid = 65535LL * 32;  // enough blocks to fill any GPU; kernels grid-stride

int grid_for(int64_t items, int64_t per_block) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((items + per_block - 1) / per_block, kMaxGrid)));
}

int row_threads(int64_t packs) {
  // One block per row/token: up to kThreads threads, whole warps, no more than needed.
  const int64_t warps = std::min<int64_t>(kWarps, (packs + 31) / 32);
  return static_cast<int>(std::max<int64_t>(1, warps) * 32);
}

// 16-byte packs when C and every row base allow it (rows start at multiples of
// C elements, so aligned bases + C % kVec == 0 keep every row aligned).
template <typename scalar_t>
constexpr int kWideVec = static_cast<int>(16 / sizeof(scalar_t));

template <typename scalar_t>
bool can_use_wide(int64_t channels, std::initializer_list<const void*> bases) {
  if (channels % kWideVec<scalar_t> != 0) return false;
  for (const void* p : bases)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Float types the row kernels take (fp64 is rejected by check_floating).
#define EVOMOE_DISPATCH_FLOAT(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

size_t rank_smem_bytes(int num_experts) {
  return static_cast<size_t>(num_experts) * (sizeof(int64_t) + sizeof(int) * (kWarps + 1));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
}

void check_experts(int64_t num_experts) {
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "num_experts must be in [1, ",
              kMaxExperts, "], got ", num_experts);
}

void check_floating(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, name,
              " must be float32, float16 or bfloat16, got ", dt);
}

bool is_index_type(const at::Tensor& t) {
  return t.scalar_type() == at::kLong || t.scalar_type() == at::kInt;
}

// Index tensors may come as int32 or int64; the kernels read int64.
at::Tensor as_int64(const at::Tensor& t) { return t.to(at::kLong).contiguous(); }

void check_row_map(const at::Tensor& row_map, const at::Tensor& like) {
  check_cuda(row_map, "row_map");
  TORCH_CHECK(row_map.dim() == 2 && is_index_type(row_map),
              "row_map must be int64 (or int32) [T, K], got ", row_map.scalar_type(), " ",
              row_map.sizes());
  TORCH_CHECK(row_map.device() == like.device(), "row_map is on ", row_map.device(), " but data on ",
              like.device());
}

// Gates as float32 [T*K] on the device (the kernels read fp32 weights).
at::Tensor gates_as_float(const at::Tensor& gates, const at::Tensor& row_map) {
  check_cuda(gates, "gates");
  TORCH_CHECK(gates.sizes() == row_map.sizes(), "gates must match row_map ", row_map.sizes(),
              ", got ", gates.sizes());
  TORCH_CHECK(at::isFloatingType(gates.scalar_type()), "gates must be floating point, got ",
              gates.scalar_type());
  return gates.to(at::kFloat).contiguous();
}

at::Tensor invert_row_map(const at::Tensor& row_map, int64_t num_rows) {
  auto slot_of_row = at::full({num_rows}, -1, row_map.options());
  const int64_t num_slots = row_map.numel();
  if (num_slots > 0 && num_rows > 0) {
    invert_kernel<<<grid_for(num_slots, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        row_map.data_ptr<int64_t>(), num_slots, num_rows, slot_of_row.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return slot_of_row;
}

at::Tensor gather_rows(const at::Tensor& src, const at::Tensor& slot_of_row, const float* scale,
                       int64_t top_k) {
  const int64_t num_rows = slot_of_row.numel();
  const int64_t channels = src.size(1);
  auto out = at::empty({num_rows, channels}, src.options());
  if (num_rows == 0 || channels == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  EVOMOE_DISPATCH_FLOAT(src.scalar_type(), "evomoe_gather_rows", [&] {
    const int grid = grid_for(num_rows, 1);
    if (can_use_wide<scalar_t>(channels, {src.data_ptr(), out.data_ptr()})) {
      constexpr int kVec = kWideVec<scalar_t>;
      gather_rows_kernel<scalar_t, kVec><<<grid, row_threads(channels / kVec), 0, stream>>>(
          src.data_ptr<scalar_t>(), slot_of_row.data_ptr<int64_t>(), scale, num_rows,
          static_cast<int>(top_k), channels, out.data_ptr<scalar_t>());
    } else {
      gather_rows_kernel<scalar_t, 1><<<grid, row_threads(channels), 0, stream>>>(
          src.data_ptr<scalar_t>(), slot_of_row.data_ptr<int64_t>(), scale, num_rows,
          static_cast<int>(top_k), channels, out.data_ptr<scalar_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor reduce_rows(const at::Tensor& src, const at::Tensor& row_map, const float* weights) {
  const int64_t num_tokens = row_map.size(0);
  const int64_t top_k = row_map.size(1);
  const int64_t channels = src.size(1);
  if (top_k == 0 || src.size(0) == 0) return at::zeros({num_tokens, channels}, src.options());
  auto out = at::empty({num_tokens, channels}, src.options());
  if (num_tokens == 0 || channels == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  EVOMOE_DISPATCH_FLOAT(src.scalar_type(), "evomoe_reduce_rows", [&] {
    const int grid = grid_for(num_tokens, 1);
    if (can_use_wide<scalar_t>(channels, {src.data_ptr(), out.data_ptr()})) {
      constexpr int kVec = kWideVec<scalar_t>;
      reduce_rows_kernel<scalar_t, kVec><<<grid, row_threads(channels / kVec), 0, stream>>>(
          src.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), weights, src.size(0), num_tokens,
          static_cast<int>(top_k), channels, out.data_ptr<scalar_t>());
    } else {
      reduce_rows_kernel<scalar_t, 1><<<grid, row_threads(channels), 0, stream>>>(
          src.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), weights, src.size(0), num_tokens,
          static_cast<int>(top_k), channels, out.data_ptr<scalar_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// grad_gates [T*K] float: <a[s / K], b[row_map[s]]> per slot s.
at::Tensor slot_dots(const at::Tensor& a, const at::Tensor& b, const at::Tensor& row_map) {
  const int64_t num_slots = row_map.numel();
  const int64_t top_k = row_map.size(1);
  const int64_t num_rows = b.size(0);
  const int64_t channels = b.size(1);
  auto out = at::zeros({num_slots}, b.options().dtype(at::kFloat));
  if (num_slots == 0 || channels == 0 || num_rows == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  EVOMOE_DISPATCH_FLOAT(b.scalar_type(), "evomoe_slot_dot", [&] {
    const int grid = grid_for(num_slots, kWarps);
    if (can_use_wide<scalar_t>(channels, {a.data_ptr(), b.data_ptr()})) {
      slot_dot_kernel<scalar_t, kWideVec<scalar_t>><<<grid, kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), num_slots,
          num_rows, static_cast<int>(top_k), channels, out.data_ptr<float>());
    } else {
      slot_dot_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(
          a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(), num_slots,
          num_rows, static_cast<int>(top_k), channels, out.data_ptr<float>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

at::Tensor expert_histogram_cuda(const at::Tensor& topk_idx_in, int64_t num_experts) {
  check_cuda(topk_idx_in, "topk_idx");
  check_experts(num_experts);
  TORCH_CHECK(is_index_type(topk_idx_in), "topk_idx must be int64 (or int32), got ",
              topk_idx_in.scalar_type());
  const c10::cuda::CUDAGuard guard(topk_idx_in.device());
  const auto topk_idx = as_int64(topk_idx_in);
  auto counts = at::zeros({num_experts}, topk_idx.options());
  const int64_t num_slots = topk_idx.numel();
  if (num_slots == 0) return counts;
  // Each block folds kHistSlotsPerBlock slots into shared memory before one
  // global atomic per expert, keeping global atomics few.
  const int grid = grid_for(num_slots, kHistSlotsPerBlock);
  histogram_kernel<<<grid, kThreads, num_experts * sizeof(unsigned int),
                     c10::cuda::getCurrentCUDAStream()>>>(
      topk_idx.data_ptr<int64_t>(), num_slots, static_cast<int>(num_experts),
      reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return counts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x_in,
                                                            const at::Tensor& topk_idx_in,
                                                            int64_t num_experts) {
  check_cuda(x_in, "x");
  check_cuda(topk_idx_in, "topk_idx");
  check_experts(num_experts);
  check_floating(x_in, "x");
  TORCH_CHECK(x_in.dim() == 2, "x must be [T, C], got ", x_in.sizes());
  TORCH_CHECK(topk_idx_in.dim() == 2 && is_index_type(topk_idx_in),
              "topk_idx must be int64 (or int32) [T, K], got ", topk_idx_in.scalar_type(), " ",
              topk_idx_in.sizes());
  TORCH_CHECK(topk_idx_in.size(0) == x_in.size(0), "topk_idx has ", topk_idx_in.size(0),
              " tokens but x has ", x_in.size(0));
  TORCH_CHECK(x_in.device() == topk_idx_in.device(), "x is on ", x_in.device(), " but topk_idx on ",
              topk_idx_in.device());
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const auto topk_idx = as_int64(topk_idx_in);
  const int64_t top_k = topk_idx.size(1);
  const int64_t num_slots = topk_idx.numel();
  auto stream = c10::cuda::getCurrentCUDAStream();

  if (num_slots == 0) {
    return {at::empty({0, x.size(1)}, x.options()), at::empty(topk_idx.sizes(), topk_idx.options()),
            at::zeros({num_experts}, topk_idx.options())};
  }

  const int64_t num_chunks = (num_slots + kChunk - 1) / kChunk;
  TORCH_CHECK(num_chunks <= kMaxGrid, "too many slots for one launch: ", num_slots);
  const int experts = static_cast<int>(num_experts);
  auto chunk_counts = at::empty({num_chunks, num_experts}, topk_idx.options());
  chunk_count_kernel<<<static_cast<int>(num_chunks), kThreads, experts * sizeof(unsigned int), stream>>>(
      topk_idx.data_ptr<int64_t>(), num_slots, experts, chunk_counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto counts = chunk_counts.sum(0);                                  // [E]
  auto expert_offsets = counts.cumsum(0) - counts;                    // [E] exclusive
  auto chunk_base = (chunk_counts.cumsum(0) - chunk_counts + expert_offsets.unsqueeze(0)).contiguous();

  auto row_map = at::empty({num_slots}, topk_idx.options());
  rank_kernel<<<static_cast<int>(num_chunks), kThreads, rank_smem_bytes(experts), stream>>>(
      topk_idx.data_ptr<int64_t>(), num_slots, experts, chunk_base.data_ptr<int64_t>(),
      row_map.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const auto slot_of_row = invert_row_map(row_map, num_slots);
  auto x_perm = gather_rows(x, slot_of_row, nullptr, top_k);
  return {x_perm, row_map.view({topk_idx.size(0), top_k}), counts};
}

at::Tensor unpermute_cuda(const at::Tensor& y_perm_in, const at::Tensor& row_map_in,
                          const std::optional<at::Tensor>& gates) {
  check_cuda(y_perm_in, "y_perm");
  check_floating(y_perm_in, "y_perm");
  TORCH_CHECK(y_perm_in.dim() == 2, "y_perm must be [N, C], got ", y_perm_in.sizes());
  check_row_map(row_map_in, y_perm_in);
  const c10::cuda::CUDAGuard guard(y_perm_in.device());
  const auto y_perm = y_perm_in.contiguous();
  const auto row_map = as_int64(row_map_in);
  if (gates.has_value()) {
    const auto w = gates_as_float(*gates, row_map);
    return reduce_rows(y_perm, row_map, w.data_ptr<float>());
  }
  return reduce_rows(y_perm, row_map, nullptr);
}

at::Tensor permute_backward_cuda(const at::Tensor& grad_x_perm, const at::Tensor& row_map) {
  return unpermute_cuda(grad_x_perm, row_map, std::nullopt);
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_y_in,
                                                           const at::Tensor& y_perm_in,
                                                           const at::Tensor& row_map_in,
                                                           const at::Tensor& gates) {
  check_cuda(grad_y_in, "grad_y");
  check_cuda(y_perm_in, "y_perm");
  check_floating(y_perm_in, "y_perm");
  TORCH_CHECK(y_perm_in.dim() == 2, "y_perm must be [N, C], got ", y_perm_in.sizes());
  check_row_map(row_map_in, y_perm_in);
  TORCH_CHECK(grad_y_in.dim() == 2 && grad_y_in.size(0) == row_map_in.size(0) &&
                  grad_y_in.size(1) == y_perm_in.size(1),
              "grad_y must be [T, C] = [", row_map_in.size(0), ", ", y_perm_in.size(1), "], got ",
              grad_y_in.sizes());
  const c10::cuda::CUDAGuard guard(y_perm_in.device());
  const auto y_perm = y_perm_in.contiguous();
  const auto grad_y = grad_y_in.to(y_perm.scalar_type()).contiguous();
  const auto row_map = as_int64(row_map_in);
  const auto w = gates_as_float(gates, row_map);
  const int64_t num_rows = y_perm.size(0);

  const auto slot_of_row = invert_row_map(row_map, num_rows);
  auto grad_y_perm = gather_rows(grad_y, slot_of_row, w.data_ptr<float>(), row_map.size(1));
  auto grad_gates = slot_dots(grad_y, y_perm, row_map);
  return {grad_y_perm, grad_gates.view(row_map.sizes()).to(gates.scalar_type())};
}

}  // namespace evomoe

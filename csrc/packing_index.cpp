// megatron_evomoe._C_data: the packed-sequence index builder.
//
// Pure C++17 + pybind11 (no torch headers) so it compiles in seconds. The
// pure-Python twin lives in megatron_evomoe/data/packing.py and must give
// bit-identical results; change both together and bump kIndexFormatVersion.
//
// Algorithm (documented in detail in packing.py):
//   1. visiting order: sample indices sorted by (key_i, i) where
//      key_i = splitmix64(seed, i) -- a counter-based PRNG, so NumPy can
//      produce the same keys vectorised. shuffle=false keeps index order.
//   2. over-long samples (length > seq_len): error naming the first one, or
//      truncated to seq_len, or skipped (left out of sample_order).
//   3. packing in visiting order, either
//      first_fit: each sample goes to the lowest-numbered bin with room
//                 (a max segment tree over bin capacities: O(n log bins)), or
//      next_fit:  each sample goes to the current bin, or opens a new one.
//   4. sample_order lists the samples bin by bin, each bin's samples in the
//      order they were placed; bin b is sample_order[bin_offsets[b]:bin_offsets[b+1]].

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int kIndexFormatVersion = 1;

enum class PackMode { kFirstFit, kNextFit };
enum class Overlong { kError, kTruncate, kSkip };

PackMode parse_mode(const std::string& mode) {
  if (mode == "first_fit") return PackMode::kFirstFit;
  if (mode == "next_fit") return PackMode::kNextFit;
  throw py::value_error("mode must be 'first_fit' or 'next_fit', got '" + mode + "'");
}

Overlong parse_overlong(const std::string& on_overlong) {
  if (on_overlong == "error") return Overlong::kError;
  if (on_overlong == "truncate") return Overlong::kTruncate;
  if (on_overlong == "skip") return Overlong::kSkip;
  throw py::value_error("on_overlong must be 'error', 'truncate' or 'skip', got '" +
                        on_overlong + "'");
}

// splitmix64 evaluated at a counter: output number `counter` of the stream
// seeded with `seed`. Unsigned arithmetic wraps mod 2^64, as NumPy uint64 does.
inline uint64_t splitmix64(uint64_t seed, uint64_t counter) {
  uint64_t z = seed + (counter + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::vector<int32_t> visiting_order(int64_t n, uint64_t seed, bool shuffle) {
  std::vector<int32_t> order(static_cast<size_t>(n));
  if (!shuffle) {
    for (int64_t i = 0; i < n; ++i) order[i] = static_cast<int32_t>(i);
    return order;
  }
  // Sorting (key, index) pairs equals NumPy's stable argsort of the keys.
  std::vector<std::pair<uint64_t, int32_t>> keyed(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) keyed[i] = {splitmix64(seed, static_cast<uint64_t>(i)),
                                              static_cast<int32_t>(i)};
  std::sort(keyed.begin(), keyed.end());
  for (int64_t i = 0; i < n; ++i) order[i] = keyed[i].second;
  return order;
}

// First-fit with a max segment tree over bin capacities. Leaves are bins in
// opening order; unopened bins sit at full capacity, so "the leftmost leaf
// with room" is the lowest open bin with room or else the next new bin.
// Bound on the number of leaves: in first-fit any two bins hold more than
// seq_len together, so bins < 2 * total / seq_len + 1.
int64_t first_fit(const std::vector<int64_t>& sizes, int64_t seq_len, int64_t total,
                  std::vector<int64_t>* bin_of) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  if (n == 0) return 0;
  const int64_t leaves = std::max<int64_t>(1, std::min<int64_t>(n, 2 * (total / seq_len) + 2));
  int64_t width = 1;
  while (width < leaves) width <<= 1;
  std::vector<int64_t> tree(static_cast<size_t>(2 * width), -1);  // padding leaves never fit
  for (int64_t j = 0; j < leaves; ++j) tree[width + j] = seq_len;
  for (int64_t node = width - 1; node >= 1; --node)
    tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);

  int64_t num_bins = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t size = sizes[i];
    if (tree[1] < size) throw std::logic_error("first_fit: bin bound violated (internal error)");
    int64_t node = 1;
    while (node < width) node = tree[2 * node] >= size ? 2 * node : 2 * node + 1;
    const int64_t bin = node - width;
    (*bin_of)[i] = bin;
    num_bins = std::max(num_bins, bin + 1);
    tree[node] -= size;
    for (node >>= 1; node >= 1; node >>= 1)
      tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
  }
  return num_bins;
}

int64_t next_fit(const std::vector<int64_t>& sizes, int64_t seq_len, std::vector<int64_t>* bin_of) {
  int64_t num_bins = 0;
  int64_t used = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (num_bins == 0 || used + sizes[i] > seq_len) {
      ++num_bins;
      used = 0;
    }
    (*bin_of)[i] = num_bins - 1;
    used += sizes[i];
  }
  return num_bins;
}

std::string overlong_message(int64_t index, int64_t length, int64_t seq_len, int64_t count) {
  return "sample " + std::to_string(index) + " has " + std::to_string(length) +
         " tokens, more than seq_len=" + std::to_string(seq_len) + " (" + std::to_string(count) +
         " over-long sample(s) in all); pass on_overlong='truncate' or 'skip' to keep going";
}

struct PackResult {
  std::vector<int64_t> bin_offsets;
  std::vector<int32_t> sample_order;
};

// Everything below runs without the GIL: plain vectors only.
PackResult pack(const int32_t* lengths, int64_t n, int64_t seq_len, uint64_t seed, PackMode mode,
                Overlong overlong, bool shuffle) {
  const std::vector<int32_t> order = visiting_order(n, seed, shuffle);

  std::vector<int32_t> kept;  // sample indices in visiting order, over-long ones dropped on skip
  std::vector<int64_t> sizes;
  kept.reserve(static_cast<size_t>(n));
  sizes.reserve(static_cast<size_t>(n));
  int64_t total = 0;
  for (int64_t v = 0; v < n; ++v) {
    const int32_t i = order[v];
    int64_t size = lengths[i];
    if (size > seq_len) {
      if (overlong == Overlong::kSkip) continue;
      size = seq_len;  // kTruncate (kError was rejected before packing)
    }
    kept.push_back(i);
    sizes.push_back(size);
    total += size;
  }

  std::vector<int64_t> bin_of(sizes.size());
  const int64_t num_bins = mode == PackMode::kFirstFit ? first_fit(sizes, seq_len, total, &bin_of)
                                                       : next_fit(sizes, seq_len, &bin_of);

  // Counting sort by bin, stable in placement order.
  PackResult result;
  result.bin_offsets.assign(static_cast<size_t>(num_bins + 1), 0);
  for (int64_t b : bin_of) ++result.bin_offsets[b + 1];
  for (int64_t b = 0; b < num_bins; ++b) result.bin_offsets[b + 1] += result.bin_offsets[b];
  std::vector<int64_t> cursor(result.bin_offsets.begin(), result.bin_offsets.end() - 1);
  result.sample_order.resize(kept.size());
  for (size_t v = 0; v < kept.size(); ++v) result.sample_order[cursor[bin_of[v]]++] = kept[v];
  return result;
}

py::tuple build_packing_index(
    py::array_t<int32_t, py::array::c_style | py::array::forcecast> lengths, int64_t seq_len,
    uint64_t seed, const std::string& mode, const std::string& on_overlong, bool shuffle) {
  if (lengths.ndim() != 1)
    throw py::value_error("lengths must be 1-D, got " + std::to_string(lengths.ndim()) + "-D");
  if (seq_len <= 0) throw py::value_error("seq_len must be positive, got " + std::to_string(seq_len));
  const PackMode pack_mode = parse_mode(mode);
  const Overlong overlong = parse_overlong(on_overlong);
  const int64_t n = lengths.shape(0);
  const int32_t* len = lengths.data();

  int64_t first_overlong = -1;
  int64_t num_overlong = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (len[i] < 0)
      throw py::value_error("sample " + std::to_string(i) + " has negative length " +
                            std::to_string(len[i]));
    if (len[i] > seq_len) {
      if (first_overlong < 0) first_overlong = i;
      ++num_overlong;
    }
  }
  if (num_overlong > 0 && overlong == Overlong::kError)
    throw py::value_error(overlong_message(first_overlong, len[first_overlong], seq_len, num_overlong));

  PackResult result;
  {
    py::gil_scoped_release release;
    result = pack(len, n, seq_len, seed, pack_mode, overlong, shuffle);
  }

  py::array_t<int64_t> bin_offsets(static_cast<py::ssize_t>(result.bin_offsets.size()));
  std::copy(result.bin_offsets.begin(), result.bin_offsets.end(), bin_offsets.mutable_data());
  py::array_t<int32_t> sample_order(static_cast<py::ssize_t>(result.sample_order.size()));
  std::copy(result.sample_order.begin(), result.sample_order.end(), sample_order.mutable_data());
  return py::make_tuple(bin_offsets, sample_order);
}

}  // namespace

PYBIND11_MODULE(_C_data, m) {
  m.doc() = "megatron_evomoe C++ data helpers (packed-sequence index builder)";
  m.attr("INDEX_FORMAT_VERSION") = kIndexFormatVersion;
  m.def("build_packing_index", &build_packing_index, py::arg("lengths"), py::arg("seq_len"),
        py::arg("seed") = 0, py::arg("mode") = "first_fit", py::arg("on_overlong") = "error",
        py::arg("shuffle") = true,
        "build_packing_index(lengths: int32[N], seq_len, seed=0, mode='first_fit',\n"
        "                    on_overlong='error', shuffle=True)\n"
        "  -> (bin_offsets: int64[num_bins + 1], sample_order: int32[num_kept])\n"
        "See megatron_evomoe.data.packing for the algorithm; results equal the Python fallback.");
}

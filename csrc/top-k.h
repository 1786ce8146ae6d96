// Top-k selection over one row of logits, for the sampler (numpy's argpartition over a
// 200k-entry vocabulary costs ~2 ms; one pass with a small heap costs a fraction of that).
#pragma once

#include <cstdint>
#include <vector>

namespace sambay {

// indices of the k largest values, largest first (ties: lower index first); k is clamped to n
std::vector<int32_t> top_k_indices(const float * values, int64_t n, int64_t k);

} // namespace sambay

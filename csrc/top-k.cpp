#include "top-k.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <queue>
#include <utility>

namespace sambay {

std::vector<int32_t> top_k_indices(const float * values, int64_t n, int64_t k) {
    k = std::max<int64_t>(0, std::min(k, n));
    // "better" = larger value, then lower index; NaN ranks below everything
    auto key = [&](int32_t i) { return std::isnan(values[i]) ? -INFINITY : values[i]; };
    auto better = [&](int32_t a, int32_t b) {
        const float va = key(a), vb = key(b);
        return va > vb || (va == vb && a < b);
    };
    // min-heap of the best k so far: the root is the worst kept
    std::priority_queue<int32_t, std::vector<int32_t>, decltype(better)> heap(better);
    for (int64_t i = 0; i < n; ++i) {
        if ((int64_t) heap.size() < k) {
            heap.push((int32_t) i);
        } else if (k > 0 && better((int32_t) i, heap.top())) {
            heap.pop();
            heap.push((int32_t) i);
        }
    }
    std::vector<int32_t> out(heap.size());
    for (int64_t j = (int64_t) out.size() - 1; j >= 0; --j) {
        out[j] = heap.top();
        heap.pop();
    }
    return out;
}

} // namespace sambay

#include "hugepages.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace sambay {

bool huge_pages_wanted() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const char * env = std::getenv("SAMBAY_HUGE_PAGES");
    return !(env && std::strcmp(env, "0") == 0);
#else
    return false;
#endif
}

size_t advise_huge_pages(ggml_backend_buffer_t buf, ggml_backend_dev_t dev) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr size_t HUGE_PAGE = 2u << 20;  // x86-64's and 4 KiB-page AArch64's PMD size
    if (!huge_pages_wanted() || !buf || !dev || ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_CPU) {
        return 0;
    }
    const size_t size = ggml_backend_buffer_get_size(buf);
    void * base = ggml_backend_buffer_get_base(buf);
    if (!base || size < HUGE_PAGE) return 0;
    // the whole pages inside the buffer (its edges may share pages with other allocations)
    const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
    const uintptr_t lo = ((uintptr_t) base + page - 1) & ~(page - 1);
    const uintptr_t hi = ((uintptr_t) base + size) & ~(page - 1);
    if (hi <= lo || madvise((void *) lo, hi - lo, MADV_HUGEPAGE) != 0) return 0;
    return hi - lo;
#else
    (void) buf;
    (void) dev;
    return 0;
#endif
}

} // namespace sambay

// Transparent huge pages for the large buffers a token reads end to end: the weights a CPU
// backend copied out of the file (repacked matrices, or all of them without mmap) and the
// caches. Decode streams gigabytes through them per token; with 4 KiB pages every 64 cache
// lines cost a TLB miss, which under a hypervisor is a two-level page walk. On a 2-vCPU KVM
// Xeon, Q4_0 weights in huge pages decode at 145 ms per token against 200 in small pages
// (docs/engine.md, "Memory pages").
#pragma once

#include "ggml-backend.h"

#include <cstddef>

namespace sambay {

// Asks the kernel to back the buffer's pages with huge pages when they are first touched, so it
// must run before the buffer is written (cleared or filled). Only host memory of a CPU device
// (other devices' buffers are theirs), only on Linux (madvise(MADV_HUGEPAGE); a no-op where the
// system's THP setting is "never"), only buffers of at least one huge page. SAMBAY_HUGE_PAGES=0
// turns it off (measurements). Returns the bytes advised (0 when it did nothing).
size_t advise_huge_pages(ggml_backend_buffer_t buf, ggml_backend_dev_t dev);

// whether advise_huge_pages can advise anything here: Linux with MADV_HUGEPAGE and
// SAMBAY_HUGE_PAGES not 0
bool huge_pages_wanted();

} // namespace sambay

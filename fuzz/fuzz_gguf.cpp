// libFuzzer entry point: arbitrary bytes as a GGUF file through the engine's load path (the
// same sambay::model constructor sambay.Llama reaches), then one short eval when it loads.
// Built by CMake with clang, SAMBAY_TOOLS=ON (and SAMBAY_SANITIZE=ON); see fuzz/README.md.
// A load_error is the expected outcome for almost every input; anything else that escapes
// (another exception, a crash, a sanitizer report) is a finding.
#include "context.h"
#include "errors.h"
#include "model.h"

#include "ggml.h"

#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

static void quiet_log(ggml_log_level, const char *, void *) {}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    static int fd = [] {
        ggml_log_set(quiet_log, nullptr);
        return memfd_create("fuzz.gguf", 0);
    }();
    if (fd < 0 || ftruncate(fd, 0) != 0) return 0;
    size_t done = 0;
    while (done < size) {
        const ssize_t n = pwrite(fd, data + done, size - done, (off_t) done);
        if (n <= 0) return 0;
        done += (size_t) n;
    }
    const std::string path = "/proc/self/fd/" + std::to_string(fd);
    try {
        sambay::model_params mp;
        mp.device = "cpu";
        mp.use_mmap = (size & 1) == 0;
        auto m = std::make_shared<const sambay::model>(path, mp);
        sambay::context_params cp;
        cp.n_ctx = 8; cp.n_batch = 4; cp.n_threads = 1;
        sambay::context c(m, cp);
        std::vector<int32_t> toks = {0, (int32_t) (m->hp().n_vocab - 1)};
        std::vector<float> logits(m->hp().n_vocab);
        c.eval(toks.data(), toks.size(), logits.data());
    } catch (const sambay::load_error &) {
    }
    return 0;
}

// LeakSanitizer check of the engine without Python in the way: load/unload a model and create
// and destroy many contexts (each evaluating a few tokens); built with SAMBAY_SANITIZE=ON and
// SAMBAY_TOOLS=ON (fuzz/README.md). Any leak makes LSan fail the process at exit.
//
//   sambay_leakcheck MODEL.gguf [N_LOADS] [N_CONTEXTS]
#include "context.h"
#include "errors.h"
#include "model.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

static long rss_kb() {
    std::ifstream f("/proc/self/status");
    std::string line;
    while (std::getline(f, line)) {
        if (line.rfind("VmRSS:", 0) == 0) return std::strtol(line.c_str() + 6, nullptr, 10);
    }
    return -1;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf [N_LOADS=20] [N_CONTEXTS=1000]\n", argv[0]);
        return 2;
    }
    const std::string path = argv[1];
    const int n_loads = argc > 2 ? std::atoi(argv[2]) : 20;
    const int n_ctx_cycles = argc > 3 ? std::atoi(argv[3]) : 1000;

    sambay::model_params mp;
    mp.device = "cpu";
    for (int i = 0; i < n_loads; ++i) {
        mp.use_mmap = i % 2 == 0;  // both the mapped and the streamed load paths
        auto m = std::make_shared<sambay::model>(path, mp);
    }
    // a rejected file must not leak either
    try {
        sambay::model bad("/nonexistent.gguf", mp);
    } catch (const sambay::load_error &) {
    }

    mp.use_mmap = true;
    auto m = std::make_shared<const sambay::model>(path, mp);
    sambay::context_params cp;
    cp.n_ctx = 64; cp.n_batch = 16; cp.n_threads = 1;
    std::vector<int32_t> toks = {1, 2, 3};
    std::vector<float> logits(m->hp().n_vocab);
    long rss_warm = 0;
    const int warm = std::min(100, n_ctx_cycles / 2);
    for (int i = 0; i < n_ctx_cycles; ++i) {
        if (i == warm) rss_warm = rss_kb();
        sambay::context c(m, cp);
        c.eval(toks.data(), toks.size(), logits.data());
        if (i % 7 == 0) {
            auto st = c.save_state();
            c.reset();
            c.load_state(st);
        }
    }
    const long rss_end = rss_kb();
    std::printf("loads=%d context_cycles=%d rss_after_%d=%ld kB rss_end=%ld kB growth=%ld kB\n",
                n_loads, n_ctx_cycles, warm, rss_warm, rss_end, rss_end - rss_warm);
    return 0;
}

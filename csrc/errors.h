// sambay's exception tree. Loaders and argument checks throw these; the bindings translate
// them to Python exception types by type (never by message text).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sambay {

// A GGUF file that cannot be this model: unreadable, truncated, wrong magic, another
// architecture, a missing or misshapen tensor, an absurd hparam. -> sambay.LoadError(ValueError)
struct load_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A call would need more context than the context has. -> sambay.ContextFullError(RuntimeError)
struct context_full_error : std::runtime_error {
    int64_t n_requested;
    int64_t n_ctx;
    context_full_error(int64_t n_requested, int64_t n_ctx)
        : std::runtime_error("context full: " + std::to_string(n_requested) +
                             " positions requested, but n_ctx is " + std::to_string(n_ctx)),
          n_requested(n_requested), n_ctx(n_ctx) {}
};

// A saved state that does not fit this model/context. -> sambay.StateError(ValueError)
struct state_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The backend failed to allocate or compute a graph. -> RuntimeError
struct compute_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

} // namespace sambay

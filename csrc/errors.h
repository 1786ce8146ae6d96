// sambay's exception tree. Loaders and argument checks throw these; the bindings translate
// them to Python exception types by type (never by message text).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace sambay {

// `s` with every byte that is not part of valid UTF-8 written as \xNN, and control characters
// other than newline and tab as \xNN: messages quote names and strings from the file, and
// Python can only turn valid UTF-8 into the exception's str (fuzzing found this).
inline std::string printable(const std::string & s) {
    static const char * hex = "0123456789abcdef";
    std::string out;
    out.reserve(s.size());
    auto esc = [&](unsigned char c) { out += "\\x"; out += hex[c >> 4]; out += hex[c & 15]; };
    for (size_t i = 0; i < s.size();) {
        const unsigned char c = (unsigned char) s[i];
        size_t n = 0;
        uint32_t cp = 0;
        if (c < 0x80) {
            if ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f) esc(c); else out += (char) c;
            ++i;
            continue;
        }
        if ((c & 0xE0) == 0xC0) { n = 2; cp = c & 0x1F; }
        else if ((c & 0xF0) == 0xE0) { n = 3; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { n = 4; cp = c & 0x07; }
        bool ok = n > 0 && i + n <= s.size();
        for (size_t k = 1; ok && k < n; ++k) {
            const unsigned char cc = (unsigned char) s[i + k];
            ok = (cc & 0xC0) == 0x80;
            cp = (cp << 6) | (cc & 0x3F);
        }
        // no overlong forms, no surrogates, nothing past U+10FFFF
        ok = ok && !(n == 2 && cp < 0x80) && !(n == 3 && cp < 0x800) && !(n == 4 && cp < 0x10000) &&
             !(cp >= 0xD800 && cp <= 0xDFFF) && cp <= 0x10FFFF;
        if (ok) {
            out.append(s, i, n);
            i += n;
        } else {
            esc(c);
            ++i;
        }
    }
    return out;
}

// A GGUF file that cannot be this model: unreadable, truncated, wrong magic, another
// architecture, a missing or misshapen tensor, an absurd hparam. -> sambay.LoadError(ValueError)
struct load_error : std::runtime_error {
    explicit load_error(const std::string & msg) : std::runtime_error(printable(msg)) {}
};

// A call would need more context than the context has. -> sambay.ContextFullError, both a
// ValueError (as llama-cpp-python raises for it, with its wording) and a RuntimeError.
// seq_id: the sequence that would overflow (n_ctx is per sequence).
struct context_full_error : std::runtime_error {
    int64_t n_requested;
    int64_t n_ctx;
    int64_t seq_id;
    context_full_error(int64_t n_requested, int64_t n_ctx, int64_t seq_id = 0)
        : std::runtime_error("Requested tokens (" + std::to_string(n_requested) +
                             ") exceed context window of " + std::to_string(n_ctx) +
                             (seq_id ? " (sequence " + std::to_string(seq_id) + ")" : std::string())),
          n_requested(n_requested), n_ctx(n_ctx), seq_id(seq_id) {}
};

// A saved state that does not fit this model/context. -> sambay.StateError(ValueError)
struct state_error : std::runtime_error {
    explicit state_error(const std::string & msg) : std::runtime_error(printable(msg)) {}
};

// The backend failed to allocate or compute a graph. -> sambay.ComputeError(RuntimeError)
struct compute_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// An evaluation stopped by context::cancel() or by decode()'s on_ubatch. -> sambay.AbortedError
// (RuntimeError). Stopped between micro-batches, the memory holds the tokens evaluated before;
// stopped inside a graph, it is inconsistent: the sequence must be reset() or given a saved
// state (load_state) before the next eval, which raises state_error until then.
struct aborted_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

} // namespace sambay

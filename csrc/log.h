// Scoped control of ggml's (global) log callback for the calling thread; other threads' logs
// pass through to the previous callback unchanged. Scopes are serialised process-wide (ggml has
// one callback slot: two threads' overlapping scopes would restore each other's pointers).
#pragma once

#include "ggml.h"

#include <mutex>
#include <string>
#include <thread>

namespace sambay {

class log_scope {
public:
    enum class mode {
        collect,  // keep everything this thread logs (for error messages), print nothing
        quiet,    // debug/info chatter (e.g. "repack: repack tensor ...") only as debug to an installed
                  // logger, never to stderr; warnings/errors pass through
    };
    explicit log_scope(mode m);
    ~log_scope();
    log_scope(const log_scope &) = delete;
    log_scope & operator=(const log_scope &) = delete;

    // collected lines without their "gguf_...: " prefixes, joined with "; "
    std::string summary() const;

private:
    static void callback(ggml_log_level level, const char * text, void * ud);
    void forward(ggml_log_level level, const char * text) const;

    std::unique_lock<std::recursive_mutex> lock_;
    mode              mode_;
    ggml_log_callback prev_cb_ = nullptr;
    void *            prev_ud_ = nullptr;
    std::thread::id   tid_     = std::this_thread::get_id();
    ggml_log_level    last_level_ = GGML_LOG_LEVEL_NONE;
    std::string       text_;
};

} // namespace sambay

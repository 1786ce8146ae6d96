#include "log.h"

#include <cstdio>

namespace sambay {

static std::recursive_mutex g_scope_mutex;

log_scope::log_scope(mode m) : lock_(g_scope_mutex), mode_(m) {
    ggml_log_get(&prev_cb_, &prev_ud_);
    ggml_log_set(callback, this);
}

log_scope::~log_scope() {
    ggml_log_set(prev_cb_, prev_ud_);
}

void log_scope::forward(ggml_log_level level, const char * text) const {
    if (prev_cb_) {
        prev_cb_(level, text, prev_ud_);
    } else {
        std::fputs(text, stderr);
    }
}

void log_scope::callback(ggml_log_level level, const char * text, void * ud) {
    auto * self = (log_scope *) ud;
    if (std::this_thread::get_id() != self->tid_) {
        self->forward(level, text);
        return;
    }
    if (level != GGML_LOG_LEVEL_CONT) {
        self->last_level_ = level;
    }
    switch (self->mode_) {
        case mode::collect:
            self->text_ += text;
            break;
        case mode::quiet:
            if (self->last_level_ == GGML_LOG_LEVEL_WARN || self->last_level_ == GGML_LOG_LEVEL_ERROR) {
                self->forward(level, text);
            } else if (self->prev_cb_) {
                // an installed logger (e.g. Python logging) still sees the chatter, as debug
                self->prev_cb_(GGML_LOG_LEVEL_DEBUG, text, self->prev_ud_);
            }
            break;
    }
}

std::string log_scope::summary() const {
    std::string out, line;
    auto flush = [&] {
        while (!line.empty() && line.back() == ' ') line.pop_back();
        const size_t colon = line.find(": ");
        if (colon != std::string::npos && line.compare(0, 4, "gguf") == 0) line = line.substr(colon + 2);
        if (!line.empty()) out += (out.empty() ? "" : "; ") + line;
        line.clear();
    };
    for (char ch : text_) {
        if (ch == '\n') flush(); else line += ch;
    }
    flush();
    return out;
}

} // namespace sambay

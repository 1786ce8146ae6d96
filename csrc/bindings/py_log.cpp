// ggml's log lines go to Python's `logging` (logger "sambay.ggml"), never straight to stderr:
// the library prints nothing; applications decide with logging's handlers.
#include "bindings.h"

#include "ggml.h"

#include <atomic>
#include <string>

namespace py = pybind11;

namespace sambay::py_bindings {

static std::atomic<bool> g_python_alive{false};

static void forward_log(enum ggml_log_level level, const char * text, void * /*user_data*/) {
    if (!g_python_alive.load() || text == nullptr || !Py_IsInitialized()) {
        return;
    }
    std::string msg(text);
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == '\r')) {
        msg.pop_back();
    }
    if (msg.empty()) {
        return;
    }
    int py_level = 10;  // DEBUG
    switch (level) {
        case GGML_LOG_LEVEL_INFO:  py_level = 20; break;
        case GGML_LOG_LEVEL_WARN:  py_level = 30; break;
        case GGML_LOG_LEVEL_ERROR: py_level = 40; break;
        default:                   py_level = 10; break;  // DEBUG, CONT, NONE
    }
    py::gil_scoped_acquire gil;
    try {
        py::module_::import("logging").attr("getLogger")("sambay.ggml").attr("log")(py_level, msg);
    } catch (py::error_already_set &) {
        PyErr_Clear();  // logging must never break inference
    }
}

void register_logging(py::module_ & m) {
    g_python_alive = true;
    ggml_log_set(forward_log, nullptr);
    // stop forwarding before the interpreter goes away (a late log would touch a dead runtime)
    py::module_::import("atexit").attr("register")(py::cpp_function([] {
        g_python_alive = false;
        ggml_log_set(nullptr, nullptr);
    }));
}

} // namespace sambay::py_bindings

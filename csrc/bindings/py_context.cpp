// sambay._core.Context: one sequence on a model (eval, state, memory report).
#include "bindings.h"

#include "context.h"
#include "errors.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <stdexcept>

namespace py = pybind11;

namespace sambay::py_bindings {

static ggml_type parse_kv_type(const std::string & s) {
    if (s == "f16" || s == "F16") return GGML_TYPE_F16;
    if (s == "f32" || s == "F32") return GGML_TYPE_F32;
    if (s == "bf16" || s == "BF16") return GGML_TYPE_BF16;
    throw std::invalid_argument("kv_type must be 'f16', 'f32' or 'bf16', got '" + s + "'");
}

void register_context(py::module_ & m) {
    py::class_<context>(m, "Context")
        .def(py::init([](std::shared_ptr<model> md, uint32_t n_ctx, uint32_t n_batch, int n_threads,
                         int n_threads_batch, bool logits_all, const std::string & kv_type, bool yoco, bool flash_attn) {
                 context_params p;
                 p.n_ctx = n_ctx; p.n_batch = n_batch; p.n_threads = n_threads; p.n_threads_batch = n_threads_batch;
                 p.logits_all = logits_all; p.kv_type = parse_kv_type(kv_type); p.yoco = yoco;
                 p.flash_attn = flash_attn;
                 py::gil_scoped_release release;
                 return std::make_unique<context>(std::move(md), p);
             }),
             py::arg("model"), py::kw_only(), py::arg("n_ctx") = 0, py::arg("n_batch") = 512,
             py::arg("n_threads") = 0, py::arg("n_threads_batch") = 0, py::arg("logits_all") = false,
             py::arg("kv_type") = "f16", py::arg("yoco") = true, py::arg("flash_attn") = false)
        .def("eval", [](context & c, py::object obj) {
            py::array arr = py::array::ensure(obj);
            if (!arr || arr.ndim() != 1) {
                throw std::invalid_argument("tokens must be a 1-D sequence of ints");
            }
            const char kind = arr.dtype().kind();
            if (arr.size() > 0 && kind != 'i' && kind != 'u') {
                throw py::type_error(std::string("tokens must be integers, got dtype ") +
                                     py::str(arr.dtype()).cast<std::string>());
            }
            auto tokens = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
            const int64_t n_vocab = c.get_model().hp().n_vocab;
            const auto * src = tokens.data();
            std::vector<int32_t> ids((size_t) tokens.size());
            for (size_t i = 0; i < ids.size(); ++i) {
                if (src[i] < 0 || src[i] >= n_vocab) {
                    throw std::invalid_argument("invalid token id " + std::to_string(src[i]) + " at index " +
                                                std::to_string(i) + " (n_vocab is " + std::to_string(n_vocab) + ")");
                }
                ids[i] = (int32_t) src[i];
            }
            const uint32_t n_out = c.n_outputs(ids.size());
            py::array_t<float> logits({(py::ssize_t) n_out, (py::ssize_t) n_vocab});
            float * out = logits.mutable_data();
            {
                py::gil_scoped_release release;
                c.eval(ids.data(), ids.size(), out);
            }
            return logits;
        }, py::arg("tokens"))
        .def("check_fits", &context::check_fits, py::arg("n_positions"),
             "raise ContextFullError when a sequence of n_positions would not fit")
        .def_property_readonly("n_past", &context::n_past)
        .def_property_readonly("n_ctx", [](const context & c) { return c.params().n_ctx; })
        .def_property_readonly("n_batch", [](const context & c) { return c.params().n_batch; })
        .def_property_readonly("n_threads", [](const context & c) { return c.params().n_threads; })
        .def_property_readonly("n_threads_batch", [](const context & c) { return c.params().n_threads_batch; })
        .def_property_readonly("logits_all", [](const context & c) { return c.params().logits_all; })
        .def_property_readonly("yoco", [](const context & c) { return c.params().yoco; })
        .def_property_readonly("flash_attn", [](const context & c) { return c.params().flash_attn; })
        .def_property_readonly("kv_type", [](const context & c) { return std::string(ggml_type_name(c.params().kv_type)); })
        .def_property_readonly("device", &context::device_name)
        .def("reset", [](context & c) {
            py::gil_scoped_release release;  // waits for a running eval (the context's lock)
            c.reset();
        })
        .def("cancel", &context::cancel,
             "stop a running eval at its next graph node (from any thread); eval raises AbortedError")
        .def("clear_cancel", &context::clear_cancel, "drop a cancel request that no eval has consumed")
        .def_property_readonly("cancel_requested", &context::cancel_requested)
        .def_property_readonly("needs_reset", &context::needs_reset)
        .def("save_state", [](const context & c) {
            std::vector<uint8_t> s;
            {
                py::gil_scoped_release release;
                s = c.save_state();
            }
            return py::bytes((const char *) s.data(), s.size());
        })
        .def("load_state", [](context & c, py::bytes data) {
            std::string_view sv = data;
            std::vector<uint8_t> s(sv.begin(), sv.end());
            py::gil_scoped_release release;
            c.load_state(s);
        }, py::arg("state"))
        .def("memory_breakdown", [](const context & c) {
            std::map<std::string, size_t> out;
            {
                py::gil_scoped_release release;
                out = c.memory_breakdown();
            }
            return out;
        });
}

} // namespace sambay::py_bindings

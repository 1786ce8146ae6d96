// sambay._core.Context: sequences on a model (eval, decode, state, memory report).
#include "bindings.h"

#include "context.h"
#include "errors.h"

#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>

namespace py = pybind11;

namespace sambay::py_bindings {

static ggml_type parse_kv_type(const std::string & s) {
    if (s == "f16" || s == "F16") return GGML_TYPE_F16;
    if (s == "f32" || s == "F32") return GGML_TYPE_F32;
    if (s == "bf16" || s == "BF16") return GGML_TYPE_BF16;
    throw std::invalid_argument("kv_type must be 'f16', 'f32' or 'bf16', got '" + s + "'");
}

// a 1-D sequence of token ids in [0, n_vocab)
static std::vector<int32_t> token_ids(const context & c, py::object obj) {
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
    const auto * src = tokens.data();
    c.check_tokens(src, (size_t) tokens.size());  // before narrowing: 2^32 + 1 is no token 1
    return std::vector<int32_t>(src, src + tokens.size());
}

static py::dict tuner_dict(const thread_tuner & t) {
    py::dict d;
    d["adaptive"] = t.adaptive(); d["current"] = t.current(); d["n_max"] = t.n_max();
    d["probes"] = t.n_probes(); d["switches"] = t.n_switches();
    return d;
}

void register_context(py::module_ & m) {
    // the thread count chooser alone (threads.h), for tests fed with synthetic step times
    py::class_<thread_tuner>(m, "ThreadTuner")
        .def(py::init<int, int>(), py::arg("n_max"), py::arg("n_fixed") = 0)
        .def("next", &thread_tuner::next)
        .def("record", &thread_tuner::record, py::arg("n"), py::arg("seconds"), py::arg("n_tokens"))
        .def_property_readonly("adaptive", &thread_tuner::adaptive)
        .def_property_readonly("current", &thread_tuner::current)
        .def_property_readonly("n_max", &thread_tuner::n_max)
        .def_property_readonly("probes", &thread_tuner::n_probes)
        .def_property_readonly("switches", &thread_tuner::n_switches)
        .def("report", &tuner_dict);
    m.def("usable_cores", &usable_cores, "the cores this process may run on (its affinity mask on Linux)");

    py::class_<context>(m, "Context")
        .def(py::init([](std::shared_ptr<model> md, uint32_t n_ctx, uint32_t n_batch, std::optional<int> n_threads,
                         std::optional<int> n_threads_batch, bool logits_all, const std::string & kv_type, bool yoco, bool flash_attn,
                         uint32_t n_seq_max) {
                 context_params p;
                 p.n_ctx = n_ctx; p.n_batch = n_batch; p.n_threads = n_threads.value_or(threads_auto);
                 p.n_threads_batch = n_threads_batch.value_or(threads_auto);
                 p.n_seq_max = n_seq_max;
                 p.logits_all = logits_all; p.kv_type = parse_kv_type(kv_type); p.yoco = yoco;
                 p.flash_attn = flash_attn;
                 py::gil_scoped_release release;
                 return std::make_unique<context>(std::move(md), p);
             }),
             py::arg("model"), py::kw_only(), py::arg("n_ctx") = 0, py::arg("n_batch") = 512,
             py::arg("n_threads") = py::none(), py::arg("n_threads_batch") = py::none(), py::arg("logits_all") = false,
             py::arg("kv_type") = "f16", py::arg("yoco") = true, py::arg("flash_attn") = false,
             py::arg("n_seq_max") = 1)
        .def("eval", [](context & c, py::object obj, py::object on_ubatch) {
            std::vector<int32_t> ids = token_ids(c, obj);
            const int64_t n_vocab = c.get_model().hp().n_vocab;
            const uint32_t n_out = c.n_outputs(ids.size());
            py::array_t<float> logits({(py::ssize_t) n_out, (py::ssize_t) n_vocab});
            float * out = logits.mutable_data();
            const bool all = c.params().logits_all;
            // between micro-batches, with the GIL held for the call only: the caller's hook sees
            // the rows written so far, then Python's signal handlers run (Ctrl-C). An exception
            // from either leaves decode() there, the memory holding the n_done tokens.
            ubatch_hook hook;
            hook.rows_each_ubatch = !on_ubatch.is_none();
            hook.on_ubatch = [&](size_t n_done, size_t n_total) {
                py::gil_scoped_acquire gil;
                if (!on_ubatch.is_none()) {
                    on_ubatch(n_done, n_total, logits[py::slice(0, (py::ssize_t) (all ? n_done : 1), 1)]);
                }
                if (PyErr_CheckSignals() != 0) {
                    throw py::error_already_set();
                }
                return true;
            };
            {
                py::gil_scoped_release release;
                c.eval(ids.data(), ids.size(), out, hook);
            }
            return logits;
        }, py::arg("tokens"), py::kw_only(), py::arg("on_ubatch") = py::none())
        .def("decode", [](context & c, const std::vector<std::pair<uint32_t, py::object>> & batch) {
            // [(seq, tokens), ...] -> logits rows of every entry, one after the other
            std::vector<std::vector<int32_t>> ids;
            std::vector<seq_tokens> st;
            size_t rows = 0;
            for (const auto & [seq, obj] : batch) ids.push_back(token_ids(c, obj));
            for (size_t i = 0; i < batch.size(); ++i) {
                st.push_back(seq_tokens{batch[i].first, ids[i].data(), ids[i].size()});
                rows += c.n_outputs(ids[i].size());
            }
            const int64_t n_vocab = c.get_model().hp().n_vocab;
            py::array_t<float> logits({(py::ssize_t) rows, (py::ssize_t) n_vocab});
            float * out = logits.mutable_data();
            {
                py::gil_scoped_release release;
                c.decode(st, out);
            }
            return logits;
        }, py::arg("batch"))
        .def("n_outputs", &context::n_outputs, py::arg("n_tokens"),
             "rows of logits an eval of n_tokens tokens returns (n_tokens with logits_all, else 1; 0 for none)")
        .def_property_readonly("n_past", [](const context & c) { return c.n_past(0); })
        .def("seq_n_past", &context::n_past, py::arg("seq"))
        .def_property_readonly("n_seq_max", [](const context & c) { return c.params().n_seq_max; })
        .def("check_tokens", [](const context & c, py::object obj) { token_ids(c, obj); }, py::arg("tokens"),
             "raise ValueError (TypeError) for a token id outside [0, n_vocab) (not an integer), as eval would")
        .def("check_fits", &context::check_fits, py::arg("n_positions"), py::arg("seq") = 0,
             "raise ContextFullError when a sequence of n_positions would not fit")
        .def_property_readonly("n_ctx", [](const context & c) { return c.params().n_ctx; })
        .def_property_readonly("n_batch", [](const context & c) { return c.params().n_batch; })
        .def_property_readonly("n_threads", [](const context & c) { return c.threads(false).current(); })
        .def_property_readonly("n_threads_batch", [](const context & c) { return c.threads(true).current(); })
        .def_property_readonly("threads", [](const context & c) {
            py::dict d;
            for (bool batch : {false, true}) {
                const thread_tuner t = c.threads(batch);
                d[batch ? "batch" : "decode"] = tuner_dict(t);
            }
            return d;
        }, "per step kind: adaptive, current, n_max, probes, switches")
        .def_property_readonly("logits_all", [](const context & c) { return c.params().logits_all; })
        .def_property_readonly("yoco", [](const context & c) { return c.params().yoco; })
        .def_property_readonly("flash_attn", [](const context & c) { return c.params().flash_attn; })
        .def_property_readonly("kv_type", [](const context & c) { return std::string(ggml_type_name(c.params().kv_type)); })
        .def_property_readonly("device", &context::device_name)
        .def("reset", [](context & c) {
            py::gil_scoped_release release;  // waits for a running eval (the context's lock)
            c.reset();
        })
        .def("seq_reset", [](context & c, uint32_t seq) {
            py::gil_scoped_release release;
            c.reset_seq(seq);
        }, py::arg("seq"))
        .def("cancel", &context::cancel,
             "stop a running eval at its next graph node (from any thread); eval raises AbortedError")
        .def("clear_cancel", &context::clear_cancel, "drop a cancel request that no eval has consumed")
        .def_property_readonly("cancel_requested", &context::cancel_requested)
        .def_property_readonly("needs_reset", [](const context & c) { return c.needs_reset(0); })
        .def("seq_needs_reset", &context::needs_reset, py::arg("seq"))
        .def("save_state", [](const context & c, uint32_t seq) {
            std::vector<uint8_t> s;
            {
                py::gil_scoped_release release;
                s = c.save_state(seq);
            }
            return py::bytes((const char *) s.data(), s.size());
        }, py::arg("seq") = 0)
        .def("load_state", [](context & c, py::bytes data, uint32_t seq, std::optional<std::vector<int32_t>> tokens) {
            std::string_view sv = data;
            std::vector<uint8_t> s(sv.begin(), sv.end());
            py::gil_scoped_release release;
            c.load_state(s, seq, tokens ? &*tokens : nullptr);
        }, py::arg("state"), py::arg("seq") = 0, py::kw_only(), py::arg("tokens") = py::none())
        .def_property_readonly("huge_page_bytes", &context::huge_page_bytes)
        .def("memory_breakdown", [](const context & c) {
            std::map<std::string, size_t> out;
            {
                py::gil_scoped_release release;
                out = c.memory_breakdown();
            }
            return out;
        })
        .def("op_profile", [](const context & c) {
            std::map<std::string, std::pair<uint64_t, double>> out;
            {
                py::gil_scoped_release release;
                out = c.op_profile();
            }
            return out;
        })
        .def("reset_op_profile", [](context & c) {
            py::gil_scoped_release release;
            c.reset_op_profile();
        });
}

} // namespace sambay::py_bindings

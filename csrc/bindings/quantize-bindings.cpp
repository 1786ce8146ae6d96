#include "bindings.h"

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "quantize.h"

namespace py = pybind11;

namespace sambay::py_bindings {

// the per-tensor options from Python keywords ("" : no override)
static quant_options make_options(bool pure, const std::string & output_type, const std::string & token_embd_type,
                                  bool leave_output) {
    quant_options opt;
    opt.pure = pure;
    opt.output_type = output_type.empty() ? GGML_TYPE_COUNT : quant_type_by_name(output_type);
    opt.token_embd_type = token_embd_type.empty() ? GGML_TYPE_COUNT : quant_type_by_name(token_embd_type);
    opt.leave_output = leave_output;
    return opt;
}

void register_quantize(py::module_ & m) {
    py::register_exception<quantize_error>(m, "QuantizeError", PyExc_ValueError);

    m.def("quantize_ftypes", [] {
        py::list out;
        for (const auto & ft : quant_ftypes()) {
            out.append(py::make_tuple(ft.name, ft.file_type, ggml_type_name(ft.default_type)));
        }
        return out;
    }, "(name, general.file_type, default tensor type) of every supported quantization type");

    m.def("quantize_ftype_name", [](const std::string & spec) { return quant_ftype_by_name(spec).name; },
          py::arg("spec"), "the type name of a name, an alias (Q4_K) or a numeric id (15)");

    m.def("quantize_tensor_type",
        [](const std::string & ftype, const std::string & name, int n_dims, int64_t ne0,
           const std::string & cur_type, int i_layer, int n_layer, bool pure, const std::string & output_type,
           const std::string & token_embd_type, bool leave_output, bool tied_output) {
            ggml_type cur = GGML_TYPE_COUNT;
            for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
                const char * tn = ggml_type_name((ggml_type) t);
                if (tn && cur_type == tn) {
                    cur = (ggml_type) t;
                }
            }
            if (cur == GGML_TYPE_COUNT) {
                throw quantize_error("unknown ggml type '" + cur_type + "'");
            }
            const tensor_desc desc{name, n_dims, ne0, cur, i_layer, n_layer};
            quant_options opt = make_options(pure, output_type, token_embd_type, leave_output);
            opt.tied_output = tied_output;
            return std::string(ggml_type_name(quant_tensor_type(quant_ftype_by_name(ftype), desc, opt)));
        },
        py::arg("ftype"), py::arg("name"), py::arg("n_dims"), py::arg("ne0"), py::arg("cur_type"),
        py::arg("i_layer"), py::arg("n_layer"), py::kw_only(), py::arg("pure") = false,
        py::arg("output_type") = "", py::arg("token_embd_type") = "", py::arg("leave_output") = false,
        py::arg("tied_output") = true,
        "the type quantize_file gives one tensor (exposes the per-tensor rules for tests)");

    m.def("quantize_file",
        [](const std::string & input, const std::string & output, const std::string & ftype,
           int n_threads, py::object progress, bool pure, const std::string & output_type,
           const std::string & token_embd_type, bool leave_output, bool allow_requantize, bool dry_run) {
            quantize_params params;
            params.input = input;
            params.output = output;
            params.ftype = ftype;
            params.n_threads = n_threads;
            params.options = make_options(pure, output_type, token_embd_type, leave_output);
            params.allow_requantize = allow_requantize;
            params.dry_run = dry_run;
            // after every tensor, with or without a progress callback: Python's signal
            // handlers run (Ctrl-C, and SIGTERM for sambay.quantize's cleanup)
            params.progress = [progress](size_t i, size_t n, const std::string & name,
                                         const std::string & type) {
                py::gil_scoped_acquire gil;
                if (!progress.is_none()) {
                    progress(i, n, name, type);
                }
                if (PyErr_CheckSignals() != 0) {
                    throw py::error_already_set();
                }
            };
            quantize_result r;
            {
                py::gil_scoped_release nogil;
                r = quantize_file(params);
            }
            py::dict out;
            out["bytes_in"] = r.bytes_in;
            out["bytes_out"] = r.bytes_out;
            out["tensor_types"] = r.tensor_types;
            py::list plan;
            for (const auto & p : r.plan) {
                plan.append(py::make_tuple(p.name, p.from, p.to, p.bytes_in, p.bytes_out));
            }
            out["plan"] = plan;
            return out;
        },
        py::arg("input"), py::arg("output"), py::arg("ftype"), py::kw_only(),
        py::arg("n_threads") = 0, py::arg("progress") = py::none(), py::arg("pure") = false,
        py::arg("output_type") = "", py::arg("token_embd_type") = "", py::arg("leave_output") = false,
        py::arg("allow_requantize") = false, py::arg("dry_run") = false,
        "quantize a phi4flash GGUF into `output` (sambay.quantize makes that atomic)");
}

} // namespace sambay::py_bindings

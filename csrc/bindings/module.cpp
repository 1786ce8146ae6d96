// sambay._core: the C++ engine as seen from Python. Thin: argument conversion only.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "hparams.h"
#include "system-info.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
    m.doc() = "sambay C++ engine on ggml";

    m.attr("ARCH") = sambay::ARCH_NAME;
    py::list kinds;  // index = the value phi4flash.layer_types stores
    for (int v = 0; const char * name = sambay::layer_kind_name((sambay::layer_kind) v); ++v) kinds.append(name);
    m.attr("LAYER_KINDS") = py::tuple(kinds);

    sambay::py_bindings::register_logging(m);
    sambay::py_bindings::register_errors(m);
    sambay::py_bindings::register_model(m);
    sambay::py_bindings::register_context(m);

    m.def("system_info", [] {
        sambay::system_info info = sambay::get_system_info();
        py::dict out;
        out["ggml_version"] = info.ggml_version;
        out["ggml_commit"]  = info.ggml_commit;
        out["attn_kernel"]  = info.attn_kernel;
        out["mm_kernel"]    = info.mm_kernel;
        py::list backends;
        for (const auto & b : info.backends) {
            py::dict features;
            for (const auto & [k, v] : b.features) {
                features[py::str(k)] = v;
            }
            backends.append(py::dict(py::arg("name") = b.name, py::arg("features") = features));
        }
        out["backends"] = backends;
        py::list devices;
        for (const auto & d : info.devices) {
            devices.append(py::dict(py::arg("name") = d.name, py::arg("description") = d.description,
                                    py::arg("type") = d.type, py::arg("memory_free") = d.memory_free,
                                    py::arg("memory_total") = d.memory_total));
        }
        out["devices"] = devices;
        return out;
    }, "ggml version, backends with their features, and devices");

    sambay::py_bindings::register_quantize(m);
    sambay::py_bindings::register_sampling(m);
}

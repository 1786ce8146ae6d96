// sambay._core.Model: a loaded GGUF model, its hparams and metadata.
#include "bindings.h"

#include "model.h"

#include "gguf.h"

#include <pybind11/stl.h>

#include <cstdio>
#include <cstring>
#include <memory>

namespace py = pybind11;

namespace sambay::py_bindings {

// strings from the file are bytes: invalid UTF-8 is kept with surrogateescape (never an
// exception), as for the token strings
static py::object file_str(const char * s) {
    PyObject * u = PyUnicode_DecodeUTF8(s, (Py_ssize_t) std::strlen(s), "surrogateescape");
    if (!u) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(u);
}

static py::object scalar_value(const gguf_context * g, int64_t id, gguf_type t) {
    switch (t) {
        case GGUF_TYPE_UINT8:   return py::int_(gguf_get_val_u8(g, id));
        case GGUF_TYPE_INT8:    return py::int_(gguf_get_val_i8(g, id));
        case GGUF_TYPE_UINT16:  return py::int_(gguf_get_val_u16(g, id));
        case GGUF_TYPE_INT16:   return py::int_(gguf_get_val_i16(g, id));
        case GGUF_TYPE_UINT32:  return py::int_(gguf_get_val_u32(g, id));
        case GGUF_TYPE_INT32:   return py::int_(gguf_get_val_i32(g, id));
        case GGUF_TYPE_UINT64:  return py::int_(gguf_get_val_u64(g, id));
        case GGUF_TYPE_INT64:   return py::int_(gguf_get_val_i64(g, id));
        case GGUF_TYPE_FLOAT32: return py::float_(gguf_get_val_f32(g, id));
        case GGUF_TYPE_FLOAT64: return py::float_(gguf_get_val_f64(g, id));
        case GGUF_TYPE_BOOL:    return py::bool_(gguf_get_val_bool(g, id));
        case GGUF_TYPE_STRING:  return file_str(gguf_get_val_str(g, id));
        default:                return py::none();
    }
}

template <typename T, typename P>
static py::list arr_list(const gguf_context * g, int64_t id, size_t n) {
    const T * d = (const T *) gguf_get_arr_data(g, id);
    py::list out(n);
    for (size_t i = 0; i < n; ++i) out[i] = P(d[i]);
    return out;
}

static py::object kv_value(const gguf_context * g, int64_t id) {
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t != GGUF_TYPE_ARRAY) {
        return scalar_value(g, id, t);
    }
    const size_t n = gguf_get_arr_n(g, id);
    switch (gguf_get_arr_type(g, id)) {
        case GGUF_TYPE_UINT8:   return arr_list<uint8_t, py::int_>(g, id, n);
        case GGUF_TYPE_INT8:    return arr_list<int8_t, py::int_>(g, id, n);
        case GGUF_TYPE_UINT16:  return arr_list<uint16_t, py::int_>(g, id, n);
        case GGUF_TYPE_INT16:   return arr_list<int16_t, py::int_>(g, id, n);
        case GGUF_TYPE_UINT32:  return arr_list<uint32_t, py::int_>(g, id, n);
        case GGUF_TYPE_INT32:   return arr_list<int32_t, py::int_>(g, id, n);
        case GGUF_TYPE_UINT64:  return arr_list<uint64_t, py::int_>(g, id, n);
        case GGUF_TYPE_INT64:   return arr_list<int64_t, py::int_>(g, id, n);
        case GGUF_TYPE_FLOAT32: return arr_list<float, py::float_>(g, id, n);
        case GGUF_TYPE_FLOAT64: return arr_list<double, py::float_>(g, id, n);
        case GGUF_TYPE_BOOL:    return arr_list<int8_t, py::bool_>(g, id, n);
        case GGUF_TYPE_STRING: {
            py::list out(n);
            for (size_t i = 0; i < n; ++i) {
                const char * s = gguf_get_arr_str(g, id, i);
                // token strings are bytes-level; keep undecodable ones as bytes
                PyObject * u = PyUnicode_DecodeUTF8(s, (Py_ssize_t) strlen(s), "surrogateescape");
                if (!u) throw py::error_already_set();
                out[i] = py::reinterpret_steal<py::object>(u);
            }
            return out;
        }
        default: return py::none();
    }
}

void register_model(py::module_ & m) {
    py::class_<model, std::shared_ptr<model>>(m, "Model")
        .def(py::init([](const std::string & path, const std::string & device, int n_gpu_layers, bool use_mmap,
                         bool use_extra_bufts) {
                 model_params p;
                 p.device = device; p.n_gpu_layers = n_gpu_layers; p.use_mmap = use_mmap;
                 p.use_extra_bufts = use_extra_bufts;
                 py::gil_scoped_release release;
                 return std::make_shared<model>(path, p);
             }),
             py::arg("path"), py::kw_only(), py::arg("device") = "auto", py::arg("n_gpu_layers") = -1,
             py::arg("use_mmap") = true, py::arg("use_extra_bufts") = true)
        .def_property_readonly("path", [](const model & md) { return md.file().path(); })
        .def_property_readonly("n_vocab", [](const model & md) { return md.hp().n_vocab; })
        .def_property_readonly("n_embd", [](const model & md) { return md.hp().n_embd; })
        .def_property_readonly("n_layer", [](const model & md) { return md.hp().n_layer; })
        .def_property_readonly("n_ctx_train", [](const model & md) { return md.hp().n_ctx_train; })
        .def_property_readonly("n_swa", [](const model & md) { return md.hp().n_swa; })
        .def_property_readonly("layer_types", [](const model & md) {
            std::vector<int> out;
            for (auto k : md.hp().kinds) out.push_back((int) k);
            return out;
        })
        .def("hparams", [](const model & md) {
            const hparams & hp = md.hp();
            py::dict d;
            d["n_vocab"] = hp.n_vocab; d["n_ctx_train"] = hp.n_ctx_train; d["n_embd"] = hp.n_embd;
            d["n_layer"] = hp.n_layer; d["n_ff"] = hp.n_ff; d["n_head"] = hp.n_head;
            d["n_head_kv"] = hp.n_head_kv; d["n_embd_head"] = hp.n_embd_head; d["n_swa"] = hp.n_swa;
            d["norm_eps"] = hp.norm_eps; d["sub_norm_eps"] = hp.sub_norm_eps;
            d["d_conv"] = hp.d_conv; d["d_inner"] = hp.d_inner; d["d_state"] = hp.d_state; d["dt_rank"] = hp.dt_rank;
            d["memory_layer"] = hp.memory_layer; d["kv_shared_layer"] = hp.kv_shared_layer;
            std::vector<std::string> kinds;
            for (auto k : hp.kinds) kinds.emplace_back(layer_kind_name(k));
            d["layer_types"] = kinds;
            d["diff_lambda"] = hp.lambda; d["diff_lambda_init"] = hp.lambda_init;
            return d;
        })
        .def("metadata", [](const model & md) {
            const gguf_context * g = md.file().gguf();
            py::dict d;
            for (int64_t i = 0; i < gguf_get_n_kv(g); ++i) d[file_str(gguf_get_key(g, i))] = kv_value(g, i);
            return d;
        })
        .def("metadata_value", [](const model & md, const std::string & key, py::object dflt) {
            const gguf_context * g = md.file().gguf();
            const int64_t id = gguf_find_key(g, key.c_str());
            return id < 0 ? dflt : kv_value(g, id);
        }, py::arg("key"), py::arg("default") = py::none())
        .def("gpu_layers", [](const model & md, int n_gpu_layers) {
            // the layers a GPU gets for n_gpu_layers (model_params' meaning: -1 all), whether or
            // not this model has one: the placement rule on its own (gpu_layers in model.h)
            const uint32_t n = n_gpu_layers < 0 ? md.hp().n_layer + 1 : (uint32_t) n_gpu_layers;
            const layer_span s = gpu_layers(md.hp(), n);
            std::vector<uint32_t> out;
            for (uint32_t il = s.first; il < s.first + s.n; ++il) out.push_back(il);
            return out;
        }, py::arg("n_gpu_layers"))
        .def_property_readonly("device", &model::device_name)
        .def_property_readonly("mmapped", &model::mmapped)
        .def_property_readonly("huge_page_bytes", &model::huge_page_bytes)
        .def_property_readonly("weights_bytes", &model::weights_bytes)
        .def_property_readonly("fingerprint", [](const model & md) {
            char hex[17];
            std::snprintf(hex, sizeof(hex), "%016llx", (unsigned long long) md.fingerprint());
            return std::string(hex);
        })
        .def("__repr__", [](const model & md) {
            return "<sambay._core.Model '" + md.file().path() + "' n_layer=" + std::to_string(md.hp().n_layer) +
                   " n_embd=" + std::to_string(md.hp().n_embd) + " device=" + md.device_name() + ">";
        });
}

} // namespace sambay::py_bindings

#include "system-info.h"

#include "attn_cpu.h"
#include "matmul_cpu.h"

#include "ggml-backend.h"
#include "ggml.h"

namespace sambay {

static const char * device_type_name(enum ggml_backend_dev_type type) {
    switch (type) {
        case GGML_BACKEND_DEVICE_TYPE_CPU:   return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU:   return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU:  return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: return "accel";
        default:                             return "other";
    }
}

system_info get_system_info() {
    // harmless when the backends are linked statically (the PyPI wheels): it only adds
    // dynamically loadable backends found next to libggml or in $GGML_BACKEND_PATH
    static bool loaded = (ggml_backend_load_all(), true);
    (void) loaded;

    system_info info;
    info.ggml_version = ggml_version();
    info.ggml_commit  = ggml_commit();
    info.attn_kernel  = attn_scores_kernel_name();
    info.mm_kernel    = mul_mat_cpu_kernel_name();

    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        ggml_backend_reg_t reg = ggml_backend_reg_get(i);
        backend_info b;
        b.name = ggml_backend_reg_name(reg);
        auto get_features = (ggml_backend_get_features_t)
            ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
        if (get_features) {
            for (const ggml_backend_feature * f = get_features(reg); f && f->name; ++f) {
                b.features.emplace_back(f->name, f->value ? f->value : "");
            }
        }
        info.backends.push_back(std::move(b));
    }

    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        device_info d;
        d.name        = ggml_backend_dev_name(dev);
        d.description = ggml_backend_dev_description(dev);
        d.type        = device_type_name(ggml_backend_dev_type(dev));
        ggml_backend_dev_memory(dev, &d.memory_free, &d.memory_total);
        info.devices.push_back(std::move(d));
    }
    return info;
}

} // namespace sambay

// What the ggml this extension runs on offers: version, CPU features, backends and devices.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace sambay {

struct device_info {
    std::string name;         // ggml device name, e.g. "CPU", "CUDA0", "Metal"
    std::string description;  // human-readable, e.g. the CPU or GPU model
    std::string type;         // "cpu", "gpu", "igpu", "accel" or "meta"
    size_t memory_free  = 0;  // bytes
    size_t memory_total = 0;  // bytes
};

struct backend_info {
    std::string name;                                          // registry name, e.g. "CPU"
    std::vector<std::pair<std::string, std::string>> features; // as the backend reports them
};

struct system_info {
    std::string ggml_version;
    std::string ggml_commit;
    std::vector<backend_info> backends;
    std::vector<device_info> devices;
    std::string attn_kernel;  // the CPU attention kernel's SIMD path (attn_cpu.h)
    std::string mm_kernel;    // the decode weight-product kernel (matmul_cpu.h)
};

system_info get_system_info();

} // namespace sambay

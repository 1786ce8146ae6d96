// The model: hparams + weights in backend buffers, loaded from a phi4flash GGUF.
// Weights are placed per layer on a device (a GPU first when ggml has one and the caller
// allows it, else the CPU); CPU weights are used straight from the mmapped file when the
// CPU device can wrap host memory, otherwise streamed into a backend buffer (one copy).
#pragma once

#include "hparams.h"
#include "loader.h"

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <memory>
#include <string>
#include <vector>

namespace sambay {

struct model_params {
    std::string device       = "auto";  // "auto": first GPU if any, else CPU; "cpu"; or a ggml device name
    int         n_gpu_layers = -1;      // with a GPU: how many layers go there (-1 = all + output); which: gpu_layers()
    bool        use_mmap     = true;
    bool        use_extra_bufts = true;  // let the CPU repack quantized matrices it has fast kernels for
};

// The layers n_gpu of them on a GPU are, [first, first + n): the last n (llama.cpp's rule)
// when they hold the shared KV cache's writer (kv_shared_layer) and all its readers (the
// cross-attention layers after it), else the n layers right before the writer, so that the
// writer, its cache and the readers stay together on the CPU. Any other split leaves the cache
// on one device and some of its readers on the other: the scheduler would copy the used part
// of the cache (n_kv cells of K and V) across every micro-batch. The activations crossing at
// the two ends of the span are a few rows of n_embd values. n > n_layer means every layer.
// Falls back to the last n when neither fits (n between the writer's index and the length of
// the cross-decoder; not the case for the real model, 17 and 15 of 32 layers).
struct layer_span {
    uint32_t first = 0;
    uint32_t n     = 0;
};
layer_span gpu_layers(const hparams & hp, uint32_t n_gpu);

struct layer_weights {
    // every layer
    ggml_tensor * attn_norm = nullptr, * attn_norm_b = nullptr;
    ggml_tensor * ffn_norm  = nullptr, * ffn_norm_b  = nullptr;
    ggml_tensor * ffn_up    = nullptr;  // [n_embd, 2*n_ff]: gate rows then up rows
    ggml_tensor * ffn_down  = nullptr;  // [n_ff, n_embd]
    // mamba
    ggml_tensor * ssm_in = nullptr;                              // [n_embd, 2*d_inner] (x then z)
    ggml_tensor * ssm_conv1d = nullptr, * ssm_conv1d_b = nullptr;  // [d_conv, d_inner], [d_inner]
    ggml_tensor * ssm_x = nullptr;                               // [d_inner, dt_rank + 2*d_state]
    ggml_tensor * ssm_dt = nullptr, * ssm_dt_b = nullptr;        // [dt_rank, d_inner], [d_inner]
    ggml_tensor * ssm_a = nullptr;                               // [d_state, d_inner], = -exp(A_log)
    ggml_tensor * ssm_d = nullptr;                               // [d_inner]
    ggml_tensor * ssm_out = nullptr;                             // [d_inner, n_embd]
    // gmu
    ggml_tensor * gmu_in = nullptr, * gmu_out = nullptr;  // [n_embd, d_inner], [d_inner, n_embd]
    // attention (swa/full: wqkv; cross: wq)
    ggml_tensor * wqkv = nullptr, * bqkv = nullptr;  // [n_embd, (H + 2*Hkv)*hd] stripe-major Q, K
    ggml_tensor * wq = nullptr, * bq = nullptr;      // [n_embd, H*hd]
    ggml_tensor * wo = nullptr, * bo = nullptr;      // [H*hd, n_embd]
    ggml_tensor * sub_norm = nullptr;                // [2*hd]
};

class model {
public:
    model(const std::string & path, const model_params & params);
    model(const model &) = delete;
    model & operator=(const model &) = delete;

    const hparams & hp() const { return hparams_; }
    const gguf_file & file() const { return *file_; }
    const layer_weights & layer(uint32_t il) const { return layers_[il]; }

    ggml_tensor * tok_embd = nullptr;                      // [n_embd, n_vocab], also the output projection
    ggml_tensor * output_norm = nullptr, * output_norm_b = nullptr;

    // devices: the compute devices in scheduler priority order (GPU first, CPU last)
    const std::vector<ggml_backend_dev_t> & devices() const { return devices_; }
    ggml_backend_dev_t layer_device(uint32_t il) const { return layer_dev_[il]; }
    ggml_backend_dev_t output_device() const { return output_dev_; }
    std::string device_name() const;  // what the model mostly runs on, e.g. "CPU"
    bool mmapped() const { return mmapped_; }
    // bytes of weight buffers the kernel was asked to back with huge pages (hugepages.h)
    size_t huge_page_bytes() const { return huge_page_bytes_; }
    size_t weights_bytes() const;      // bytes of all weight tensors
    // identity of the weights, computed once at load: a hash of the hparams, every tensor's
    // name, type and shape, and a sample of its bytes (start, middle, end); two files with the
    // same layer shapes but other weights differ. Saved states carry it (memory::save).
    uint64_t fingerprint() const { return fingerprint_; }
    // how messages name the model: the file's name, and general.name when the file has one
    const std::string & label() const { return label_; }

private:
    void select_devices(const model_params & params);
    void create_tensors();
    void load_data(bool use_mmap);
    void compute_fingerprint();

    hparams                            hparams_;
    std::unique_ptr<gguf_file>         file_;
    std::vector<layer_weights>         layers_;
    std::vector<ggml_backend_dev_t>    devices_;
    std::vector<ggml_backend_dev_t>    layer_dev_;
    ggml_backend_dev_t                 output_dev_ = nullptr;
    std::vector<std::pair<ggml_tensor *, ggml_backend_dev_t>> tensors_;  // every weight and its device
    std::vector<ggml_backend_buffer_ptr> buffers_;  // the weights (freed before file_'s mapping)
    bool                               mmapped_ = false;
    size_t                             huge_page_bytes_ = 0;
    uint64_t                           fingerprint_ = 0;
    std::string                        label_;
    bool                               use_extra_bufts_ = true;
};

} // namespace sambay

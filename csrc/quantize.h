// GGUF -> GGUF quantization with llama-quantize's per-tensor rules, adapted to SambaY's tensors.
// ref: llama.cpp src/llama-quant.cpp (llama_tensor_get_type), GGML_NOTES §4
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml.h"

namespace sambay {

// bad input for quantization (unknown type, already quantized, no block count); an input file
// the engine's loader refuses throws its load_error instead (loader.h, hparams.h)
struct quantize_error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A target file type: the default type of the big matrices plus the rules that raise some.
struct quant_ftype {
    std::string name;         // "Q4_K_M", "Q8_0", "F16", ...
    uint32_t    file_type;    // llama.cpp's LLAMA_FTYPE_* value, stored as general.file_type
    ggml_type   default_type; // what an "other" matrix becomes
};

// every supported name, in the order `sambay quantize --help` lists them
const std::vector<quant_ftype> & quant_ftypes();

// A name (case-insensitive), llama-quantize's alias (Q4_K -> Q4_K_M, Q5_K -> Q5_K_M) or its
// numeric id (the general.file_type value: 15 -> Q4_K_M); throws quantize_error otherwise
const quant_ftype & quant_ftype_by_name(const std::string & name);

// A tensor type for the per-tensor overrides, by ggml's name (case-insensitive: q8_0, Q6_K,
// f16); only types quantize_file can write; throws quantize_error otherwise
ggml_type quant_type_by_name(const std::string & name);

// llama-quantize's options that change the per-tensor rules
struct quant_options {
    bool      pure            = false;           // every quantizable matrix gets the default type
    ggml_type output_type     = GGML_TYPE_COUNT; // the output projection's type (COUNT: by the rules)
    ggml_type token_embd_type = GGML_TYPE_COUNT; // token_embd.weight's type (COUNT: by the rules)
    bool      leave_output    = false;           // keep the output projection as stored
    // no output.weight: token_embd.weight is also the output projection (tied, as in
    // Phi-4-mini-flash), so the output options apply to it
    bool      tied_output     = true;
};

// The type one tensor gets. `i_layer`/`n_layer` place it in the stack (llama-quantize's
// use_more_bits rule). Tensors that must stay as they are (norms, biases, SSM constants, conv)
// keep `cur_type`.
struct tensor_desc {
    std::string name;
    int         n_dims;
    int64_t     ne0;
    ggml_type   cur_type;
    int         i_layer; // -1 for tensors outside blk.N
    int         n_layer;
};
ggml_type quant_tensor_type(const quant_ftype & ft, const tensor_desc & t, const quant_options & opt = {});

struct quantize_params {
    std::string input;
    std::string output;
    std::string ftype;   // a quant_ftype name
    int n_threads = 0;   // 0: all hardware threads
    quant_options options;
    bool allow_requantize = false; // accept a quantized input (dequantized, then quantized again)
    bool dry_run = false;          // plan and sizes only: `output` is not opened
    // called after each tensor: (index, count, name, new type name)
    std::function<void(size_t, size_t, const std::string &, const std::string &)> progress;
};

struct quantize_result {
    uint64_t bytes_in  = 0;  // tensor data bytes read
    uint64_t bytes_out = 0;  // tensor data bytes written
    std::vector<std::pair<std::string, std::string>> tensor_types; // name -> type name
    struct tensor_plan {
        std::string name, from, to;  // type names
        uint64_t bytes_in, bytes_out;
    };
    std::vector<tensor_plan> plan;   // every tensor, in file order
};

// Writes `output` (created or truncated; opened only once the input has been checked). Making
// that atomic, and deciding which paths may be replaced, is the caller's: sambay.quantize
// passes a temporary file (python/sambay/_output.py). The input is opened by the model loader
// (gguf_file) and its architecture checked as for a model: a file that cannot be loaded throws
// the same load_error, with the same message. Throws quantize_error with a readable message
// on other bad input and on a failed write ("cannot write the output file: No space left on
// device").
quantize_result quantize_file(const quantize_params & params);

} // namespace sambay

// A GGUF file opened for loading: metadata through ggml's gguf API, tensor data checked
// against the file size, and an optional read-only mmap of the whole file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct gguf_context;
struct ggml_context;
struct ggml_tensor;

namespace sambay {

class gguf_file {
public:
    // Opens and parses the header; throws load_error (missing file, wrong magic, truncated or
    // corrupt header, tensor data outside the file).
    gguf_file(const std::string & path, bool use_mmap);
    ~gguf_file();
    gguf_file(const gguf_file &) = delete;
    gguf_file & operator=(const gguf_file &) = delete;

    const std::string & path() const { return path_; }
    gguf_context * gguf() const { return gguf_; }
    ggml_context * meta() const { return meta_; }  // tensors with shapes/types, no data
    size_t file_size() const { return file_size_; }
    // absolute file offset of a tensor's data
    size_t data_offset(const ggml_tensor * t) const;
    // the mapped file (nullptr when not mapped)
    void * mapping() const { return mapping_; }
    // reads [offset, offset+size) of the file into dst (streamed loads)
    void read(size_t offset, void * dst, size_t size) const;

private:
    std::string     path_;
    size_t          file_size_ = 0;
    int             fd_        = -1;
    void *          mapping_   = nullptr;
    gguf_context *  gguf_      = nullptr;
    ggml_context *  meta_      = nullptr;
};

// Typed metadata getters. They accept any integer/float type that holds the value exactly and
// return false when the key is absent; a present key of the wrong type throws load_error.
bool gguf_get_uint(const gguf_context * ctx, const std::string & key, uint64_t & out);
bool gguf_get_float(const gguf_context * ctx, const std::string & key, double & out);
bool gguf_get_bool(const gguf_context * ctx, const std::string & key, bool & out);
bool gguf_get_string(const gguf_context * ctx, const std::string & key, std::string & out);
bool gguf_get_int_array(const gguf_context * ctx, const std::string & key, std::vector<int64_t> & out);
bool gguf_get_float_array(const gguf_context * ctx, const std::string & key, std::vector<double> & out);

} // namespace sambay

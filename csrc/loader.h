// A GGUF file opened for loading: metadata through ggml's gguf API, tensor data checked
// against the file size, and an optional read-only mmap of the whole file.
#pragma once

#include "ggml-cpp.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sambay {

// owns a POSIX file descriptor (-1: none); closes it on destruction
class unique_fd {
public:
    unique_fd() = default;
    explicit unique_fd(int fd) : fd_(fd) {}
    ~unique_fd();
    unique_fd(unique_fd && o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
    unique_fd & operator=(unique_fd && o) noexcept;
    unique_fd(const unique_fd &) = delete;
    unique_fd & operator=(const unique_fd &) = delete;
    int get() const { return fd_; }
    explicit operator bool() const { return fd_ >= 0; }

private:
    int fd_ = -1;
};

// owns a read-only mapping of a whole file; unmaps it on destruction
class file_mapping {
public:
    file_mapping() = default;
    file_mapping(int fd, size_t size);  // maps [0, size); addr() is nullptr when mmap fails
    ~file_mapping();
    file_mapping(const file_mapping &) = delete;
    file_mapping & operator=(const file_mapping &) = delete;
    void * addr() const { return addr_; }

private:
    void * addr_ = nullptr;
    size_t size_ = 0;
};

class gguf_file {
public:
    // Opens and parses the header; throws load_error (missing file, wrong magic, truncated or
    // corrupt header, tensor data outside the file).
    gguf_file(const std::string & path, bool use_mmap);
    gguf_file(const gguf_file &) = delete;
    gguf_file & operator=(const gguf_file &) = delete;

    const std::string & path() const { return path_; }
    gguf_context * gguf() const { return gguf_.get(); }
    ggml_context * meta() const { return meta_.get(); }  // tensors with shapes/types, no data
    size_t file_size() const { return file_size_; }
    // absolute file offset of a tensor's data
    size_t data_offset(const ggml_tensor * t) const;
    // the mapped file (nullptr when not mapped)
    void * mapping() const { return mapping_ ? mapping_->addr() : nullptr; }
    // reads [offset, offset+size) of the file into dst (streamed loads)
    void read(size_t offset, void * dst, size_t size) const;

private:
    std::string                   path_;
    size_t                        file_size_ = 0;
    unique_fd                     fd_;
    gguf_context_ptr              gguf_;
    ggml_context_ptr              meta_;
    std::unique_ptr<file_mapping> mapping_;  // declared last: unmapped first
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

#include "loader.h"

#include "errors.h"
#include "log.h"

#include "ggml.h"
#include "gguf.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace sambay {

// no tensor of any real model comes near: 2^50 elements (a petabyte of F8)
static constexpr int64_t MAX_ELEMENTS = int64_t(1) << 50;

unique_fd::~unique_fd() {
    if (fd_ >= 0) ::close(fd_);
}

unique_fd & unique_fd::operator=(unique_fd && o) noexcept {
    if (this != &o) {
        if (fd_ >= 0) ::close(fd_);
        fd_ = o.fd_;
        o.fd_ = -1;
    }
    return *this;
}

file_mapping::file_mapping(int fd, size_t size) {
    void * p = size > 0 ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    if (p != MAP_FAILED) {
        addr_ = p;
        size_ = size;
    }
}

file_mapping::~file_mapping() {
    if (addr_) ::munmap(addr_, size_);
}

gguf_file::gguf_file(const std::string & path, bool use_mmap) : path_(path) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused just below); reads
    // of a regular file ignore the flag
    fd_ = unique_fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK));
    if (!fd_) {
        throw load_error("cannot open '" + path + "': " + std::strerror(errno));
    }
    struct stat st {};
    if (::fstat(fd_.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
        throw load_error("'" + path + "' is not a regular file");
    }
    file_size_ = (size_t) st.st_size;

    // check the magic ourselves: gguf_init_from_file would only say "failed"
    char magic[4] = {0, 0, 0, 0};
    if (file_size_ < 4 || ::pread(fd_.get(), magic, 4, 0) != 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        throw load_error("'" + path + "' is not a GGUF file (bad magic)");
    }

    ggml_context * meta = nullptr;
    gguf_init_params params = { /*no_alloc*/ true, /*ctx*/ &meta };
    std::string ggml_says;
    {
        // the reason for a rejected file travels inside the exception, not only to stderr
        log_scope capture(log_scope::mode::collect);
        gguf_.reset(gguf_init_from_file(path.c_str(), params));
        meta_.reset(meta);
        ggml_says = capture.summary();
    }
    if (!gguf_) {
        throw load_error("'" + path + "': cannot parse the GGUF header (truncated or corrupt file)" +
                         (ggml_says.empty() ? std::string() : ": " + ggml_says));
    }

    // every tensor's data must lie inside the file: a truncated file fails here, before any read
    const size_t data_start = gguf_get_data_offset(gguf_.get());
    const size_t align      = gguf_get_alignment(gguf_.get());
    const int64_t n_tensors = gguf_get_n_tensors(gguf_.get());
    for (int64_t i = 0; i < n_tensors; ++i) {
        const size_t off  = gguf_get_tensor_offset(gguf_.get(), i);
        const size_t size = gguf_get_tensor_size(gguf_.get(), i);
        // a copy: the message is built after gguf_free, which frees the name (fuzzing found
        // the use-after-free this was)
        const std::string name = gguf_get_tensor_name(gguf_.get(), i);
        std::string problem;
        // ggml's parser lets element counts whose byte size overflows size_t through (a
        // [2^40, 2^40] F32 tensor reports 0 bytes): count elements and bytes ourselves, and
        // require the byte size ggml reports to be that one
        const ggml_tensor * t = meta_ ? ggml_get_tensor(meta_.get(), name.c_str()) : nullptr;
        bool shape_ok = t != nullptr;
        int64_t n_el = 1;
        for (int d = 0; shape_ok && d < GGML_MAX_DIMS; ++d) {
            const int64_t ne = t->ne[d];
            shape_ok = ne >= 0 && (ne == 0 || n_el <= MAX_ELEMENTS / ne);
            if (shape_ok) n_el *= ne;
        }
        if (shape_ok) {
            const int64_t bs = ggml_blck_size(t->type);
            shape_ok = bs > 0 && t->ne[0] % bs == 0 &&
                       (uint64_t) (n_el / bs) * ggml_type_size(t->type) == (uint64_t) size;
        }
        if (!shape_ok) {
            problem = "'" + path + "': tensor '" + name + "' has an absurd shape or a data size that does not match it";
        } else if (align == 0 || off % align != 0) {
            problem = "'" + path + "': tensor '" + name + "' data is not aligned";
        } else if (data_start > file_size_ || off > file_size_ - data_start ||
                   size > file_size_ - data_start - off) {
            problem = "'" + path + "': tensor '" + name + "' data [" +
                      std::to_string(data_start + off) + ", " +
                      std::to_string(data_start + off + size) + ") lies beyond the end of the file (" +
                      std::to_string(file_size_) + " bytes): truncated file?";
        }
        if (!problem.empty()) {
            throw load_error(problem);
        }
    }

    if (use_mmap && file_size_ > 0) {
        mapping_ = std::make_unique<file_mapping>(fd_.get(), file_size_);
    }
}

size_t gguf_file::data_offset(const ggml_tensor * t) const {
    const int64_t id = gguf_find_tensor(gguf_.get(), ggml_get_name(t));
    GGML_ASSERT(id >= 0);
    return gguf_get_data_offset(gguf_.get()) + gguf_get_tensor_offset(gguf_.get(), id);
}

void gguf_file::read(size_t offset, void * dst, size_t size) const {
    GGML_ASSERT(offset <= file_size_ && size <= file_size_ - offset);
    char * out = (char *) dst;
    while (size > 0) {
        const ssize_t n = ::pread(fd_.get(), out, size, (off_t) offset);
        if (n <= 0) {
            if (n < 0 && errno == EINTR) {
                continue;
            }
            throw load_error("'" + path_ + "': read failed at offset " + std::to_string(offset));
        }
        out += n; offset += (size_t) n; size -= (size_t) n;
    }
}

// ---------------------------------------------------------------------------------------------
// typed metadata getters

static std::string type_err(const gguf_context * ctx, int64_t id, const char * want) {
    return std::string("metadata key '") + gguf_get_key(ctx, id) + "' has type " +
           gguf_type_name(gguf_get_kv_type(ctx, id)) + ", expected " + want;
}

static bool scalar_int(const gguf_context * ctx, int64_t id, gguf_type t, int64_t & out, uint64_t & uout, bool & is_unsigned) {
    is_unsigned = false;
    switch (t) {
        case GGUF_TYPE_UINT8:  uout = gguf_get_val_u8(ctx, id);  is_unsigned = true; return true;
        case GGUF_TYPE_UINT16: uout = gguf_get_val_u16(ctx, id); is_unsigned = true; return true;
        case GGUF_TYPE_UINT32: uout = gguf_get_val_u32(ctx, id); is_unsigned = true; return true;
        case GGUF_TYPE_UINT64: uout = gguf_get_val_u64(ctx, id); is_unsigned = true; return true;
        case GGUF_TYPE_INT8:   out = gguf_get_val_i8(ctx, id);  return true;
        case GGUF_TYPE_INT16:  out = gguf_get_val_i16(ctx, id); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(ctx, id); return true;
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(ctx, id); return true;
        default: return false;
    }
}

bool gguf_get_uint(const gguf_context * ctx, const std::string & key, uint64_t & out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) {
        return false;
    }
    int64_t s = 0; uint64_t u = 0; bool is_u = false;
    if (!scalar_int(ctx, id, gguf_get_kv_type(ctx, id), s, u, is_u)) {
        throw load_error(type_err(ctx, id, "an unsigned integer"));
    }
    if (!is_u) {
        if (s < 0) {
            throw load_error("metadata key '" + key + "' is negative (" + std::to_string(s) + ")");
        }
        u = (uint64_t) s;
    }
    out = u;
    return true;
}

bool gguf_get_float(const gguf_context * ctx, const std::string & key, double & out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) {
        return false;
    }
    switch (gguf_get_kv_type(ctx, id)) {
        case GGUF_TYPE_FLOAT32: out = gguf_get_val_f32(ctx, id); return true;
        case GGUF_TYPE_FLOAT64: out = gguf_get_val_f64(ctx, id); return true;
        default: throw load_error(type_err(ctx, id, "a float"));
    }
}

bool gguf_get_bool(const gguf_context * ctx, const std::string & key, bool & out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) {
        return false;
    }
    if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_BOOL) {
        throw load_error(type_err(ctx, id, "a bool"));
    }
    out = gguf_get_val_bool(ctx, id);
    return true;
}

bool gguf_get_string(const gguf_context * ctx, const std::string & key, std::string & out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) {
        return false;
    }
    if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_STRING) {
        throw load_error(type_err(ctx, id, "a string"));
    }
    out = gguf_get_val_str(ctx, id);
    return true;
}

template <typename T>
static void append_arr(const gguf_context * ctx, int64_t id, size_t n, std::vector<int64_t> & out) {
    const T * d = (const T *) gguf_get_arr_data(ctx, id);
    for (size_t i = 0; i < n; ++i) {
        out.push_back((int64_t) d[i]);
    }
}

bool gguf_get_int_array(const gguf_context * ctx, const std::string & key, std::vector<int64_t> & out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) {
        return false;
    }
    if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY) {
        throw load_error(type_err(ctx, id, "an integer array"));
    }
    const size_t n = gguf_get_arr_n(ctx, id);
    out.clear();
    switch (gguf_get_arr_type(ctx, id)) {
        case GGUF_TYPE_UINT8:  append_arr<uint8_t>(ctx, id, n, out);  break;
        case GGUF_TYPE_INT8:   append_arr<int8_t>(ctx, id, n, out);   break;
        case GGUF_TYPE_UINT16: append_arr<uint16_t>(ctx, id, n, out); break;
        case GGUF_TYPE_INT16:  append_arr<int16_t>(ctx, id, n, out);  break;
        case GGUF_TYPE_UINT32: append_arr<uint32_t>(ctx, id, n, out); break;
        case GGUF_TYPE_INT32:  append_arr<int32_t>(ctx, id, n, out);  break;
        case GGUF_TYPE_INT64:  append_arr<int64_t>(ctx, id, n, out);  break;
        default:
            throw load_error(std::string("metadata key '") + key + "' is an array of " +
                             gguf_type_name(gguf_get_arr_type(ctx, id)) + ", expected integers");
    }
    return true;
}

bool gguf_get_float_array(const gguf_context * ctx, const std::string & key, std::vector<double> & out) {
    const int64_t id = gguf_find_key(ctx, key.c_str());
    if (id < 0) {
        return false;
    }
    if (gguf_get_kv_type(ctx, id) != GGUF_TYPE_ARRAY) {
        throw load_error(type_err(ctx, id, "a float array"));
    }
    const size_t n = gguf_get_arr_n(ctx, id);
    out.clear();
    switch (gguf_get_arr_type(ctx, id)) {
        case GGUF_TYPE_FLOAT32: {
            const float * d = (const float *) gguf_get_arr_data(ctx, id);
            out.assign(d, d + n);
            break;
        }
        case GGUF_TYPE_FLOAT64: {
            const double * d = (const double *) gguf_get_arr_data(ctx, id);
            out.assign(d, d + n);
            break;
        }
        default:
            throw load_error(std::string("metadata key '") + key + "' is an array of " +
                             gguf_type_name(gguf_get_arr_type(ctx, id)) + ", expected floats");
    }
    return true;
}

} // namespace sambay

#include "memory.h"

#include "errors.h"
#include "model.h"

#include "ggml-alloc.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>

namespace sambay {

memory::memory(const model & m, uint32_t n_ctx, uint32_t n_batch, ggml_type kv_type)
    : model_(m), n_ctx_(n_ctx), kv_type_(kv_type) {
    const hparams & hp = m.hp();
    // a micro-batch p0..p0+n-1 (n <= n_batch) needs keys p0-W+1 .. p0+n-1: W+n-1 cells
    n_swa_cells_ = std::min<uint32_t>(hp.n_swa + n_batch - 1, n_ctx);
    layers_.resize(hp.n_layer);

    // one ggml context (and buffer) per device
    std::map<ggml_backend_dev_t, ggml_context *> ctx_of;
    auto ctx_for = [&](ggml_backend_dev_t dev) {
        auto it = ctx_of.find(dev);
        if (it != ctx_of.end()) return it->second;
        ggml_init_params ip = { /*mem_size*/ ggml_tensor_overhead() * 4 * hp.n_layer, nullptr, /*no_alloc*/ true };
        ggml_context * c = ggml_init(ip);
        ctxs_.push_back(c);
        ctx_of[dev] = c;
        return c;
    };

    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        layer_memory & lm = layers_[il];
        ggml_context * c = ctx_for(m.layer_device(il));
        switch (hp.kind(il)) {
            case layer_kind::mamba:
                lm.conv = ggml_new_tensor_2d(c, GGML_TYPE_F32, hp.d_conv - 1, hp.d_inner);
                lm.ssm  = ggml_new_tensor_2d(c, GGML_TYPE_F32, hp.d_state, hp.d_inner);
                ggml_format_name(lm.conv, "cache_conv_l%u", il);
                ggml_format_name(lm.ssm, "cache_ssm_l%u", il);
                break;
            case layer_kind::attn_swa:
            case layer_kind::attn_full:
                lm.n_cells = hp.kind(il) == layer_kind::attn_swa ? n_swa_cells_ : n_ctx;
                lm.k = ggml_new_tensor_2d(c, kv_type, hp.n_embd_kv(), lm.n_cells);
                lm.v = ggml_new_tensor_2d(c, kv_type, lm.n_cells, hp.n_embd_kv());
                ggml_format_name(lm.k, "cache_k_l%u", il);
                ggml_format_name(lm.v, "cache_v_l%u", il);
                break;
            case layer_kind::gmu:
            case layer_kind::attn_cross:
                break;
        }
    }
    for (auto & [dev, c] : ctx_of) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors_from_buft(c, ggml_backend_dev_buffer_type(dev));
        if (!buf) {
            throw compute_error(std::string("cannot allocate the context memory on ") + ggml_backend_dev_name(dev));
        }
        buffers_.push_back(buf);
    }
    clear();
}

memory::~memory() {
    for (auto * b : buffers_) ggml_backend_buffer_free(b);
    for (auto * c : ctxs_) ggml_free(c);
}

void memory::clear() {
    for (auto * b : buffers_) ggml_backend_buffer_clear(b, 0);
}

std::map<std::string, size_t> memory::breakdown() const {
    std::map<std::string, size_t> out = { {"mamba_conv", 0}, {"mamba_ssm", 0}, {"swa_kv", 0}, {"full_kv", 0} };
    const hparams & hp = model_.hp();
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        if (lm.conv) out["mamba_conv"] += ggml_nbytes(lm.conv);
        if (lm.ssm)  out["mamba_ssm"]  += ggml_nbytes(lm.ssm);
        if (lm.k) {
            out[hp.kind(il) == layer_kind::attn_swa ? "swa_kv" : "full_kv"] += ggml_nbytes(lm.k) + ggml_nbytes(lm.v);
        }
    }
    return out;
}

// ---------------------------------------------------------------------------------------------
// state

namespace {

constexpr uint32_t STATE_MAGIC   = 0x53594253;  // "SBYS"
constexpr uint32_t STATE_VERSION = 1;

struct writer {
    std::vector<uint8_t> & out;
    void put(const void * p, size_t n) { out.insert(out.end(), (const uint8_t *) p, (const uint8_t *) p + n); }
    template <typename T> void put(T v) { put(&v, sizeof(v)); }
};

struct reader {
    const std::vector<uint8_t> & in;
    size_t pos = 0;
    void get(void * p, size_t n) {
        if (n > in.size() - pos) throw state_error("state data is truncated");
        std::memcpy(p, in.data() + pos, n);
        pos += n;
    }
    template <typename T> T get() { T v; get(&v, sizeof(v)); return v; }
};

std::vector<uint8_t> read_tensor(const ggml_tensor * t) {
    std::vector<uint8_t> buf(ggml_nbytes(t));
    ggml_backend_tensor_get(t, buf.data(), 0, buf.size());
    return buf;
}

} // namespace

std::vector<uint8_t> memory::save(uint32_t n_past) const {
    const hparams & hp = model_.hp();
    std::vector<uint8_t> out;
    writer w{out};
    w.put(STATE_MAGIC); w.put(STATE_VERSION);
    w.put(n_past);
    for (uint32_t v : { hp.n_layer, hp.n_embd_kv(), hp.d_inner, hp.d_state, hp.d_conv, hp.n_swa, (uint32_t) kv_type_ }) {
        w.put(v);
    }
    const size_t es = ggml_type_size(kv_type_);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        if (lm.conv) {
            auto c = read_tensor(lm.conv); w.put(c.data(), c.size());
            auto s = read_tensor(lm.ssm);  w.put(s.data(), s.size());
        }
        if (lm.k) {
            // the positions still visible, oldest first
            const uint32_t n  = hp.kind(il) == layer_kind::attn_swa ? std::min(hp.n_swa, n_past) : n_past;
            const uint32_t p0 = n_past - n;
            const auto k = read_tensor(lm.k);
            const auto v = read_tensor(lm.v);
            const size_t row = lm.k->nb[1];
            for (uint32_t p = p0; p < n_past; ++p) w.put(k.data() + (p % lm.n_cells) * row, row);
            for (uint32_t j = 0; j < hp.n_embd_kv(); ++j) {
                for (uint32_t p = p0; p < n_past; ++p) w.put(v.data() + ((size_t) j * lm.n_cells + p % lm.n_cells) * es, es);
            }
        }
    }
    return out;
}

uint32_t memory::load(const std::vector<uint8_t> & data) {
    const hparams & hp = model_.hp();
    reader r{data};
    if (r.get<uint32_t>() != STATE_MAGIC || r.get<uint32_t>() != STATE_VERSION) {
        throw state_error("not a sambay state (bad magic or version)");
    }
    const uint32_t n_past = r.get<uint32_t>();
    const uint32_t want[] = { hp.n_layer, hp.n_embd_kv(), hp.d_inner, hp.d_state, hp.d_conv, hp.n_swa, (uint32_t) kv_type_ };
    const char * names[] = { "n_layer", "n_embd_kv", "d_inner", "d_state", "d_conv", "n_swa", "kv_type" };
    for (size_t i = 0; i < 7; ++i) {
        const uint32_t got = r.get<uint32_t>();
        if (got != want[i]) {
            throw state_error(std::string("state does not fit this context: ") + names[i] + " is " +
                              std::to_string(got) + " in the state, " + std::to_string(want[i]) + " here");
        }
    }
    if (n_past > n_ctx_) {
        throw context_full_error(n_past, n_ctx_);
    }
    // decode everything into host images first, so a bad state leaves the memory untouched
    std::vector<std::vector<uint8_t>> images;
    const size_t es = ggml_type_size(kv_type_);
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        if (lm.conv) {
            std::vector<uint8_t> c(ggml_nbytes(lm.conv)), s(ggml_nbytes(lm.ssm));
            r.get(c.data(), c.size()); r.get(s.data(), s.size());
            images.push_back(std::move(c)); images.push_back(std::move(s));
        }
        if (lm.k) {
            const uint32_t n  = hp.kind(il) == layer_kind::attn_swa ? std::min(hp.n_swa, n_past) : n_past;
            const uint32_t p0 = n_past - n;
            std::vector<uint8_t> k(ggml_nbytes(lm.k), 0), v(ggml_nbytes(lm.v), 0);
            const size_t row = lm.k->nb[1];
            for (uint32_t p = p0; p < n_past; ++p) r.get(k.data() + (p % lm.n_cells) * row, row);
            for (uint32_t j = 0; j < hp.n_embd_kv(); ++j) {
                for (uint32_t p = p0; p < n_past; ++p) r.get(v.data() + ((size_t) j * lm.n_cells + p % lm.n_cells) * es, es);
            }
            images.push_back(std::move(k)); images.push_back(std::move(v));
        }
    }
    if (r.pos != data.size()) {
        throw state_error("state data has " + std::to_string(data.size() - r.pos) + " trailing bytes");
    }
    size_t i = 0;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        for (ggml_tensor * t : { lm.conv, lm.ssm, lm.k, lm.v }) {
            if (t) {
                ggml_backend_tensor_set(t, images[i].data(), 0, images[i].size());
                ++i;
            }
        }
    }
    return n_past;
}

} // namespace sambay

#include "memory.h"

#include "errors.h"
#include "hash.h"
#include "hugepages.h"
#include "model.h"

#include "ggml-alloc.h"
#include "ggml.h"

#include <algorithm>
#include <cstring>

namespace sambay {

memory::memory(const model & m, uint32_t n_ctx, uint32_t n_batch, uint32_t n_seq, ggml_type kv_type, bool v_trans)
    : model_(m), n_ctx_(n_ctx), n_seq_(n_seq), kv_type_(kv_type), v_trans_(v_trans) {
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
        ctxs_.emplace_back(ggml_init(ip));
        ggml_context * c = ctxs_.back().get();
        if (!c) {
            throw compute_error("cannot allocate the context memory's tensor headers");
        }
        ctx_of[dev] = c;
        return c;
    };

    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        layer_memory & lm = layers_[il];
        ggml_context * c = ctx_for(m.layer_device(il));
        switch (hp.kind(il)) {
            case layer_kind::mamba:
                lm.conv = ggml_new_tensor_3d(c, GGML_TYPE_F32, hp.d_conv - 1, hp.d_inner, n_seq);
                lm.ssm  = ggml_new_tensor_3d(c, GGML_TYPE_F32, hp.d_state, hp.d_inner, n_seq);
                ggml_format_name(lm.conv, "cache_conv_l%u", il);
                ggml_format_name(lm.ssm, "cache_ssm_l%u", il);
                break;
            case layer_kind::attn_swa:
            case layer_kind::attn_full:
                lm.n_cells = hp.kind(il) == layer_kind::attn_swa ? n_swa_cells_ : n_ctx;
                lm.k = ggml_new_tensor_3d(c, kv_type, hp.n_embd_kv(), lm.n_cells, n_seq);
                lm.v = v_trans ? ggml_new_tensor_3d(c, kv_type, lm.n_cells, hp.n_embd_kv(), n_seq)
                               : ggml_new_tensor_3d(c, kv_type, hp.n_embd_kv(), lm.n_cells, n_seq);
                ggml_format_name(lm.k, "cache_k_l%u", il);
                ggml_format_name(lm.v, "cache_v_l%u", il);
                break;
            case layer_kind::gmu:
            case layer_kind::attn_cross:
                break;
        }
    }
    for (auto & [dev, c] : ctx_of) {
        ggml_backend_buffer_ptr buf(ggml_backend_alloc_ctx_tensors_from_buft(c, ggml_backend_dev_buffer_type(dev)));
        if (!buf) {
            size_t bytes = 0;
            for (ggml_tensor * t = ggml_get_first_tensor(c); t; t = ggml_get_next_tensor(c, t)) {
                bytes += ggml_nbytes(t);
            }
            throw compute_error("cannot allocate the context memory (" + std::to_string(bytes >> 20) +
                                " MiB for n_ctx " + std::to_string(n_ctx) + ") on " + ggml_backend_dev_name(dev) +
                                ": out of memory; a smaller n_ctx needs less");
        }
        huge_page_bytes_ += advise_huge_pages(buf.get(), dev);  // before clear() touches the pages
        buffers_.push_back(std::move(buf));
    }
    clear();
}

void memory::clear() {
    for (auto & b : buffers_) ggml_backend_buffer_clear(b.get(), 0);
}

void memory::clear_seq(uint32_t s) {
    // a graph reads only cells its sequence has written (positions < n_past + the batch), so
    // only the recurrent states carry anything over
    for (const layer_memory & lm : layers_) {
        if (!lm.conv) continue;
        ggml_backend_tensor_memset(lm.conv, 0, s * lm.conv->nb[2], lm.conv->nb[2]);
        ggml_backend_tensor_memset(lm.ssm, 0, s * lm.ssm->nb[2], lm.ssm->nb[2]);
    }
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
//
// Layout (version 3): magic, version, n_past, 7 shape words (n_layer, n_embd_kv, d_inner,
// d_state, d_conv, n_swa, kv_type), the model's fingerprint (u64), the token-history hash (u64),
// the model's label (u32 length, bytes; for messages), then per layer in order: Mamba conv and
// SSM states (raw F32); attention K rows then V rows (n_embd_kv values each, the cache type) of
// the positions the layer can still see (the last min(W, n_past) for SWA, all n_past for the
// full layer), oldest first. Independent of n_ctx, n_batch and the V layout; reading/writing
// touches only those positions, so a snapshot costs O(n_past), not O(n_ctx).

namespace {

constexpr uint32_t STATE_MAGIC   = 0x53594253;  // "SBYS"
constexpr uint32_t STATE_VERSION = 3;

struct writer {
    std::vector<uint8_t> & out;
    void put(const void * p, size_t n) { out.insert(out.end(), (const uint8_t *) p, (const uint8_t *) p + n); }
    template <typename T> void put(T v) { put(&v, sizeof(v)); }
    uint8_t * grow(size_t n) { out.resize(out.size() + n); return out.data() + out.size() - n; }
};

struct reader {
    const std::vector<uint8_t> & in;
    size_t pos = 0;
    const uint8_t * take(size_t n) {
        if (n > in.size() - pos) throw state_error("state data is truncated");
        pos += n;
        return in.data() + pos - n;
    }
    template <typename T> T get() { T v; std::memcpy(&v, take(sizeof(v)), sizeof(v)); return v; }
};

// the positions [p0, n_past) an attention layer keeps
uint32_t first_kept(const hparams & hp, uint32_t il, uint32_t n_past) {
    return hp.kind(il) == layer_kind::attn_swa ? n_past - std::min(hp.n_swa, n_past) : 0;
}

// copies the K (or non-transposed V) rows of positions [p0, p1) of sequence slot s between the
// cache and dst/src; rows of consecutive positions are contiguous unless the ring wraps
void rows_io(ggml_tensor * t, uint32_t s, uint32_t n_cells, uint32_t p0, uint32_t p1, uint8_t * host, bool to_host) {
    const size_t row = t->nb[1];
    uint32_t p = p0;
    while (p < p1) {
        const uint32_t cell = memory::cell_of(p, n_cells);
        const uint32_t n = std::min(p1 - p, n_cells - cell);  // until the end of the ring
        const size_t off = (size_t) memory::row_of(s, cell, n_cells) * row;
        if (to_host) ggml_backend_tensor_get(t, host, off, (size_t) n * row);
        else         ggml_backend_tensor_set(t, host, off, (size_t) n * row);
        host += (size_t) n * row;
        p += n;
    }
}

// the same for a transposed V cache [n_cells, n_embd_kv, n_seq], converting to/from position rows
void vt_io(ggml_tensor * t, uint32_t s, uint32_t n_cells, uint32_t p0, uint32_t p1, uint8_t * host, bool to_host) {
    const size_t es = ggml_type_size(t->type);
    const int64_t n_embd = t->ne[1];
    const size_t n = p1 - p0;
    std::vector<uint8_t> run(n * es);  // one channel, positions p0..p1-1
    for (int64_t j = 0; j < n_embd; ++j) {
        uint8_t * r = run.data();
        if (!to_host) {
            for (size_t i = 0; i < n; ++i) std::memcpy(r + i * es, host + (i * n_embd + j) * es, es);
        }
        uint32_t p = p0;
        while (p < p1) {
            const uint32_t cell = memory::cell_of(p, n_cells);
            const uint32_t m = std::min(p1 - p, n_cells - cell);
            const size_t off = (size_t) memory::vt_index(s, j, cell, n_cells, n_embd) * es;
            if (to_host) ggml_backend_tensor_get(t, r, off, m * es);
            else         ggml_backend_tensor_set(t, r, off, m * es);
            r += m * es;
            p += m;
        }
        if (to_host) {
            for (size_t i = 0; i < n; ++i) std::memcpy(host + (i * n_embd + j) * es, run.data() + i * es, es);
        }
    }
}

} // namespace

void seq_history::add(const int32_t * tokens, size_t n) {
    fnv1a f{tokens_hash};
    f.add(tokens, n * sizeof(int32_t));
    tokens_hash = f.h;
    n_past += (uint32_t) n;
}

std::vector<uint8_t> memory::save(uint32_t s, const seq_history & h) const {
    const hparams & hp = model_.hp();
    const uint32_t n_past = h.n_past;
    std::vector<uint8_t> out;
    writer w{out};
    w.put(STATE_MAGIC); w.put(STATE_VERSION);
    w.put(n_past);
    for (uint32_t v : { hp.n_layer, hp.n_embd_kv(), hp.d_inner, hp.d_state, hp.d_conv, hp.n_swa, (uint32_t) kv_type_ }) {
        w.put(v);
    }
    w.put(model_.fingerprint());
    w.put(h.tokens_hash);
    w.put((uint32_t) model_.label().size());
    w.put(model_.label().data(), model_.label().size());
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        if (lm.conv) {
            ggml_backend_tensor_get(lm.conv, w.grow(lm.conv->nb[2]), s * lm.conv->nb[2], lm.conv->nb[2]);
            ggml_backend_tensor_get(lm.ssm, w.grow(lm.ssm->nb[2]), s * lm.ssm->nb[2], lm.ssm->nb[2]);
        }
        if (lm.k) {
            const uint32_t p0 = first_kept(hp, il, n_past);
            const size_t bytes = (size_t) (n_past - p0) * lm.k->nb[1];
            rows_io(lm.k, s, lm.n_cells, p0, n_past, w.grow(bytes), true);
            if (v_trans_) vt_io(lm.v, s, lm.n_cells, p0, n_past, w.grow(bytes), true);
            else          rows_io(lm.v, s, lm.n_cells, p0, n_past, w.grow(bytes), true);
        }
    }
    return out;
}

seq_history memory::load(uint32_t s, const std::vector<uint8_t> & data, const seq_history * expect) {
    const hparams & hp = model_.hp();
    reader r{data};
    if (data.size() < 8 || r.get<uint32_t>() != STATE_MAGIC) {
        throw state_error("not a sambay state (bad magic)");
    }
    if (const uint32_t version = r.get<uint32_t>(); version != STATE_VERSION) {
        throw state_error("the state has format version " + std::to_string(version) + ", this sambay reads version " +
                          std::to_string(STATE_VERSION) + " (save it again with this version)");
    }
    seq_history h;
    h.n_past = r.get<uint32_t>();
    const uint32_t n_past = h.n_past;
    uint32_t got[7];
    for (uint32_t & v : got) v = r.get<uint32_t>();
    const uint64_t fingerprint = r.get<uint64_t>();
    h.tokens_hash = r.get<uint64_t>();
    const uint32_t label_len = r.get<uint32_t>();
    const char * label = (const char *) r.take(label_len);
    if (fingerprint != model_.fingerprint()) {
        throw state_error("the state was saved from a different model (" + std::string(label, label_len) +
                          ") than this context runs (" + model_.label() + ")");
    }
    if (got[6] != (uint32_t) kv_type_) {
        const char * saved = got[6] < GGML_TYPE_COUNT ? ggml_type_name((ggml_type) got[6]) : "unknown";
        throw state_error(std::string("the state does not fit this context: kv_type is ") + saved +
                          " in the state, " + ggml_type_name(kv_type_) + " here");
    }
    const uint32_t want[] = { hp.n_layer, hp.n_embd_kv(), hp.d_inner, hp.d_state, hp.d_conv, hp.n_swa };
    const char * names[] = { "n_layer", "n_embd_kv", "d_inner", "d_state", "d_conv", "n_swa" };
    for (size_t i = 0; i < 6; ++i) {
        if (got[i] != want[i]) {
            throw state_error(std::string("the state does not fit this context: ") + names[i] + " is " +
                              std::to_string(got[i]) + " in the state, " + std::to_string(want[i]) + " here");
        }
    }
    if (expect && expect->n_past != n_past) {
        throw state_error("the state holds " + std::to_string(n_past) + " positions, but its token history has " +
                          std::to_string(expect->n_past) + " tokens");
    }
    if (expect && expect->tokens_hash != h.tokens_hash) {
        throw state_error("the state's token history does not match the tokens given with it (same count, " +
                          std::to_string(n_past) + ", other tokens)");
    }
    if (n_past > n_ctx_) {
        throw context_full_error(n_past, n_ctx_);
    }
    // check the size before touching the memory, so a bad state leaves it as it was
    size_t expected = r.pos;
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        if (lm.conv) expected += lm.conv->nb[2] + lm.ssm->nb[2];
        if (lm.k)    expected += 2 * (size_t) (n_past - first_kept(hp, il, n_past)) * lm.k->nb[1];
    }
    if (expected != data.size()) {
        throw state_error("state data has " + std::to_string(data.size()) + " bytes, expected " +
                          std::to_string(expected) + " for " + std::to_string(n_past) + " positions");
    }
    // zero the small parts of this sequence (SWA ring, states) as in a fresh context; the full
    // cache is only ever read at positions < n_past, which the state overwrites, so it is left
    // alone (O(n_past))
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        if (hp.kind(il) == layer_kind::attn_swa) {
            ggml_backend_tensor_memset(lm.k, 0, s * lm.k->nb[2], lm.k->nb[2]);
            ggml_backend_tensor_memset(lm.v, 0, s * lm.v->nb[2], lm.v->nb[2]);
        }
    }
    for (uint32_t il = 0; il < hp.n_layer; ++il) {
        const layer_memory & lm = layers_[il];
        if (lm.conv) {
            ggml_backend_tensor_set(lm.conv, r.take(lm.conv->nb[2]), s * lm.conv->nb[2], lm.conv->nb[2]);
            ggml_backend_tensor_set(lm.ssm, r.take(lm.ssm->nb[2]), s * lm.ssm->nb[2], lm.ssm->nb[2]);
        }
        if (lm.k) {
            const uint32_t p0 = first_kept(hp, il, n_past);
            const size_t bytes = (size_t) (n_past - p0) * lm.k->nb[1];
            rows_io(lm.k, s, lm.n_cells, p0, n_past, (uint8_t *) r.take(bytes), false);
            if (v_trans_) vt_io(lm.v, s, lm.n_cells, p0, n_past, (uint8_t *) r.take(bytes), false);
            else          rows_io(lm.v, s, lm.n_cells, p0, n_past, (uint8_t *) r.take(bytes), false);
        }
    }
    return h;
}

} // namespace sambay

#include "graph.h"

#include "attn_cpu.h"
#include "matmul_cpu.h"

#include "memory.h"
#include "model.h"

#include "ggml-backend.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace sambay {

size_t graph_size_for(const hparams & hp, uint32_t n_seq) {
    // the layer loop, plus per sequence an attention subgraph (about 30 nodes, views included)
    // in every attention layer and a share of the Mamba groups and row joins
    return 1024 + (size_t) 160 * hp.n_layer + (size_t) 64 * hp.n_layer * n_seq;
}

ggml_tensor * join_rows(ggml_context * ctx, std::vector<ggml_tensor *> parts) {
    GGML_ASSERT(!parts.empty());
    // pairwise rounds: every row is copied log2(n) times, not n times as in a chain
    while (parts.size() > 1) {
        std::vector<ggml_tensor *> next;
        for (size_t i = 0; i + 1 < parts.size(); i += 2) next.push_back(ggml_concat(ctx, parts[i], parts[i + 1], 1));
        if (parts.size() % 2) next.push_back(parts.back());
        parts.swap(next);
    }
    return parts[0];
}

graph_builder::graph_builder(const model & m, const memory & mem, ggml_context * ctx, ggml_cgraph * gf, const ubatch & ub)
    : model_(m), hp_(m.hp()), mem_(mem), ctx_(ctx), gf_(gf), ub_(ub) {
    inp_.seqs.resize(ub.seqs.size());
    out_row0_.resize(ub.seqs.size());
    uint32_t r = 0;
    for (size_t i = 0; i < ub.seqs.size(); ++i) {
        const ubatch_seq & us = ub.seqs[i];
        inp_.seqs[i].n_kv_full = us.pos0 + us.n_tokens;
        inp_.seqs[i].n_kv_swa  = std::min(mem.n_swa_cells(), inp_.seqs[i].n_kv_full);
        out_row0_[i] = r;
        r += us.n_out;
    }
}

void graph_builder::cb(ggml_tensor * t, const char * name, int il) const {
    if (t->op == GGML_OP_CUSTOM && t->name[0]) return;  // a custom op keeps its name: the op profile groups by it
    if (il >= 0) {
        ggml_format_name(t, "%s-%d", name, il);
    } else {
        ggml_set_name(t, name);
    }
}

ggml_tensor * graph_builder::mm(ggml_tensor * w, ggml_tensor * x) {
    if (ub_.cpu_mm && mul_mat_cpu_takes(w, x)) return mul_mat_cpu(ctx_, w, x);
    return ggml_mul_mat(ctx_, w, x);
}

ggml_tensor * graph_builder::build_norm(ggml_tensor * cur, ggml_tensor * w, ggml_tensor * b, int il) {
    // LayerNorm with weight and bias (not RMSNorm), eps from the file
    cur = ggml_norm(ctx_, cur, hp_.norm_eps);
    cur = ggml_mul(ctx_, cur, w);
    return ggml_add(ctx_, cur, b);
}

ggml_tensor * graph_builder::build() {
    const uint32_t n_tokens = ub_.n_tokens();
    const uint32_t n_out    = ub_.n_out();
    const int64_t  n_embd_kv = hp_.n_embd_kv();
    n_rows_ = n_tokens;

    inp_.tokens = ggml_new_tensor_1d(ctx_, GGML_TYPE_I32, n_tokens);
    ggml_set_input(inp_.tokens); cb(inp_.tokens, "inp_tokens", -1);
    for (size_t i = 0; i < ub_.seqs.size(); ++i) {
        seq_inputs & si = inp_.seqs[i];
        const uint32_t n = ub_.seqs[i].n_tokens;
        si.swa_mask = ggml_new_tensor_2d(ctx_, mask_type(), si.n_kv_swa, n);
        ggml_set_input(si.swa_mask); ggml_format_name(si.swa_mask, "inp_swa_mask-s%zu", i);
        si.full_mask = ggml_new_tensor_2d(ctx_, mask_type(), si.n_kv_full, n);
        ggml_set_input(si.full_mask); ggml_format_name(si.full_mask, "inp_full_mask-s%zu", i);
    }
    // Mamba groups: runs of sequences with equal n_tokens
    for (uint32_t i = 0; i < ub_.seqs.size();) {
        group_inputs g;
        g.first = i;
        while (i < ub_.seqs.size() && ub_.seqs[i].n_tokens == ub_.seqs[g.first].n_tokens) ++i;
        g.count = i - g.first;
        g.slots32 = ggml_new_tensor_1d(ctx_, GGML_TYPE_I32, g.count);
        ggml_set_input(g.slots32); ggml_format_name(g.slots32, "inp_slots32-g%u", g.first);
        g.slots64 = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, g.count);
        ggml_set_input(g.slots64); ggml_format_name(g.slots64, "inp_slots64-g%u", g.first);
        inp_.groups.push_back(g);
    }
    inp_.swa_k_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens);
    ggml_set_input(inp_.swa_k_idx); cb(inp_.swa_k_idx, "inp_swa_k_idx", -1);
    inp_.full_k_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens);
    ggml_set_input(inp_.full_k_idx); cb(inp_.full_k_idx, "inp_full_k_idx", -1);
    if (mem_.v_trans()) {
        inp_.swa_v_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens * n_embd_kv);
        ggml_set_input(inp_.swa_v_idx); cb(inp_.swa_v_idx, "inp_swa_v_idx", -1);
        inp_.full_v_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens * n_embd_kv);
        ggml_set_input(inp_.full_v_idx); cb(inp_.full_v_idx, "inp_full_v_idx", -1);
    }
    if (n_out > 0 && n_out < n_tokens) {
        inp_.out_ids = ggml_new_tensor_1d(ctx_, GGML_TYPE_I32, n_out);
        ggml_set_input(inp_.out_ids); cb(inp_.out_ids, "inp_out_ids", -1);
    }

    ggml_tensor * inpL = ggml_get_rows(ctx_, model_.tok_embd, inp_.tokens);  // [n_embd, n_tokens] F32
    cb(inpL, "inp_embd", -1);

    for (uint32_t il = 0; il < hp_.n_layer; ++il) {
        if (n_out == 0 && il > hp_.kv_shared_layer) {
            // no logits wanted: the cross-decoder keeps no state, so nothing after the shared KV
            // write matters (the writes are already in the graph)
            return nullptr;
        }
        const layer_weights & l = model_.layer(il);
        ggml_tensor * cur = build_norm(inpL, l.attn_norm, l.attn_norm_b, il);
        cb(cur, "attn_norm", il);

        switch (hp_.kind(il)) {
            case layer_kind::mamba:      cur = build_mamba(cur, il);      break;
            case layer_kind::attn_swa:
            case layer_kind::attn_full:  cur = build_self_attn(cur, il);  break;
            case layer_kind::gmu:        cur = build_gmu(cur, il);        break;
            case layer_kind::attn_cross: cur = build_cross_attn(cur, il); break;
        }
        // residual stream stays F32
        ggml_tensor * ffn_inp = ggml_add(ctx_, cur, inpL);
        cb(ffn_inp, "ffn_inp", il);

        cur = build_norm(ffn_inp, l.ffn_norm, l.ffn_norm_b, il);
        cb(cur, "ffn_norm", il);
        cur = build_mlp(cur, l, il);
        cur = ggml_add(ctx_, cur, ffn_inp);
        cb(cur, "l_out", il);
        inpL = cur;

        // YOCO: everything after the shared-KV layer is per-row (GMU, MLP) or reads the
        // complete shared cache (cross attention), so only the output rows need to go on
        if (il == hp_.kv_shared_layer && ub_.yoco && inp_.out_ids) {
            inpL        = ggml_get_rows(ctx_, inpL, inp_.out_ids);
            gmu_memory_ = ggml_get_rows(ctx_, gmu_memory_, inp_.out_ids);
            n_rows_     = n_out;
            cut_        = true;
            cb(inpL, "yoco_rows", il);
        }
    }

    ggml_tensor * cur = inpL;
    if (!cut_ && inp_.out_ids) {
        cur = ggml_get_rows(ctx_, cur, inp_.out_ids);
    }
    cur = build_norm(cur, model_.output_norm, model_.output_norm_b, -1);
    cb(cur, "result_norm", -1);
    cur = mm(model_.tok_embd, cur);  // tied output: [n_vocab, n_out]
    cb(cur, "result_output", -1);
    ggml_set_output(cur);
    ggml_build_forward_expand(gf_, cur);
    return cur;
}

// masks are built as F32 and converted when the graph wants F16 (flash attention)
static void set_mask(ggml_tensor * t, const std::vector<float> & mask) {
    if (t->type == GGML_TYPE_F32) {
        ggml_backend_tensor_set(t, mask.data(), 0, mask.size() * sizeof(float));
        return;
    }
    std::vector<ggml_fp16_t> h(mask.size());
    ggml_fp32_to_fp16_row(mask.data(), h.data(), (int64_t) mask.size());
    ggml_backend_tensor_set(t, h.data(), 0, h.size() * sizeof(ggml_fp16_t));
}

ggml_type graph_builder::mask_type() const {
    return ub_.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32;
}

std::vector<float> graph_builder::seq_mask(size_t i, bool is_swa) const {
    const ubatch_seq & us = ub_.seqs[i];
    const seq_inputs & si = inp_.seqs[i];
    const uint32_t n_kv = is_swa ? si.n_kv_swa : si.n_kv_full;
    std::vector<float> mask((size_t) n_kv * us.n_tokens, -INFINITY);
    if (is_swa) {
        // SWA ring (memory's addressing): after this batch's writes a cell holds the most recent
        // position mapping to it (all cells < n_kv_swa hold one)
        const uint32_t n_cells = mem_.n_swa_cells();
        const int64_t  W       = hp_.n_swa;
        const uint32_t p_end   = us.pos0 + us.n_tokens;
        std::vector<int64_t> cell_pos(n_kv);
        for (uint32_t c = 0; c < n_kv; ++c) cell_pos[c] = memory::pos_in_cell(c, p_end, n_cells);
        for (uint32_t t = 0; t < us.n_tokens; ++t) {
            const int64_t pq = us.pos0 + t;
            for (uint32_t c = 0; c < n_kv; ++c) {
                const int64_t pk = cell_pos[c];
                if (pk >= 0 && pk <= pq && pk >= pq - (W - 1)) mask[(size_t) t * n_kv + c] = 0.0f;
            }
        }
    } else {
        // causal over the full cache (cell = position)
        for (uint32_t r = 0; r < us.n_tokens; ++r) {
            const uint32_t pq = us.pos0 + r;
            for (uint32_t c = 0; c <= pq && c < n_kv; ++c) mask[(size_t) r * n_kv + c] = 0.0f;
        }
    }
    return mask;
}

void graph_builder::set_inputs() const {
    const uint32_t n_tokens  = ub_.n_tokens();
    const int64_t  n_embd_kv = hp_.n_embd_kv();
    const float    ninf      = -INFINITY;
    auto is_set = [](const ggml_tensor * t) { return t && t->buffer; };

    if (is_set(inp_.tokens)) {
        ggml_backend_tensor_set(inp_.tokens, ub_.tokens, 0, n_tokens * sizeof(int32_t));
    }
    for (const group_inputs & g : inp_.groups) {
        std::vector<int32_t> s32(g.count);
        std::vector<int64_t> s64(g.count);
        for (uint32_t k = 0; k < g.count; ++k) s32[k] = (int32_t) (s64[k] = ub_.seqs[g.first + k].seq);
        if (is_set(g.slots32)) ggml_backend_tensor_set(g.slots32, s32.data(), 0, s32.size() * sizeof(int32_t));
        if (is_set(g.slots64)) ggml_backend_tensor_set(g.slots64, s64.data(), 0, s64.size() * sizeof(int64_t));
    }
    if (is_set(inp_.out_ids)) {
        // the last n_out rows of every sequence
        std::vector<int32_t> ids;
        for (const ubatch_seq & us : ub_.seqs) {
            for (uint32_t i = us.n_tokens - us.n_out; i < us.n_tokens; ++i) ids.push_back((int32_t) (us.row0 + i));
        }
        ggml_backend_tensor_set(inp_.out_ids, ids.data(), 0, ids.size() * sizeof(int32_t));
    }

    // each sequence's mask over each cache, computed once: its own mask tensor and the joins
    // before and after the YOCO cut read the same values
    std::vector<std::vector<float>> masks[2];  // [is_swa][sequence]
    masks[0].resize(ub_.seqs.size());
    masks[1].resize(ub_.seqs.size());
    auto mask_of = [&](size_t i, bool is_swa) -> const std::vector<float> & {
        std::vector<float> & m = masks[is_swa][i];
        if (m.empty()) m = seq_mask(i, is_swa);
        return m;
    };
    for (size_t i = 0; i < ub_.seqs.size(); ++i) {
        const seq_inputs & si = inp_.seqs[i];
        if (is_set(si.swa_mask))  set_mask(si.swa_mask, mask_of(i, /*is_swa*/ true));
        if (is_set(si.full_mask)) set_mask(si.full_mask, mask_of(i, /*is_swa*/ false));
    }
    // the joined attention: each sequence's rows and cells (memory's addressing), and its mask
    // rows padded with -inf to n_kv_max
    for (const attn_join_inputs & j : inp_.joins) {
        if (!is_set(j.seqs) && !is_set(j.mask)) continue;
        const uint32_t cells = j.is_swa ? mem_.n_swa_cells() : mem_.n_ctx();
        std::vector<int64_t> table;
        std::vector<float> mask((size_t) j.n_kv_max * j.mask->ne[1], ninf);
        int64_t row = 0;
        for (size_t k = 0; k < j.idx.size(); ++k) {
            const ubatch_seq & us = ub_.seqs[j.idx[k]];
            const seq_inputs & si = inp_.seqs[j.idx[k]];
            const uint32_t n_kv = j.is_swa ? si.n_kv_swa : si.n_kv_full;
            int64_t f[ATTN_SEQ_FIELDS];
            f[ATTN_SEQ_Q_ROW]    = j.q_row0[k];
            f[ATTN_SEQ_ROW]      = row;
            f[ATTN_SEQ_N_ROWS]   = j.rows[k];
            f[ATTN_SEQ_N_KV]     = n_kv;
            f[ATTN_SEQ_K_ROW]    = memory::row_of(us.seq, 0, cells);
            f[ATTN_SEQ_V_ELEM]   = memory::vt_index(us.seq, 0, 0, cells, n_embd_kv);
            f[ATTN_SEQ_V_STRIDE] = memory::vt_index(us.seq, 1, 0, cells, n_embd_kv) - f[ATTN_SEQ_V_ELEM];
            table.insert(table.end(), f, f + ATTN_SEQ_FIELDS);
            // its rows are the last j.rows[k] of its mask (all of them before the YOCO cut)
            const std::vector<float> & m = mask_of(j.idx[k], j.is_swa);
            const uint32_t skip = us.n_tokens - j.rows[k];
            for (uint32_t r = 0; r < j.rows[k]; ++r) {
                std::copy_n(m.begin() + (size_t) (skip + r) * n_kv, n_kv, mask.begin() + (size_t) (row + r) * j.n_kv_max);
            }
            row += j.rows[k];
        }
        if (is_set(j.seqs)) ggml_backend_tensor_set(j.seqs, table.data(), 0, table.size() * sizeof(int64_t));
        if (is_set(j.mask)) ggml_backend_tensor_set(j.mask, mask.data(), 0, mask.size() * sizeof(float));
    }
    // write indices (memory's addressing): the K cache row of each token's cell; the elements
    // (slot, j, cell) of the V^T cache
    auto write_idx = [&](ggml_tensor * k_idx, ggml_tensor * v_idx, uint32_t cells) {
        std::vector<int64_t> k(n_tokens), cell(n_tokens);
        std::vector<uint32_t> slot(n_tokens);
        for (const ubatch_seq & us : ub_.seqs) {
            for (uint32_t t = 0; t < us.n_tokens; ++t) {
                const uint32_t p = us.pos0 + t;
                cell[us.row0 + t] = memory::cell_of(p, cells);
                slot[us.row0 + t] = us.seq;
                k[us.row0 + t] = memory::row_of(us.seq, memory::cell_of(p, cells), cells);
            }
        }
        if (is_set(k_idx)) ggml_backend_tensor_set(k_idx, k.data(), 0, k.size() * sizeof(int64_t));
        if (!is_set(v_idx)) return;
        std::vector<int64_t> v((size_t) n_tokens * n_embd_kv);
        for (uint32_t t = 0; t < n_tokens; ++t) {
            for (int64_t j = 0; j < n_embd_kv; ++j) {
                v[(size_t) t * n_embd_kv + j] = memory::vt_index(slot[t], j, (uint32_t) cell[t], cells, n_embd_kv);
            }
        }
        ggml_backend_tensor_set(v_idx, v.data(), 0, v.size() * sizeof(int64_t));
    };
    write_idx(inp_.swa_k_idx, inp_.swa_v_idx, mem_.n_swa_cells());
    write_idx(inp_.full_k_idx, inp_.full_v_idx, mem_.n_ctx());
}

} // namespace sambay

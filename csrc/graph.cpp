#include "graph.h"

#include "memory.h"
#include "model.h"

#include "ggml-backend.h"

#include <cmath>
#include <vector>

namespace sambay {

size_t graph_size_for(const hparams & hp) {
    return 1024 + (size_t) 160 * hp.n_layer;
}

graph_builder::graph_builder(const model & m, const memory & mem, ggml_context * ctx, ggml_cgraph * gf, const ubatch & ub)
    : model_(m), hp_(m.hp()), mem_(mem), ctx_(ctx), gf_(gf), ub_(ub) {
    n_kv_full_ = ub.pos0 + ub.n_tokens;
    n_kv_swa_  = std::min(mem.n_swa_cells(), n_kv_full_);
}

void graph_builder::cb(ggml_tensor * t, const char * name, int il) const {
    if (il >= 0) {
        ggml_format_name(t, "%s-%d", name, il);
    } else {
        ggml_set_name(t, name);
    }
}

ggml_tensor * graph_builder::build_norm(ggml_tensor * cur, ggml_tensor * w, ggml_tensor * b, int il) {
    // LayerNorm with weight and bias (not RMSNorm), eps from the file
    cur = ggml_norm(ctx_, cur, hp_.norm_eps);
    cur = ggml_mul(ctx_, cur, w);
    return ggml_add(ctx_, cur, b);
}

ggml_tensor * graph_builder::build() {
    const uint32_t n_tokens = ub_.n_tokens;
    const int64_t  n_embd_kv = hp_.n_embd_kv();
    n_rows_ = n_tokens;

    inp_.tokens = ggml_new_tensor_1d(ctx_, GGML_TYPE_I32, n_tokens);
    ggml_set_input(inp_.tokens); cb(inp_.tokens, "inp_tokens", -1);
    inp_.ssm_ids = ggml_new_tensor_1d(ctx_, GGML_TYPE_I32, 1);
    ggml_set_input(inp_.ssm_ids); cb(inp_.ssm_ids, "inp_ssm_ids", -1);
    inp_.swa_mask = ggml_new_tensor_2d(ctx_, GGML_TYPE_F32, n_kv_swa_, n_tokens);
    ggml_set_input(inp_.swa_mask); cb(inp_.swa_mask, "inp_swa_mask", -1);
    inp_.full_mask = ggml_new_tensor_2d(ctx_, GGML_TYPE_F32, n_kv_full_, n_tokens);
    ggml_set_input(inp_.full_mask); cb(inp_.full_mask, "inp_full_mask", -1);
    inp_.swa_k_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens);
    ggml_set_input(inp_.swa_k_idx); cb(inp_.swa_k_idx, "inp_swa_k_idx", -1);
    inp_.swa_v_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens * n_embd_kv);
    ggml_set_input(inp_.swa_v_idx); cb(inp_.swa_v_idx, "inp_swa_v_idx", -1);
    inp_.full_k_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens);
    ggml_set_input(inp_.full_k_idx); cb(inp_.full_k_idx, "inp_full_k_idx", -1);
    inp_.full_v_idx = ggml_new_tensor_1d(ctx_, GGML_TYPE_I64, n_tokens * n_embd_kv);
    ggml_set_input(inp_.full_v_idx); cb(inp_.full_v_idx, "inp_full_v_idx", -1);
    if (ub_.n_out > 0 && ub_.n_out < n_tokens) {
        inp_.out_ids = ggml_new_tensor_1d(ctx_, GGML_TYPE_I32, ub_.n_out);
        ggml_set_input(inp_.out_ids); cb(inp_.out_ids, "inp_out_ids", -1);
    }

    ggml_tensor * inpL = ggml_get_rows(ctx_, model_.tok_embd, inp_.tokens);  // [n_embd, n_tokens] F32
    cb(inpL, "inp_embd", -1);

    for (uint32_t il = 0; il < hp_.n_layer; ++il) {
        if (ub_.n_out == 0 && il > hp_.kv_shared_layer) {
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
            n_rows_     = ub_.n_out;
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
    cur = ggml_mul_mat(ctx_, model_.tok_embd, cur);  // tied output: [n_vocab, n_out]
    cb(cur, "result_output", -1);
    ggml_set_output(cur);
    ggml_build_forward_expand(gf_, cur);
    return cur;
}

void graph_builder::set_inputs() const {
    const uint32_t n_tokens = ub_.n_tokens;
    const uint32_t pos0     = ub_.pos0;
    const int64_t  n_embd_kv = hp_.n_embd_kv();
    const float    ninf     = -INFINITY;
    auto is_set = [](const ggml_tensor * t) { return t && t->buffer; };

    if (is_set(inp_.tokens)) {
        ggml_backend_tensor_set(inp_.tokens, ub_.tokens, 0, n_tokens * sizeof(int32_t));
    }
    if (is_set(inp_.ssm_ids)) {
        const int32_t zero = 0;
        ggml_backend_tensor_set(inp_.ssm_ids, &zero, 0, sizeof(zero));
    }
    if (is_set(inp_.out_ids)) {
        // the last n_out tokens
        std::vector<int32_t> ids(ub_.n_out);
        for (uint32_t i = 0; i < ub_.n_out; ++i) ids[i] = (int32_t) (n_tokens - ub_.n_out + i);
        ggml_backend_tensor_set(inp_.out_ids, ids.data(), 0, ids.size() * sizeof(int32_t));
    }

    // SWA ring: the cell of position p is p % n_cells; after this batch's writes a cell holds
    // the most recent position mapping to it (all cells < n_kv_swa hold one)
    const uint32_t n_cells = mem_.n_swa_cells();
    const uint32_t p_end   = pos0 + n_tokens;
    if (is_set(inp_.swa_mask)) {
        std::vector<int64_t> cell_pos(n_kv_swa_);
        for (uint32_t c = 0; c < n_kv_swa_; ++c) {
            // the largest p < p_end with p % n_cells == c
            const uint32_t last = p_end - 1;
            const uint32_t lc = last % n_cells;
            cell_pos[c] = (int64_t) last - (int64_t) ((lc + n_cells - c) % n_cells);
        }
        std::vector<float> mask((size_t) n_kv_swa_ * n_tokens, ninf);
        const int64_t W = hp_.n_swa;
        for (uint32_t t = 0; t < n_tokens; ++t) {
            const int64_t pq = pos0 + t;
            for (uint32_t c = 0; c < n_kv_swa_; ++c) {
                const int64_t pk = cell_pos[c];
                if (pk >= 0 && pk <= pq && pk >= pq - (W - 1)) mask[(size_t) t * n_kv_swa_ + c] = 0.0f;
            }
        }
        ggml_backend_tensor_set(inp_.swa_mask, mask.data(), 0, mask.size() * sizeof(float));
    }
    auto causal_mask = [&](ggml_tensor * t, uint32_t n_rows, uint32_t first_row) {
        std::vector<float> mask((size_t) n_kv_full_ * n_rows, ninf);
        for (uint32_t r = 0; r < n_rows; ++r) {
            const uint32_t pq = pos0 + first_row + r;
            for (uint32_t c = 0; c <= pq && c < n_kv_full_; ++c) mask[(size_t) r * n_kv_full_ + c] = 0.0f;
        }
        ggml_backend_tensor_set(t, mask.data(), 0, mask.size() * sizeof(float));
    };
    if (is_set(inp_.full_mask)) {
        causal_mask(inp_.full_mask, n_tokens, 0);
    }
    if (is_set(inp_.cross_mask)) {
        const uint32_t n_rows = (uint32_t) inp_.cross_mask->ne[1];
        causal_mask(inp_.cross_mask, n_rows, n_tokens - n_rows);
    }
    auto write_idx = [&](ggml_tensor * k_idx, ggml_tensor * v_idx, uint32_t cells, bool ring) {
        std::vector<int64_t> k(n_tokens), v((size_t) n_tokens * n_embd_kv);
        for (uint32_t t = 0; t < n_tokens; ++t) {
            const int64_t cell = ring ? (pos0 + t) % cells : (pos0 + t);
            k[t] = cell;
            // V^T element (cell, j) of the [cells, n_embd_kv] tensor
            for (int64_t j = 0; j < n_embd_kv; ++j) v[(size_t) t * n_embd_kv + j] = j * cells + cell;
        }
        if (is_set(k_idx)) ggml_backend_tensor_set(k_idx, k.data(), 0, k.size() * sizeof(int64_t));
        if (is_set(v_idx)) ggml_backend_tensor_set(v_idx, v.data(), 0, v.size() * sizeof(int64_t));
    };
    write_idx(inp_.swa_k_idx, inp_.swa_v_idx, n_cells, true);
    write_idx(inp_.full_k_idx, inp_.full_v_idx, mem_.n_ctx(), false);
}

} // namespace sambay

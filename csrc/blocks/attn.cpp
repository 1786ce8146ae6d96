// Differential attention, spec §5.6-5.7, on de-interleaved (stripe-major) heads
// (docs/gguf-format.md): stripe s queries are Q heads [s*H/2, (s+1)*H/2), keys are K heads
// [s*Hkv/2, (s+1)*Hkv/2); both stripes attend over V viewed as Hkv/2 pairs of 2*hd values.
//   O_s = softmax(q_s k_s^T / sqrt(hd) + mask) [v1|v2]        (Dk = hd, Dv = 2*hd)
//   out = out_proj(flatten((1 - lambda_init) * RMSNorm_2hd(O_1 - lambda * O_2) * w)) + b
// Self layers (SWA, full) write their K/V first; cross layers project Q only and read the
// shared cache of kv_shared_layer (already holding this batch's K/V).
#include "graph.h"
#include "memory.h"
#include "model.h"

#include <cmath>

namespace sambay {

ggml_tensor * graph_builder::build_diff_attn(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all,
                                             uint32_t n_cells, uint32_t n_kv, ggml_tensor * mask, int il) {
    // q: [hd, H, n_rows] (a view); k_all: K cache [n_embd_kv, n_cells]; v_all: V^T cache
    const int64_t hd = hp_.n_embd_head, H2 = hp_.n_head / 2, Hkv2 = hp_.n_head_kv / 2;
    const int64_t n_rows = q->ne[2];
    const size_t  kes = ggml_type_size(k_all->type);
    const size_t  ves = ggml_type_size(v_all->type);
    const float   scale = 1.0f / std::sqrt((float) hd);  // 1/sqrt(hd), never 1/sqrt(2*hd)

    ggml_tensor * o[2];
    for (int s = 0; s < 2; ++s) {
        ggml_tensor * qs = ggml_view_3d(ctx_, q, hd, H2, n_rows, q->nb[1], q->nb[2], s * H2 * q->nb[1]);
        qs = ggml_permute(ctx_, qs, 0, 2, 1, 3);  // [hd, n_rows, H/2]
        ggml_tensor * ks = ggml_view_3d(ctx_, k_all, hd, Hkv2, n_kv, hd * kes, k_all->nb[1], s * Hkv2 * hd * kes);
        ks = ggml_permute(ctx_, ks, 0, 2, 1, 3);  // [hd, n_kv, Hkv/2]

        // query pair p uses kv pair p / (H/Hkv): ggml's broadcast over dim 2
        ggml_tensor * kq = ggml_mul_mat(ctx_, ks, qs);  // [n_kv, n_rows, H/2]
        ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
        kq = ggml_soft_max_ext(ctx_, kq, mask, scale, 0.0f);

        // V^T as [n_kv, 2*hd, Hkv/2]: pair g holds V heads 2g, 2g+1
        ggml_tensor * vt = ggml_view_3d(ctx_, v_all, n_kv, 2 * hd, Hkv2, n_cells * ves, 2 * hd * n_cells * ves, 0);
        o[s] = ggml_mul_mat(ctx_, vt, kq);  // [2*hd, n_rows, H/2]
    }
    ggml_tensor * cur = ggml_sub(ctx_, o[0], ggml_scale(ctx_, o[1], hp_.lambda[il]));
    cur = ggml_rms_norm(ctx_, cur, hp_.sub_norm_eps);  // over the 2*hd features of each pair
    cur = ggml_mul(ctx_, cur, model_.layer(il).sub_norm);
    cur = ggml_scale(ctx_, cur, 1.0f - hp_.lambda_init[il]);
    cb(cur, "diff_attn", il);

    cur = ggml_permute(ctx_, cur, 0, 2, 1, 3);  // [2*hd, H/2, n_rows]: pair-major = Out_0 | Out_1 | ...
    cur = ggml_cont_2d(ctx_, cur, 2 * hd * H2, n_rows);

    const layer_weights & l = model_.layer(il);
    cur = ggml_mul_mat(ctx_, l.wo, cur);  // {H*hd, n_embd} @ {H*hd, n_rows} => {n_embd, n_rows}
    cur = ggml_add(ctx_, cur, l.bo);
    cb(cur, "attn_out", il);
    return cur;
}

ggml_tensor * graph_builder::build_self_attn(ggml_tensor * cur, int il) {
    const layer_weights & l  = model_.layer(il);
    const layer_memory &  lm = mem_.layer(il);
    const bool    is_swa  = hp_.kind(il) == layer_kind::attn_swa;
    const int64_t hd = hp_.n_embd_head, n_embd_q = hp_.n_embd_q(), n_embd_kv = hp_.n_embd_kv();
    const int64_t n_t = n_rows_;
    const size_t  es  = sizeof(float);

    ggml_tensor * qkv = ggml_mul_mat(ctx_, l.wqkv, cur);  // {n_embd, n_qkv} @ {n_embd, n_t} => {n_qkv, n_t}
    qkv = ggml_add(ctx_, qkv, l.bqkv);
    cb(qkv, "wqkv", il);

    ggml_tensor * q     = ggml_view_3d(ctx_, qkv, hd, hp_.n_head, n_t, hd * es, qkv->nb[1], 0);
    ggml_tensor * k_cur = ggml_view_2d(ctx_, qkv, n_embd_kv, n_t, qkv->nb[1], n_embd_q * es);
    ggml_tensor * v_cur = ggml_view_2d(ctx_, qkv, n_embd_kv, n_t, qkv->nb[1], (n_embd_q + n_embd_kv) * es);

    // write this batch's K rows and V^T elements; the attention reads the results of the
    // writes, so it is ordered after them
    ggml_tensor * k_idx = is_swa ? inp_.swa_k_idx : inp_.full_k_idx;
    ggml_tensor * v_idx = is_swa ? inp_.swa_v_idx : inp_.full_v_idx;
    ggml_tensor * k_all = ggml_set_rows(ctx_, lm.k, ggml_cont(ctx_, k_cur), k_idx);
    ggml_tensor * v_flat = ggml_reshape_2d(ctx_, lm.v, 1, ggml_nelements(lm.v));
    ggml_tensor * v_all = ggml_set_rows(ctx_, v_flat, ggml_reshape_2d(ctx_, ggml_cont(ctx_, v_cur), 1, n_embd_kv * n_t), v_idx);
    ggml_build_forward_expand(gf_, k_all);
    ggml_build_forward_expand(gf_, v_all);

    if ((uint32_t) il == hp_.kv_shared_layer) {
        shared_k_ = k_all;
        shared_v_ = v_all;
    }
    const uint32_t n_kv = is_swa ? n_kv_swa_ : n_kv_full_;
    return build_diff_attn(q, k_all, v_all, lm.n_cells, n_kv, is_swa ? inp_.swa_mask : inp_.full_mask, il);
}

ggml_tensor * graph_builder::build_cross_attn(ggml_tensor * cur, int il) {
    const layer_weights & l = model_.layer(il);
    GGML_ASSERT(shared_k_ && "cross-attention layer before the shared-KV layer");
    if (!inp_.cross_mask) {
        // causal over the shared cache, for the rows the cross-decoder runs on
        inp_.cross_mask = ggml_new_tensor_2d(ctx_, GGML_TYPE_F32, n_kv_full_, n_rows_);
        ggml_set_input(inp_.cross_mask);
        cb(inp_.cross_mask, "inp_cross_mask", -1);
    }
    ggml_tensor * q = ggml_mul_mat(ctx_, l.wq, cur);  // {n_embd, H*hd} @ {n_embd, n_rows} => {H*hd, n_rows}
    q = ggml_add(ctx_, q, l.bq);
    cb(q, "wq", il);
    q = ggml_reshape_3d(ctx_, q, hp_.n_embd_head, hp_.n_head, n_rows_);
    const uint32_t n_cells = mem_.layer(hp_.kv_shared_layer).n_cells;
    return build_diff_attn(q, shared_k_, shared_v_, n_cells, n_kv_full_, inp_.cross_mask, il);
}

} // namespace sambay

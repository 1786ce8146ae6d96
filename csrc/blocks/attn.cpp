// Differential attention (docs/architecture.md) on de-interleaved (stripe-major) heads
// (docs/gguf-format.md): stripe s queries are Q heads [s*H/2, (s+1)*H/2), keys are K heads
// [s*Hkv/2, (s+1)*Hkv/2); both stripes attend over V viewed as Hkv/2 pairs of 2*hd values.
//   O_s = softmax(q_s k_s^T / sqrt(hd) + mask) [v1|v2]        (Dk = hd, Dv = 2*hd)
//   out = out_proj(flatten((1 - lambda_init) * RMSNorm_2hd(O_1 - lambda * O_2) * w)) + b
// Paths. Default, V stored transposed: for decode-sized batches one K product for all heads
// of both stripes, one soft_max_ext, then, since O_1 - lambda O_2 = (P_1 - lambda P_2) V, the
// combined weights times V in one product (V read once, half the V work); for larger batches
// mul_mat + soft_max_ext + mul_mat per stripe, so only one stripe's scores are alive at a time.
// With flash_attn: ggml_flash_attn_ext per stripe over V stored like K (no score tensor); off
// the CPU (GPU backends) two calls per stripe, one per half of each V pair.
// Self layers (SWA, full) write their K/V first; cross layers project Q only and read the
// shared cache of kv_shared_layer (already holding this batch's K/V).
// Several sequences: the projections run on all rows at once. In a CPU context the sequences
// of at most COMBINE_MAX_ROWS rows share one set of attention ops per layer (attn_cpu.h: the
// kernels find each sequence's cells through a table of sequences, the scores are padded to the
// deepest one; much deeper sequences get joins of their own); every other sequence attends in its own subgraph over the cells of its slot
// (views, no copies); the results are joined back into rows. The caches are written for all
// rows by one set_rows per cache.
#include "attn_cpu.h"
#include "graph.h"
#include "memory.h"
#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace sambay {

bool flash_attn_gpu_head_size(uint32_t hd) {
    for (uint32_t ok : { 40u, 64u, 72u, 80u, 96u, 112u, 128u, 256u }) {
        if (hd == ok) return true;
    }
    return false;
}

// sequences of at most this many rows (of a micro-batch) take the combined-weights attention
// paths (see above): the joined CPU kernels, or ggml's ops per sequence
constexpr int64_t COMBINE_MAX_ROWS = 16;

// a join's padded size (its deepest sequence's cells times its rows: the score and weight
// tensors, the mask filled per step) stays within this factor of its sequences' own cells
// (the kernels skip the padding): deeper sequences start a join of their own
constexpr int64_t JOIN_PAD_MAX = 2;

std::vector<size_t> graph_builder::join_inputs(bool is_swa) {
    std::vector<size_t> out;
    if (!ub_.cpu_attn || ub_.flash_attn) return out;
    for (size_t k = 0; k < inp_.joins.size(); ++k) {
        if (inp_.joins[k].is_swa == is_swa && inp_.joins[k].cut == cut_) out.push_back(k);
    }
    if (!out.empty()) return out;
    auto n_kv_of = [&](uint32_t i) { return is_swa ? inp_.seqs[i].n_kv_swa : inp_.seqs[i].n_kv_full; };
    // the short sequences, deepest first, cut into joins whose padding stays bounded
    std::vector<uint32_t> order;
    for (uint32_t i = 0; i < ub_.seqs.size(); ++i) {
        const uint32_t n = seq_rows(i);
        if (n > 0 && n <= COMBINE_MAX_ROWS) order.push_back(i);
    }
    std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return n_kv_of(a) > n_kv_of(b); });
    std::vector<std::vector<uint32_t>> groups;
    int64_t rows = 0, work = 0;  // of the last group
    for (uint32_t i : order) {
        const int64_t n = seq_rows(i), w = (int64_t) n_kv_of(i) * n;
        if (groups.empty() || (int64_t) n_kv_of(groups.back()[0]) * (rows + n) > JOIN_PAD_MAX * (work + w)) {
            groups.emplace_back();
            rows = work = 0;
        }
        groups.back().push_back(i);
        rows += n;
        work += w;
    }
    const char * stage = is_swa ? "swa" : cut_ ? "full-cut" : "full";
    for (std::vector<uint32_t> & g : groups) {
        std::sort(g.begin(), g.end());  // rows in micro-batch order
        attn_join_inputs j;
        j.is_swa = is_swa;
        j.cut = cut_;
        uint32_t n_rows = 0;
        for (uint32_t i : g) {
            j.idx.push_back(i);
            j.q_row0.push_back(seq_row0(i));
            j.rows.push_back(seq_rows(i));
            j.n_kv_max = std::max(j.n_kv_max, n_kv_of(i));
            n_rows += seq_rows(i);
        }
        j.seqs = ggml_new_tensor_2d(ctx_, GGML_TYPE_I64, ATTN_SEQ_FIELDS, (int64_t) j.idx.size());
        ggml_set_input(j.seqs); ggml_format_name(j.seqs, "inp_join_seqs-%s-%zu", stage, inp_.joins.size());
        j.mask = ggml_new_tensor_2d(ctx_, GGML_TYPE_F32, j.n_kv_max, n_rows);
        ggml_set_input(j.mask); ggml_format_name(j.mask, "inp_join_mask-%s-%zu", stage, inp_.joins.size());
        out.push_back(inp_.joins.size());
        inp_.joins.push_back(std::move(j));
    }
    return out;
}

ggml_tensor * graph_builder::build_attn_seqs(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all,
                                             uint32_t n_cells, bool is_swa, int il) {
    // the short sequences (decode steps, small chunks) of a CPU context together in a few joins;
    // every other sequence a subgraph over the cells of its slot (views, no copies); the
    // results joined back into the rows of the micro-batch (the weights stay batched)
    const std::vector<size_t> joins = join_inputs(is_swa);
    std::vector<ggml_tensor *> joined;                  // per join: [2*hd*H/2, its rows]
    std::vector<std::pair<size_t, int64_t>> at(ub_.seqs.size(), { SIZE_MAX, 0 });  // (join, first row)
    for (size_t g = 0; g < joins.size(); ++g) {
        const attn_join_inputs & j = inp_.joins[joins[g]];
        joined.push_back(build_attn_joined(q, k_all, v_all, j, il));
        int64_t row = 0;
        for (size_t k = 0; k < j.idx.size(); ++k) {
            at[j.idx[k]] = { g, row };
            row += j.rows[k];
        }
    }
    // pieces of rows in micro-batch order: (join, first row, rows), or a per-sequence output
    struct piece { size_t join; int64_t row0, rows; ggml_tensor * t; };
    std::vector<piece> pieces;
    for (size_t i = 0; i < ub_.seqs.size(); ++i) {
        const uint32_t n = seq_rows(i);
        if (n == 0) continue;
        if (at[i].first != SIZE_MAX) {
            const auto [g, row] = at[i];
            if (!pieces.empty() && !pieces.back().t && pieces.back().join == g &&
                pieces.back().row0 + pieces.back().rows == row) {
                pieces.back().rows += n;  // the next rows of the same join
            } else {
                pieces.push_back({ g, row, n, nullptr });
            }
            continue;
        }
        ggml_tensor * qs = ggml_view_3d(ctx_, q, q->ne[0], q->ne[1], n, q->nb[1], q->nb[2], seq_row0(i) * q->nb[2]);
        const seq_inputs & si = inp_.seqs[i];
        ggml_tensor * mask = is_swa ? si.swa_mask : si.full_mask;
        if (mask->ne[1] != n) {
            // cross-decoder rows after the YOCO cut: the last n rows of the full mask
            mask = ggml_view_2d(ctx_, mask, mask->ne[0], n, mask->nb[1], (mask->ne[1] - n) * mask->nb[1]);
        }
        pieces.push_back({ SIZE_MAX, 0, n,
                           build_diff_attn(qs, k_all, v_all, ub_.seqs[i].seq, n_cells,
                                           is_swa ? si.n_kv_swa : si.n_kv_full, mask, il) });
    }
    std::vector<ggml_tensor *> outs;
    for (const piece & p : pieces) {
        if (p.t) { outs.push_back(p.t); continue; }
        ggml_tensor * t = joined[p.join];
        outs.push_back(p.rows == t->ne[1] ? t : ggml_view_2d(ctx_, t, t->ne[0], p.rows, t->nb[1], p.row0 * t->nb[1]));
    }
    ggml_tensor * cur = join_rows(ctx_, outs);  // [2*hd*H/2, n_rows]
    cb(cur, "diff_attn", il);
    return build_attn_out(cur, il);
}

ggml_tensor * graph_builder::build_attn_joined(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all,
                                               const attn_join_inputs & join, int il) {
    // q: [hd, H, n_rows] of all rows; k_all, v_all: the whole caches (rows; V^T elements); the
    // kernels of attn_cpu.h find each sequence's rows and cells in join.seqs (each cached key and
    // value read once for the g query heads of both stripes that share it)
    const int64_t hd = hp_.n_embd_head;
    const int64_t n_rows = join.mask->ne[1];
    const float   scale = 1.0f / std::sqrt((float) hd);  // 1/sqrt(hd), never 1/sqrt(2*hd)
    ggml_tensor * kq = attn_scores_cpu(ctx_, q, k_all, join.mask, join.seqs);  // [n_kv_max, g*n_rows, Hkv/2, 2], mask added
    ggml_tensor * w = attn_softmax_diff_cpu(ctx_, kq, join.seqs, scale, hp_.lambda[il]);  // [n_kv_max, g*n_rows, Hkv/2]
    ggml_tensor * cur = attn_pv_cpu(ctx_, w, v_all, join.seqs, 2 * hd);  // [2*hd, g*n_rows, Hkv/2]
    return build_pair_norm(cur, n_rows, /*by_kv_pair*/ true, il);
}

ggml_tensor * graph_builder::build_diff_attn(ggml_tensor * q, ggml_tensor * k_all, ggml_tensor * v_all, uint32_t slot,
                                             uint32_t n_cells, uint32_t n_kv, ggml_tensor * mask, int il) {
    // q: [hd, H, n_rows] (a view); k_all: K cache rows [n_embd_kv, n_cells * n_seq]; v_all: V
    // cache; the sequence's cells are those of `slot`
    const int64_t hd = hp_.n_embd_head, H2 = hp_.n_head / 2, Hkv2 = hp_.n_head_kv / 2;
    const int64_t n_rows = q->ne[2];
    const size_t  kes = ggml_type_size(k_all->type);
    const size_t  ves = ggml_type_size(v_all->type);
    const float   scale = 1.0f / std::sqrt((float) hd);  // 1/sqrt(hd), never 1/sqrt(2*hd)

    // stripe s: its query heads [hd, n_rows, H/2] and its K heads [hd, n_kv, Hkv/2]
    auto q_stripe = [&](int s) {
        ggml_tensor * qs = ggml_view_3d(ctx_, q, hd, H2, n_rows, q->nb[1], q->nb[2], s * H2 * q->nb[1]);
        return ggml_permute(ctx_, qs, 0, 2, 1, 3);
    };
    // the slot's cells (memory's addressing): K rows from row_of(slot, 0); V^T from element (slot, 0, 0)
    const size_t k_off = (size_t) memory::row_of(slot, 0, n_cells) * k_all->nb[1];
    const size_t v_off = ub_.flash_attn ? (size_t) memory::row_of(slot, 0, n_cells) * v_all->nb[1]
                                        : (size_t) memory::vt_index(slot, 0, 0, n_cells, hp_.n_embd_kv()) * ves;
    auto k_stripe = [&](int s) {
        ggml_tensor * ks = ggml_view_3d(ctx_, k_all, hd, Hkv2, n_kv, hd * kes, k_all->nb[1], k_off + s * Hkv2 * hd * kes);
        return ggml_permute(ctx_, ks, 0, 2, 1, 3);
    };
    // query pair p uses kv pair p / (H/Hkv): ggml's broadcast over the head dimension
    ggml_tensor * cur = nullptr;
    if (ub_.flash_attn) {
        // V stored like K, [n_embd_kv, n_cells]: pair p is [2*hd, n_kv] at column 2*hd*p.
        // The CPU's flash_attn_ext takes the pairs whole (V head size 2*hd); CUDA and Metal
        // only have kernels with V head size == K head size, so elsewhere each pair is read
        // as its two halves of hd values, one call per half: the softmax weights of a query
        // are the same in both calls, so [O(v_lo) | O(v_hi)] == O([v_lo | v_hi]) (twice the
        // score work, none of it on the host).
        auto flash = [&](int s, int64_t dv, size_t off) {
            ggml_tensor * v = ggml_view_3d(ctx_, v_all, dv, n_kv, Hkv2, v_all->nb[1], 2 * hd * ves, v_off + off);
            ggml_tensor * o = ggml_flash_attn_ext(ctx_, q_stripe(s), k_stripe(s), v, mask, scale, 0.0f, 0.0f);
            ggml_flash_attn_ext_set_prec(o, GGML_PREC_F32);
            return o;  // [dv, H/2, n_rows]
        };
        auto diff = [&](int64_t dv, size_t off) {  // O_1 - lambda O_2 over V columns [off, off + dv) of each pair
            return ggml_sub(ctx_, flash(0, dv, off), ggml_scale(ctx_, flash(1, dv, off), hp_.lambda[il]));
        };
        if (ub_.cpu_attn) {
            cur = diff(2 * hd, 0);  // [2*hd, H/2, n_rows]
        } else {
            cur = ggml_concat(ctx_, diff(hd, 0), diff(hd, hd * ves), 0);  // [hd | hd, H/2, n_rows]
        }
    } else {
        // V^T stored [n_cells, n_embd_kv] per sequence, viewed as pairs [n_kv, 2*hd, Hkv/2]
        ggml_tensor * v = ggml_view_3d(ctx_, v_all, n_kv, 2 * hd, Hkv2, n_cells * ves, 2 * hd * n_cells * ves, v_off);
        if (n_rows <= COMBINE_MAX_ROWS) {
            // decode-sized batches: both stripes' scores at once, then, as O_1 - lambda O_2 =
            // (P_1 - lambda P_2) V, one product with V: half the V work and V is read once.
            // Query head h (stripe-major) reads K head h / (H/Hkv): stripe s's K head j / (H/Hkv)
            // for h = s*H/2 + j.
            ggml_tensor * qa = ggml_permute(ctx_, q, 0, 2, 1, 3);  // [hd, n_rows, H]
            ggml_tensor * ka = ggml_view_3d(ctx_, k_all, hd, hp_.n_head_kv, n_kv, hd * kes, k_all->nb[1], k_off);
            ka = ggml_permute(ctx_, ka, 0, 2, 1, 3);  // [hd, n_kv, Hkv]
            ggml_tensor * kq = ggml_mul_mat(ctx_, ka, qa);  // [n_kv, n_rows, H]
            ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
            kq = ggml_soft_max_ext_inplace(ctx_, kq, mask, scale, 0.0f);
            ggml_tensor * p1 = ggml_view_3d(ctx_, kq, n_kv, n_rows, H2, kq->nb[1], kq->nb[2], 0);
            ggml_tensor * p2 = ggml_view_3d(ctx_, kq, n_kv, n_rows, H2, kq->nb[1], kq->nb[2], H2 * kq->nb[2]);
            ggml_tensor * w  = ggml_sub_inplace(ctx_, p1, ggml_scale_inplace(ctx_, p2, hp_.lambda[il]));
            cur = ggml_mul_mat(ctx_, v, w);  // [2*hd, n_rows, H/2]
        } else {
            // prefill: one stripe at a time, so only one stripe's [n_kv, n_rows, H/2] scores
            // are alive at once (the largest tensor of a long-context prefill)
            ggml_tensor * o[2];
            for (int s = 0; s < 2; ++s) {
                ggml_tensor * kq = ggml_mul_mat(ctx_, k_stripe(s), q_stripe(s));  // [n_kv, n_rows, H/2]
                ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
                kq = ggml_soft_max_ext(ctx_, kq, mask, scale, 0.0f);
                o[s] = ggml_mul_mat(ctx_, v, kq);  // [2*hd, n_rows, H/2]
            }
            cur = ggml_sub(ctx_, o[0], ggml_scale(ctx_, o[1], hp_.lambda[il]));
        }
    }
    return build_pair_norm(cur, n_rows, /*by_kv_pair*/ false, il);
}

ggml_tensor * graph_builder::build_pair_norm(ggml_tensor * cur, int64_t n_rows, bool by_kv_pair, int il) {
    const int64_t hd = hp_.n_embd_head, H2 = hp_.n_head / 2, Hkv2 = hp_.n_head_kv / 2;
    // per pair (rows of 2*hd values, whatever the order of the other dimensions)
    cur = ggml_rms_norm(ctx_, cur, hp_.sub_norm_eps);
    cur = ggml_mul(ctx_, cur, model_.layer(il).sub_norm);
    cur = ggml_scale(ctx_, cur, 1.0f - hp_.lambda_init[il]);

    if (by_kv_pair) {
        // (2*hd, jj, row, pair of K heads) -> (2*hd, jj, pair of K heads, row): query pair
        // j = m*g + jj
        const int64_t g = hp_.n_head / hp_.n_head_kv;
        cur = ggml_reshape_4d(ctx_, cur, 2 * hd, g, n_rows, Hkv2);
        cur = ggml_cont(ctx_, ggml_permute(ctx_, cur, 0, 1, 3, 2));  // [2*hd, H/2, n_rows]
    } else if (!ub_.flash_attn) {
        cur = ggml_cont(ctx_, ggml_permute(ctx_, cur, 0, 2, 1, 3));  // [2*hd, H/2, n_rows]
    }
    // pair-major = Out_0 | Out_1 | ... = the original head order
    return ggml_reshape_2d(ctx_, cur, 2 * hd * H2, n_rows);
}

ggml_tensor * graph_builder::build_attn_out(ggml_tensor * cur, int il) {
    const layer_weights & l = model_.layer(il);
    cur = mm(l.wo, cur);  // {H*hd, n_embd} @ {H*hd, n_rows} => {n_embd, n_rows}
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

    ggml_tensor * qkv = mm(l.wqkv, cur);  // {n_embd, n_qkv} @ {n_embd, n_t} => {n_qkv, n_t}
    qkv = ggml_add(ctx_, qkv, l.bqkv);
    cb(qkv, "wqkv", il);

    ggml_tensor * q     = ggml_view_3d(ctx_, qkv, hd, hp_.n_head, n_t, hd * es, qkv->nb[1], 0);
    ggml_tensor * k_cur = ggml_view_2d(ctx_, qkv, n_embd_kv, n_t, qkv->nb[1], n_embd_q * es);
    ggml_tensor * v_cur = ggml_view_2d(ctx_, qkv, n_embd_kv, n_t, qkv->nb[1], (n_embd_q + n_embd_kv) * es);

    // write this batch's K rows and V elements (set_rows takes the strided views as they are);
    // the attention reads the results of the writes, so it is ordered after them
    ggml_tensor * k_idx = is_swa ? inp_.swa_k_idx : inp_.full_k_idx;
    ggml_tensor * v_idx = is_swa ? inp_.swa_v_idx : inp_.full_v_idx;
    // the caches as rows of all slots' cells [n_embd_kv, n_cells * n_seq]
    const int64_t n_rows_all = (int64_t) lm.n_cells * mem_.n_seq();
    ggml_tensor * k_all = ggml_set_rows(ctx_, ggml_reshape_2d(ctx_, lm.k, n_embd_kv, n_rows_all), k_cur, k_idx);
    ggml_tensor * v_all = nullptr;
    if (mem_.v_trans()) {
        // one element per "row": V^T[cell, j] <- V[j, t]
        ggml_tensor * v_flat = ggml_reshape_2d(ctx_, lm.v, 1, ggml_nelements(lm.v));
        v_all = ggml_set_rows(ctx_, v_flat, ggml_reshape_2d(ctx_, ggml_cont(ctx_, v_cur), 1, n_embd_kv * n_t), v_idx);
    } else {
        v_all = ggml_set_rows(ctx_, ggml_reshape_2d(ctx_, lm.v, n_embd_kv, n_rows_all), v_cur, k_idx);
    }
    ggml_build_forward_expand(gf_, k_all);
    ggml_build_forward_expand(gf_, v_all);

    if ((uint32_t) il == hp_.kv_shared_layer) {
        shared_k_ = k_all;
        shared_v_ = v_all;
    }
    return build_attn_seqs(q, k_all, v_all, lm.n_cells, is_swa, il);
}

ggml_tensor * graph_builder::build_cross_attn(ggml_tensor * cur, int il) {
    const layer_weights & l = model_.layer(il);
    GGML_ASSERT(shared_k_ && "cross-attention layer before the shared-KV layer");
    ggml_tensor * q = mm(l.wq, cur);  // {n_embd, H*hd} @ {n_embd, n_rows} => {H*hd, n_rows}
    q = ggml_add(ctx_, q, l.bq);
    cb(q, "wq", il);
    q = ggml_reshape_3d(ctx_, q, hp_.n_embd_head, hp_.n_head, n_rows_);
    // causal over the shared cache, each sequence over its own cells
    const uint32_t n_cells = mem_.layer(hp_.kv_shared_layer).n_cells;
    return build_attn_seqs(q, shared_k_, shared_v_, n_cells, /*is_swa*/ false, il);
}

} // namespace sambay

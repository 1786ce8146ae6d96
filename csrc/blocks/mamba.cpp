// Mamba-1 mixer (docs/architecture.md) with the conv and SSM states of the context memory:
// in_proj -> x|z; causal depthwise conv over [conv state | x] (+bias, SiLU) -> u;
// x_proj -> dt|B|C; dt_proj (+bias); selective scan (softplus inside); y = scan + D*u;
// memory_layer exports y (before the gate) as the GMU memory; out_proj(y * silu(z)).
#include "graph.h"
#include "memory.h"
#include "model.h"

namespace sambay {

ggml_tensor * graph_builder::build_mamba(ggml_tensor * cur, int il) {
    const layer_weights & l  = model_.layer(il);
    const layer_memory &  lm = mem_.layer(il);
    const int64_t d_inner = hp_.d_inner, d_state = hp_.d_state, d_conv = hp_.d_conv, dt_rank = hp_.dt_rank;
    const int64_t n_seq = mem_.n_seq();
    const size_t  es  = sizeof(float);

    ggml_tensor * xz = mm(l.ssm_in, cur);  // {n_embd, 2*d_inner} @ {n_embd, n_rows} => {2*d_inner, n_rows}
    cb(xz, "ssm_in", il);
    ggml_tensor * z = ggml_view_2d(ctx_, xz, d_inner, n_rows_, xz->nb[1], d_inner * es);

    // the states of every slot, one row per slot: read through the group's slot ids, written
    // back with set_rows (the graph reads a slot's state before its write)
    ggml_tensor * conv_all = ggml_reshape_2d(ctx_, lm.conv, (d_conv - 1) * d_inner, n_seq);
    ggml_tensor * ssm_all  = ggml_reshape_2d(ctx_, lm.ssm, d_state * d_inner, n_seq);
    ggml_tensor * s        = ggml_reshape_4d(ctx_, lm.ssm, d_state, 1, d_inner, n_seq);

    // the conv and the scan need equal-length sequences: once per group of them
    std::vector<ggml_tensor *> ys, us;
    for (const group_inputs & g : inp_.groups) {
        const int64_t n_t = ub_.seqs[g.first].n_tokens, n_s = g.count;
        const size_t  off = (size_t) ub_.seqs[g.first].row0 * xz->nb[1];
        ggml_tensor * x = ggml_view_3d(ctx_, xz, d_inner, n_t, n_s, xz->nb[1], n_t * xz->nb[1], off);

        // conv: prepend the last d_conv-1 raw x columns of the previous batch
        ggml_tensor * conv_state = ggml_reshape_3d(ctx_, ggml_get_rows(ctx_, conv_all, g.slots32), d_conv - 1, d_inner, n_s);
        ggml_tensor * conv_x = ggml_concat(ctx_, conv_state, ggml_permute(ctx_, x, 1, 0, 2, 3), 0);  // {d_conv-1+n_t, d_inner, n_s}
        cb(conv_x, "conv_x", il);
        // store the new last d_conv-1 columns
        ggml_tensor * new_conv = ggml_cont(ctx_, ggml_view_3d(ctx_, conv_x, d_conv - 1, d_inner, n_s,
                                                              conv_x->nb[1], conv_x->nb[2], n_t * es));
        ggml_build_forward_expand(gf_, ggml_set_rows(ctx_, conv_all,
            ggml_reshape_2d(ctx_, new_conv, (d_conv - 1) * d_inner, n_s), g.slots64));

        ggml_tensor * u = ggml_ssm_conv(ctx_, conv_x, l.ssm_conv1d);  // {d_inner, n_t, n_s}
        u = ggml_add(ctx_, u, l.ssm_conv1d_b);
        u = ggml_silu(ctx_, u);
        cb(u, "conv_out", il);

        ggml_tensor * x_db = mm(l.ssm_x, u);  // {d_inner, dt_rank+2*d_state} @ {d_inner, n_t, n_s} => {dt_rank+2*d_state, n_t, n_s}
        ggml_tensor * dt = ggml_view_2d(ctx_, x_db, dt_rank, n_t * n_s, x_db->nb[1], 0);
        ggml_tensor * B  = ggml_view_4d(ctx_, x_db, d_state, 1, n_t, n_s, d_state * es, x_db->nb[1], x_db->nb[2], dt_rank * es);
        ggml_tensor * C  = ggml_view_4d(ctx_, x_db, d_state, 1, n_t, n_s, d_state * es, x_db->nb[1], x_db->nb[2], (dt_rank + d_state) * es);

        // contiguous first: extra weight buffers (the CPU's AMX one) take contiguous inputs only,
        // and model.cpp places weights by probing with one (a strided view would find no backend)
        dt = mm(l.ssm_dt, ggml_cont(ctx_, dt));  // {dt_rank, d_inner} @ {dt_rank, n_t*n_s} => {d_inner, n_t*n_s}
        dt = ggml_add(ctx_, dt, l.ssm_dt_b);     // softplus is applied inside ssm_scan
        dt = ggml_reshape_3d(ctx_, dt, d_inner, n_t, n_s);

        // Mamba-1 in ssm_scan terms: n_head = d_inner, head_dim = 1, n_group = 1, K = 1; the
        // scan reads each sequence's initial state in place through the slot ids
        ggml_tensor * xs  = ggml_reshape_4d(ctx_, u, 1, d_inner, n_t, n_s);
        ggml_tensor * out = ggml_ssm_scan(ctx_, s, xs, dt, l.ssm_a, B, C, g.slots32, 1);
        cb(out, "ssm_scan", il);
        // the final states follow y in the result
        ggml_build_forward_expand(gf_, ggml_set_rows(ctx_, ssm_all,
            ggml_view_2d(ctx_, out, d_state * d_inner, n_s, d_state * d_inner * es, ggml_nelements(xs) * es), g.slots64));

        ys.push_back(ggml_view_2d(ctx_, out, d_inner, n_t * n_s, d_inner * es, 0));
        us.push_back(ggml_reshape_2d(ctx_, u, d_inner, n_t * n_s));
    }
    ggml_tensor * y = join_rows(ctx_, ys);
    ggml_tensor * u = join_rows(ctx_, us);
    y = ggml_add(ctx_, y, ggml_mul(ctx_, u, l.ssm_d));  // + D*u
    if ((uint32_t) il == hp_.memory_layer) {
        gmu_memory_ = y;  // tapped after the D skip, before the z gate
        cb(y, "gmu_memory", il);
    }
    y = ggml_swiglu_split(ctx_, z, y);  // y * silu(z)
    cur = mm(l.ssm_out, y);  // {d_inner, n_embd} @ {d_inner, n_rows} => {n_embd, n_rows}
    cb(cur, "ssm_out", il);
    return cur;
}

} // namespace sambay

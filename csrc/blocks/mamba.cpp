// Mamba-1 mixer, spec §5.4 / §7, with the conv and SSM states of the context memory:
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
    const int64_t n_t = n_rows_;
    const size_t  es  = sizeof(float);

    ggml_tensor * xz = ggml_mul_mat(ctx_, l.ssm_in, cur);  // {n_embd, 2*d_inner} @ {n_embd, n_t} => {2*d_inner, n_t}
    cb(xz, "ssm_in", il);
    ggml_tensor * x = ggml_view_2d(ctx_, xz, d_inner, n_t, xz->nb[1], 0);
    ggml_tensor * z = ggml_view_2d(ctx_, xz, d_inner, n_t, xz->nb[1], d_inner * es);

    // conv: prepend the last d_conv-1 raw x columns of the previous batch
    ggml_tensor * conv_state = ggml_reshape_3d(ctx_, lm.conv, d_conv - 1, d_inner, 1);
    ggml_tensor * conv_x = ggml_concat(ctx_, conv_state, ggml_transpose(ctx_, x), 0);  // {d_conv-1+n_t, d_inner, 1}
    cb(conv_x, "conv_x", il);
    // store the new last d_conv-1 columns (the graph reads conv_state before this copy)
    ggml_build_forward_expand(gf_, ggml_cpy(ctx_,
        ggml_view_3d(ctx_, conv_x, d_conv - 1, d_inner, 1, conv_x->nb[1], conv_x->nb[2], n_t * es),
        conv_state));

    ggml_tensor * u = ggml_ssm_conv(ctx_, conv_x, l.ssm_conv1d);  // {d_inner, n_t, 1}
    u = ggml_add(ctx_, u, l.ssm_conv1d_b);
    u = ggml_silu(ctx_, u);
    cb(u, "conv_out", il);

    ggml_tensor * x_db = ggml_mul_mat(ctx_, l.ssm_x, u);  // {d_inner, dt_rank+2*d_state} @ {d_inner, n_t, 1} => {dt_rank+2*d_state, n_t, 1}
    ggml_tensor * dt = ggml_view_2d(ctx_, x_db, dt_rank, n_t, x_db->nb[1], 0);
    ggml_tensor * B  = ggml_view_4d(ctx_, x_db, d_state, 1, n_t, 1, d_state * es, x_db->nb[1], x_db->nb[2], dt_rank * es);
    ggml_tensor * C  = ggml_view_4d(ctx_, x_db, d_state, 1, n_t, 1, d_state * es, x_db->nb[1], x_db->nb[2], (dt_rank + d_state) * es);

    // contiguous first: extra weight buffers (the CPU's AMX one) take contiguous inputs only,
    // and model.cpp places weights by probing with one (a strided view would find no backend)
    dt = ggml_mul_mat(ctx_, l.ssm_dt, ggml_cont(ctx_, dt));  // {dt_rank, d_inner} @ {dt_rank, n_t} => {d_inner, n_t}
    dt = ggml_add(ctx_, dt, l.ssm_dt_b);     // softplus is applied inside ssm_scan
    dt = ggml_reshape_3d(ctx_, dt, d_inner, n_t, 1);

    // Mamba-1 in ssm_scan terms: n_head = d_inner, head_dim = 1, n_group = 1, K = 1
    ggml_tensor * s   = ggml_reshape_4d(ctx_, lm.ssm, d_state, 1, d_inner, 1);
    ggml_tensor * xs  = ggml_reshape_4d(ctx_, u, 1, d_inner, n_t, 1);
    ggml_tensor * out = ggml_ssm_scan(ctx_, s, xs, dt, l.ssm_a, B, C, inp_.ssm_ids, 1);
    cb(out, "ssm_scan", il);
    // the final state follows y in the result
    ggml_build_forward_expand(gf_, ggml_cpy(ctx_,
        ggml_view_1d(ctx_, out, d_state * d_inner, ggml_nelements(xs) * es), lm.ssm));

    ggml_tensor * y = ggml_view_2d(ctx_, out, d_inner, n_t, d_inner * es, 0);
    y = ggml_add(ctx_, y, ggml_mul(ctx_, ggml_reshape_2d(ctx_, u, d_inner, n_t), l.ssm_d));  // + D*u
    if ((uint32_t) il == hp_.memory_layer) {
        gmu_memory_ = y;  // tapped after the D skip, before the z gate
        cb(y, "gmu_memory", il);
    }
    y = ggml_swiglu_split(ctx_, z, y);  // y * silu(z)
    cur = ggml_mul_mat(ctx_, l.ssm_out, y);  // {d_inner, n_embd} @ {d_inner, n_t} => {n_embd, n_t}
    cb(cur, "ssm_out", il);
    return cur;
}

} // namespace sambay

// Gated memory unit (docs/architecture.md): out_proj(silu(in_proj(a)) * m), m = the memory layer's SSM
// read-out of the same token (no norm, no bias, no mixing across tokens).
#include "graph.h"
#include "model.h"

namespace sambay {

ggml_tensor * graph_builder::build_gmu(ggml_tensor * cur, int il) {
    const layer_weights & l = model_.layer(il);
    GGML_ASSERT(gmu_memory_ && "GMU layer before the memory layer");
    cur = mm(l.gmu_in, cur);              // {n_embd, d_inner} @ {n_embd, n_rows} => {d_inner, n_rows}
    cur = ggml_swiglu_split(ctx_, cur, gmu_memory_);      // silu(cur) * memory
    cur = mm(l.gmu_out, cur);             // => {n_embd, n_rows}
    cb(cur, "gmu_out", il);
    return cur;
}

} // namespace sambay

// SwiGLU MLP with the fused fc1 (gate rows first): fc2(silu(g) * u) (docs/architecture.md).
#include "graph.h"
#include "model.h"

namespace sambay {

ggml_tensor * graph_builder::build_mlp(ggml_tensor * cur, const layer_weights & l, int il) {
    cur = mm(l.ffn_up, cur);  // {n_embd, 2*n_ff} @ {n_embd, n_rows} => {2*n_ff, n_rows}
    cb(cur, "ffn_up", il);
    cur = ggml_swiglu(ctx_, cur);             // silu(first half) * second half => {n_ff, n_rows}
    cur = mm(l.ffn_down, cur);
    cb(cur, "ffn_out", il);
    return cur;
}

} // namespace sambay

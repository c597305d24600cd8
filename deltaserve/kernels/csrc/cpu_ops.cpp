// Float32 CPU kernels for few-token steps (issue 9), bound into one module: few-row matmul (matmul.h), the
// MoE block (moe.h), the GDN decode step (gdn.h), the attention decode step (attention.h), norms (norm.h),
// and a layer's whole mixer block for one or two sequences built from them (blocks.h).
//
// Why: at decode sizes a step is bound by streaming weights and recurrent states from memory, and the
// torch route pays ~25 small ops per GDN layer and a Python loop over experts. Here each weight row and
// each state matrix is read once, by one contiguous stream per thread.
//
// Batch invariance: every (weight row, token) dot product and every (sequence, head) state update runs
// the same instructions in the same order whatever else is in the call, so a sequence's result never
// depends on the others. Shapes: R = rows (tokens), K = inputs, N = outputs, E = experts, I = expert
// width, B = sequences, S = pool slots, C = conv channels, W = conv width, H/Hk = V/QK heads.
#include "attention.h"
#include "blocks.h"
#include "gdn.h"
#include "matmul.h"
#include "moe.h"
#include "norm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &small_linear);
  m.def("moe_block", &moe_block);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("gdn_decode", &gdn_decode);
  m.def("attention_decode", &attention_decode);
  m.def("gdn_block", &gdn_block);
  m.def("attention_block", &attention_block);
}

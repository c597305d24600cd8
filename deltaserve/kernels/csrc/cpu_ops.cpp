// CPU kernels bound into one module: weights packed from the file's own formats (packed.h) and the products on
// them for any number of rows (qlinear.h), the MoE block (moe.h), the GDN decode step (gdn.h), the attention
// decode step (attention.h), norms (norm.h), a layer's whole mixer block for decode steps (blocks.h), and the
// sampler's passes over logits rows (sample.h).
//
// Why: at decode sizes a step is bound by streaming weights and recurrent states from memory, and the torch
// route pays ~25 small ops per GDN layer and a Python loop over experts. Here each weight row and each state
// matrix is read once, by one contiguous stream per thread; quantized weights stay quantized.
//
// Batch invariance: every (weight row, token) dot product and every (sequence, head) state update runs
// the same instructions in the same order whatever else is in the call, so a sequence's result never
// depends on the others. Shapes: R/T = rows (tokens), K = inputs, N = outputs, E = experts, I = expert
// width, B = sequences, S = pool slots, C = conv channels, W = conv width, H/Hk = V/QK heads.
#include "attention.h"
#include "blocks.h"
#include "gdn.h"
#include "moe.h"
#include "norm.h"
#include "packed.h"
#include "qlinear.h"
#include "sample.h"

// The ISA the kernels were compiled for (what cpu_native.py chose from the CPU's flags).
static std::string isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "avx512-vnni";
#elif defined(__AVX512BW__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

// Denormal floats flushed to zero (FTZ) and read as zero (DAZ) on the calling thread and every thread of the OpenMP
// pool torch and these kernels share: the delta rule's decay products e^(G_i - G_j) underflow into denormals, and
// x86 computes on those ~100x slower (the chunked prefill's batched matmuls ran 5x slower here). Returns whether
// it could (x86 only).
static bool flush_denormals() {
#if defined(__x86_64__)
  _mm_setcsr(_mm_getcsr() | 0x8040);
#pragma omp parallel
  _mm_setcsr(_mm_getcsr() | 0x8040);
  return true;
#else
  return false;
#endif
}

static PackedWeight make_weight(int64_t n, int64_t k, std::vector<Segment> segments, c10::optional<torch::Tensor> col_perm) {
  TORCH_CHECK(!segments.empty(), "a packed weight needs at least one segment");
  const int64_t experts = segments[0].data.size(0);
  int64_t row = 0;
  for (const auto& s : segments) {
    TORCH_CHECK(s.row0 == row, "segments must cover rows in order without gaps (row ", row, " expected, got ", s.row0, ")");
    TORCH_CHECK(s.data.size(0) == experts, "segments disagree on the number of experts");
    TORCH_CHECK(s.group_bytes == k / fmt_info(s.fmt).block * fmt_info(s.fmt).packed_bytes,
                "segment of format ", s.fmt, " does not hold rows of ", k, " columns");
    row += s.rows;
  }
  TORCH_CHECK(row == n, "segments hold ", row, " rows, the weight has ", n);
  if (col_perm) {
    TORCH_CHECK(col_perm->scalar_type() == at::kLong && col_perm->numel() == k, "col_perm must be int64 [", k, "]");
    col_perm = col_perm->contiguous();
  }
  return {n, k, experts, std::move(segments), col_perm};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Segment>(m, "Segment", py::module_local())  // local: builds for two ISAs may share a process
      .def_readonly("fmt", &Segment::fmt)
      .def_readonly("row0", &Segment::row0)
      .def_readonly("rows", &Segment::rows)
      .def_readonly("data", &Segment::data);
  py::class_<PackedWeight>(m, "PackedWeight", py::module_local())
      .def(py::init(&make_weight))
      .def_readonly("n", &PackedWeight::n)
      .def_readonly("k", &PackedWeight::k)
      .def_readonly("experts", &PackedWeight::experts)
      .def_readonly("segments", &PackedWeight::segments)
      .def_readonly("col_perm", &PackedWeight::col_perm)
      .def_property_readonly("nbytes", &PackedWeight::nbytes)
      .def("rows", &unpack_rows);
  m.def("isa", &isa);
  m.def("flush_denormals", &flush_denormals);
  m.def("pack_segment", &pack_segment);
  m.def("linear", &packed_linear);
  m.def("moe_block", &moe_block);
  m.def("add_rms_norm", &add_rms_norm);
  m.def("gdn_decode", &gdn_decode);
  m.def("attention_decode", &attention_decode);
  m.def("gdn_block", &gdn_block);
  m.def("attention_block", &attention_block);
  m.def("sample_argmax", &sample_argmax);
  m.def("sample_top", &sample_top);
  m.def("sample_mass", &sample_mass);
  m.def("sample_invert", &sample_invert);
}

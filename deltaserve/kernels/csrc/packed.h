// Weight matrices in the layout the CPU kernels read (block_formats.h), repacked once at load from the file's own
// format: a weight is one or more segments of consecutive rows, each in one format (a fused projection can join
// tensors a file stores in different formats), optionally a stack of experts, and optionally a column permutation.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include "block_formats.h"
#include "simd.h"
#include "tiles.h"

struct Segment {
  int64_t fmt, row0, rows, groups, group_bytes;  // rows [row0, row0 + rows) of the weight, padded to groups of 16
  at::Tensor data;                              // uint8 [experts, groups * group_bytes]
};

struct PackedWeight {
  int64_t n, k, experts;
  std::vector<Segment> segments;
  c10::optional<at::Tensor> col_perm;  // int64 [k]: column j of the model's matrix is column col_perm[j] here
  int64_t groups() const {
    int64_t g = 0;
    for (const auto& s : segments) g += s.groups;
    return g;
  }
  int64_t nbytes() const {
    int64_t b = 0;
    for (const auto& s : segments) b += s.data.numel();
    return b;
  }
  bool needs(bool integer) const {
    for (const auto& s : segments)
      if (fmt_info(s.fmt).integer == integer) return true;
    return false;
  }
};

// A segment from the file's rows: raw uint8 [experts, rows, row bytes] in format fmt (float formats: their bytes).
static Segment pack_segment(int64_t fmt, int64_t row0, torch::Tensor raw) {
  TORCH_CHECK(raw.dim() == 3 && raw.scalar_type() == at::kByte && raw.is_contiguous(),
              "pack: raw rows must be contiguous uint8 [experts, rows, row bytes]");
  const FmtInfo f = fmt_info(fmt);
  const int64_t E = raw.size(0), rows = raw.size(1), row_bytes = raw.size(2);
  TORCH_CHECK(row_bytes % f.raw_bytes == 0, "pack: row of ", row_bytes, " bytes is not whole blocks of format ", fmt);
  const int64_t blocks = row_bytes / f.raw_bytes, groups = (rows + GROUP - 1) / GROUP;
  const int64_t gbytes = blocks * f.packed_bytes;
  auto data = torch::zeros({E, groups * gbytes}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = data.data_ptr<uint8_t>();
  at::parallel_for(0, E * groups, 1, [&](int64_t i0, int64_t i1) {
    RawBlock o;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t e = i / groups, g = i % groups;
      uint8_t* out = dst + e * groups * gbytes + g * gbytes;
      for (int r = 0; r < GROUP && g * GROUP + r < rows; ++r) {
        const uint8_t* row = src + (e * rows + g * GROUP + r) * row_bytes;
        if (!f.integer) {  // [K][16] elements of raw_bytes each
          for (int64_t k = 0; k < blocks; ++k)
            std::memcpy(out + k * f.packed_bytes + r * f.raw_bytes, row + k * f.raw_bytes, f.raw_bytes);
          continue;
        }
        for (int64_t b = 0; b < blocks; ++b) {
          decode_raw(fmt, row + b * f.raw_bytes, o);
          encode_lane(fmt, o, r, out + b * f.packed_bytes);
        }
      }
    }
  });
  return {fmt, row0, rows, groups, gbytes, data};
}

// Rows `ids` of expert e as float32 [len(ids), k] in the model's column order (embedding look-ups, tests).
static torch::Tensor unpack_rows(const PackedWeight& w, int64_t e, torch::Tensor ids) {
  TORCH_CHECK(e >= 0 && e < w.experts, "expert ", e, " out of range");
  auto idx = ids.to(at::kLong).contiguous();
  const int64_t n = idx.numel(), K = w.k;
  auto out = torch::empty({n, K}, torch::kFloat32);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(ip[i] >= 0 && ip[i] < w.n, "row ", ip[i], " out of range [0, ", w.n, ")");
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(K);
    for (int64_t i = i0; i < i1; ++i) {
      const Segment* s = nullptr;
      for (const auto& seg : w.segments)
        if (ip[i] >= seg.row0 && ip[i] < seg.row0 + seg.rows) s = &seg;
      const FmtInfo f = fmt_info(s->fmt);
      const int64_t local = ip[i] - s->row0, r = local % GROUP;
      const uint8_t* g = s->data.data_ptr<uint8_t>() + e * s->groups * s->group_bytes + local / GROUP * s->group_bytes;
      for (int64_t b = 0; b < K / f.block; ++b) {
        const uint8_t* gb = g + b * f.packed_bytes;
        if (s->fmt == F32) std::memcpy(&row[b], gb + 4 * r, 4);
        else if (s->fmt == F16) row[b] = half_to_float(u16_at(gb + 2 * r));
        else if (s->fmt == BF16) { const uint32_t u = (uint32_t)u16_at(gb + 2 * r) << 16; std::memcpy(&row[b], &u, 4); }
        else decode_lane(s->fmt, gb, (int)r, &row[b * f.block]);
      }
      float* o = out.data_ptr<float>() + i * K;
      if (w.col_perm) {
        const int64_t* perm = w.col_perm->data_ptr<int64_t>();
        for (int64_t j = 0; j < K; ++j) o[j] = row[perm[j]];
      } else {
        std::memcpy(o, row.data(), K * sizeof(float));
      }
    }
  });
  return out;
}

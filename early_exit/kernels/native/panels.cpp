// Products of a few rows with a weight matrix stored in column panels: `x @ weight.T` for 1-8 rows at close to the
// cost of streaming the weight once, whatever the number of rows (see early_exit/kernels/panels.py).
//
// The weight (out x in) is stored as panels of kPanel output columns, each panel in-major: panel p holds
// weight[p * kPanel + j, k] at [p][k][j]. A panel is read once, front to back, for up to 16 rows, eight of which
// accumulate their kPanel outputs in registers at a time; every output is the sum over k in order, so a row's result
// does not depend on how many rows share the call.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
// Two vectors of outputs per row (32 columns with AVX-512): eight rows then hold 16 accumulators, which with the
// panel's two vectors fit the 32 registers of AVX-512; AVX2's 16 registers take four rows.
constexpr int kVectors = 2;
constexpr int kPanel = kLanes * kVectors;
// Rows that accumulate in registers together, in one sweep of the panel as it streams from memory.
constexpr int kRowsInRegisters = kLanes == 16 ? 8 : 4;
// Rows that share one read of a panel from memory: groups take turns on a block of kBlock inputs (8 KB of the panel,
// which stays in the L1 cache).
constexpr int kRowsPerRead = 16;
constexpr int64_t kBlock = 64;

typedef float Vector __attribute__((vector_size(kLanes * sizeof(float))));

// Adds inputs [begin, end) of `Rows` rows to their sums, reading the panel's rows for those inputs.
template <int Rows>
static void accumulate(const float* x, int64_t in_features, const float* panel, int64_t begin, int64_t end,
                       Vector (*sums)[kVectors]) {
  Vector acc[Rows][kVectors];
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < kVectors; ++v) acc[r][v] = sums[r][v];
  for (int64_t k = begin; k < end; ++k) {
    const Vector* weights = reinterpret_cast<const Vector*>(panel + k * kPanel);
    Vector w[kVectors];
#pragma GCC unroll 4
    for (int v = 0; v < kVectors; ++v) {
      w[v] = weights[v];
#if defined(__AVX__)  // a vector fits one register
      // Keeps the weights in registers: otherwise the compiler reads them again as an operand of each row's product.
      asm("" : "+v"(w[v]));
#endif
    }
#pragma GCC unroll 8
    for (int r = 0; r < Rows; ++r) {
      const float value = x[r * in_features + k];
#pragma GCC unroll 4
      for (int v = 0; v < kVectors; ++v) acc[r][v] += w[v] * value;
    }
  }
  for (int r = 0; r < Rows; ++r)
    for (int v = 0; v < kVectors; ++v) sums[r][v] = acc[r][v];
}

// `accumulate` with Rows = `rows` (1 to MaxRows), each count compiled with its sums in registers.
template <int MaxRows>
static void accumulate_group(int64_t rows, const float* x, int64_t in_features, const float* panel, int64_t begin,
                             int64_t end, Vector (*sums)[kVectors]) {
  if constexpr (MaxRows > 1) {
    if (rows < MaxRows) return accumulate_group<MaxRows - 1>(rows, x, in_features, panel, begin, end, sums);
  }
  accumulate<MaxRows>(x, in_features, panel, begin, end, sums);
}

static void rows_through_panel(const float* x, int64_t rows, int64_t in_features, const float* panel, float* out,
                               int64_t out_features, int64_t columns) {
  Vector sums[kRowsPerRead][kVectors];
  for (int64_t first = 0; first < rows; first += kRowsPerRead) {
    const int64_t count = std::min<int64_t>(rows - first, kRowsPerRead);
    for (int64_t r = 0; r < count; ++r)
      for (int v = 0; v < kVectors; ++v) sums[r][v] = Vector{};
    for (int64_t begin = 0; begin < in_features; begin += kBlock) {
      const int64_t end = std::min(begin + kBlock, in_features);
      for (int64_t group = 0; group < count; group += kRowsInRegisters) {
        const float* xs = x + (first + group) * in_features;
        accumulate_group<kRowsInRegisters>(std::min<int64_t>(count - group, kRowsInRegisters), xs, in_features,
                                           panel, begin, end, sums + group);
      }
    }
    for (int64_t r = 0; r < count; ++r) {
      const float* row = reinterpret_cast<const float*>(sums[r]);
      std::copy(row, row + columns, out + (first + r) * out_features);
    }
  }
}

// The panels of `weight` (out x in, float32): (panels, in, kPanel), the last panel padded with zero columns.
torch::Tensor pack_panels(const torch::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kFloat && weight.device().is_cpu(),
              "pack_panels takes a 2-D float32 CPU weight, not ", weight.sizes(), " ", weight.scalar_type());
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t panels = (out_features + kPanel - 1) / kPanel;
  auto padded = torch::zeros({panels * kPanel, in_features}, weight.options());
  padded.narrow(0, 0, out_features).copy_(weight);
  return padded.view({panels, kPanel, in_features}).transpose(1, 2).contiguous();
}

// `rows @ weight.T` for `rows` (n x in, float32) and `packed = pack_panels(weight)`: (n, out_features).
torch::Tensor panel_linear(const torch::Tensor& rows, const torch::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(rows.dim() == 2 && rows.scalar_type() == torch::kFloat && rows.device().is_cpu(),
              "panel_linear takes 2-D float32 CPU rows, not ", rows.sizes(), " ", rows.scalar_type());
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.size(1) == rows.size(1) &&
                  packed.size(0) * kPanel >= out_features && packed.is_contiguous(),
              "panel_linear: packed weight ", packed.sizes(), " is not pack_panels of a weight with ", out_features,
              " x ", rows.size(1), " elements");
  const auto x = rows.contiguous();
  const int64_t n = x.size(0), in_features = x.size(1);
  auto out = torch::empty({n, out_features}, x.options());
  const float* x_data = x.data_ptr<float>();
  const float* panels = packed.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, packed.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t columns = std::min<int64_t>(kPanel, out_features - p * kPanel);
      if (columns > 0)
        rows_through_panel(x_data, n, in_features, panels + p * in_features * kPanel, out_data + p * kPanel,
                           out_features, columns);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("pack_panels", &pack_panels, "The panels of a float32 weight (out x in): (panels, in, panel width).");
  module.def("panel_linear", &panel_linear, "rows @ weight.T from the weight's panels.");
}

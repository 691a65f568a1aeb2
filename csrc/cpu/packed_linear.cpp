// Float32 linear layers on the CPU against a weight packed once. Made for the decode step's products (B rows
// against the lm_head's [V, H] weight, 63 times per rollout with the same weight), which a BLAS runs far from its
// peak: measured on the 2-core AVX2 machine at [16, 256] x [32000, 256]^T, torch's F.linear 8.8-10 ms and the
// transposed MKL product 5.8-6.2 ms; this kernel 2.6-2.9 ms (~100 GFLOP/s of the machine's ~140). With hundreds of
// rows (a training forward's response positions) it still beats MKL: 512 x 256 x 32000 59 vs 80 ms.
//
// Layout (pack_linear_weight): weight [N, K] -> packed [P = ceil(N / 16), K, 16], panel p holding output features
// 16p .. 16p + 15 k-major (the last panel zero-padded). packed_linear gives each thread whole panels; a panel
// (K x 16 floats: 16 KiB at K = 256) is streamed from memory once per row block, by its first row tile, which also
// prefetches the next panel, and re-read from L1 by the panel's other row tiles. A row tile holds up to 6 rows x 16
// outputs in twelve AVX2 accumulators (6 x 2 vectors of 8), fed per k by two loads of the panel and one broadcast
// per row. Rows are split into balanced tiles (16 rows: 6 + 5 + 5), in blocks of up to 256 KiB of input. Every
// output is one sum over k in order 0 .. K-1 (one FMA per term on AVX2), computed by one thread, so results do not
// depend on the thread count or on the other rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>

#include "../checks/checks.h"
#include "../kernels.h"
#include "isa.h"
#include "packed_linear.h"

#ifdef RLHF_EXT_X86_ISAS
#include <immintrin.h>
#endif

namespace rlhf_ext {

namespace {

constexpr int64_t kPanel = kPackedPanel;
constexpr int kMaxTileRows = 6;
// Flops per parallel task, ~30 us on one core: one decode step's products for a small layer (a [16, 256] x
// [256, 512] MLP projection is 4 MFLOP) run on the calling thread or split in two, never in one-panel tasks.
constexpr int64_t kFlopsPerTask = int64_t(1) << 21;
// Floats per packing task.
constexpr int64_t kPackPerTask = int64_t(1) << 16;
// Input floats per row block (256 KiB): every panel multiplies a block of rows that stays in L2; a training
// forward's 512-4096 rows run as several blocks, each streaming the packed weight once more.
constexpr int64_t kRowBlockFloats = int64_t(1) << 16;

// One row tile: c[i, j] = bias[j] + sum_k a[i, k] * w[k, j] for i < R rows, j < ncols (<= 16) outputs. a: rows of
// stride lda; w: one panel [K, 16]; next: the next panel to prefetch (or nullptr); c: rows of stride ldc.
using TileFn = void (*)(const float* a, int64_t lda, const float* w, const float* next, int64_t K, const float* bias,
                        float* c, int64_t ldc, int64_t ncols);

template <int R>
void tile_baseline(const float* a, int64_t lda, const float* w, const float* /*next*/, int64_t K, const float* bias,
                   float* c, int64_t ldc, int64_t ncols) {
  float acc[R][kPanel] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * kPanel;
    for (int i = 0; i < R; ++i) {
      const float x = a[i * lda + k];
      for (int64_t j = 0; j < kPanel; ++j) acc[i][j] += x * wk[j];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < ncols; ++j) c[i * ldc + j] = acc[i][j] + (bias ? bias[j] : 0.f);
}

#ifdef RLHF_EXT_X86_ISAS
// The accumulators are named registers, not an array: g++ keeps an array of __m256 in memory and stores it at
// every k (measured: 2.5x slower).
template <int R>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* a, int64_t lda, const float* w, const float* next,
                                                    int64_t K, const float* bias, float* c, int64_t ldc,
                                                    int64_t ncols) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero;
  __m256 c30 = zero, c31 = zero, c40 = zero, c41 = zero, c50 = zero, c51 = zero;
  // Row i's input (rows past R alias the last row: their pointers exist but are never read).
  const float* a0 = a;
  const float* a1 = a + std::min(R - 1, 1) * lda;
  const float* a2 = a + std::min(R - 1, 2) * lda;
  const float* a3 = a + std::min(R - 1, 3) * lda;
  const float* a4 = a + std::min(R - 1, 4) * lda;
  const float* a5 = a + std::min(R - 1, 5) * lda;
// Row i of the tile at this k: one broadcast of its input, two FMAs into its two accumulators.
#define RLHF_EXT_PACKED_ROW(i)                     \
  if constexpr (R > i) {                           \
    const __m256 x = _mm256_broadcast_ss(a##i + k); \
    c##i##0 = _mm256_fmadd_ps(x, w0, c##i##0);     \
    c##i##1 = _mm256_fmadd_ps(x, w1, c##i##1);     \
  }
  for (int64_t k = 0; k < K; ++k) {
    // One 64-byte line of the next panel per k: the whole panel (K lines) arrives while this one is computed.
    if (next) _mm_prefetch(reinterpret_cast<const char*>(next + k * kPanel), _MM_HINT_T0);
    const __m256 w0 = _mm256_loadu_ps(w + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(w + k * kPanel + 8);
    RLHF_EXT_PACKED_ROW(0)
    RLHF_EXT_PACKED_ROW(1)
    RLHF_EXT_PACKED_ROW(2)
    RLHF_EXT_PACKED_ROW(3)
    RLHF_EXT_PACKED_ROW(4)
    RLHF_EXT_PACKED_ROW(5)
  }
#undef RLHF_EXT_PACKED_ROW
  const __m256 acc[2 * kMaxTileRows] = {c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51};
  alignas(32) float row[kPanel];
  for (int i = 0; i < R; ++i) {
    __m256 lo = acc[2 * i], hi = acc[2 * i + 1];
    if (ncols == kPanel) {
      if (bias) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8));
      }
      _mm256_storeu_ps(c + i * ldc, lo);
      _mm256_storeu_ps(c + i * ldc + 8, hi);
    } else {  // the last panel: only ncols outputs exist
      _mm256_store_ps(row, lo);
      _mm256_store_ps(row + 8, hi);
      for (int64_t j = 0; j < ncols; ++j) c[i * ldc + j] = row[j] + (bias ? bias[j] : 0.f);
    }
  }
}
#endif

using TileTable = std::array<TileFn, kMaxTileRows>;  // [R - 1]: the tile of R rows

TileTable tiles_for_this_cpu() {
  const TileTable baseline = {&tile_baseline<1>, &tile_baseline<2>, &tile_baseline<3>,
                              &tile_baseline<4>, &tile_baseline<5>, &tile_baseline<6>};
#ifdef RLHF_EXT_X86_ISAS
  const TileTable avx2 = {&tile_avx2<1>, &tile_avx2<2>, &tile_avx2<3>, &tile_avx2<4>, &tile_avx2<5>, &tile_avx2<6>};
  // AVX-512 machines run the AVX2 tiles: a 16-wide panel is two AVX2 vectors (one AVX-512 vector would hold it, a
  // variant not measured yet).
  return cpu::for_isa(cpu::cpu_isa(), baseline, avx2, avx2);
#else
  return baseline;
#endif
}

}  // namespace

at::Tensor pack_linear_weight_cpu(const at::Tensor& weight) {
  check_pack_linear_weight_inputs(weight);
  const at::Tensor w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), panels = (N + kPanel - 1) / kPanel;
  at::Tensor packed = at::empty({panels, K, kPanel}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, std::max<int64_t>(1, kPackPerTask / (K * kPanel)), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* panel = dst + p * K * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        if (n < N) {
          const float* row = src + n * K;
          for (int64_t k = 0; k < K; ++k) panel[k * kPanel + j] = row[k];
        } else {
          for (int64_t k = 0; k < K; ++k) panel[k * kPanel + j] = 0.f;
        }
      }
    }
  });
  return packed;
}

void packed_matmul(const float* a, int64_t M, int64_t K, const float* w, int64_t N, const float* bias, float* c) {
  if (M == 0) return;
  static const TileTable tiles = tiles_for_this_cpu();
  const int64_t panels = (N + kPanel - 1) / kPanel;
  const int64_t block_rows = std::max<int64_t>(kMaxTileRows, kRowBlockFloats / K);
  const int64_t grain = std::max<int64_t>(1, kFlopsPerTask / std::max<int64_t>(1, 2 * M * K * kPanel));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = 0; block < M; block += block_rows) {
      const int64_t block_end = std::min(M, block + block_rows);
      const int64_t tiles_per_panel = (block_end - block + kMaxTileRows - 1) / kMaxTileRows;
      for (int64_t p = begin; p < end; ++p) {
        const float* panel = w + p * K * kPanel;
        const float* next = p + 1 < end ? panel + K * kPanel : nullptr;
        const int64_t ncols = std::min(kPanel, N - p * kPanel);
        const float* panel_bias = bias ? bias + p * kPanel : nullptr;
        int64_t row = block;
        for (int64_t t = 0; t < tiles_per_panel; ++t) {
          const int64_t left = tiles_per_panel - t;
          const int64_t rows = (block_end - row + left - 1) / left;  // balanced: 16 rows as 6 + 5 + 5
          tiles[rows - 1](a + row * K, K, panel, t == 0 ? next : nullptr, K, panel_bias, c + row * N + p * kPanel, N,
                          ncols);
          row += rows;
        }
      }
    }
  });
}

at::Tensor packed_linear_cpu(const at::Tensor& input, const at::Tensor& packed, int64_t out_features,
                             const c10::optional<at::Tensor>& bias) {
  check_packed_linear_inputs(input, packed, out_features, bias);
  const at::Tensor x = input.contiguous(), wp = packed.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  packed_matmul(x.data_ptr<float>(), x.size(0), x.size(1), wp.data_ptr<float>(), out_features,
                b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>());
  return out;
}

}  // namespace rlhf_ext

// agejax's native kernels for XLA:CPU (float32, NHWC x HWIO), as XLA FFI handlers.
//
// Why: jaxlib's XLA:CPU convolves through Eigen's im2col + contraction, which on
// 16-64-channel maps runs 2-5x slower than PyTorch's oneDNN direct convolution
// (docs/RESULTS.md). These are direct convolutions in the same style: a register tile
// of output pixels x vectors of output channels accumulates over the taps and input
// channels, one broadcast input value and a few kernel vectors per step.
//
// Handlers:
//   agejax_conv3x3_forward(x, w) -> y            3x3 stride-1 SAME: y = conv(x, w)
//   agejax_conv3x3_kernel_grad(x, g) -> dw       dw[i,j,c,o] = sum x[n,h+i-1,w+j-1,c] g[n,h,w,o]
//   agejax_strided_forward(x, w; stride, pad)    KxK, any stride and padding, few input channels
//   agejax_strided_kernel_grad(x, g; stride, pad)   (a stem: ResNet's 7x7/2 over RGB)
//   agejax_flip_swap(w) -> wt                    wt[i,j,o,c] = w[KH-1-i,KW-1-j,c,o], any KH x KW
// An input gradient is a convolution of g with flip_swap(w): the 3x3 forward, or XLA's.
//
// Vectors are GCC vector extensions of VL floats: 16 with AVX-512, else 8 (AVX2), so the
// build (-march=native) picks the widest the machine has. Output channels (forward) and
// gradient channels (kernel gradient) must be a multiple of VL; JAX checks before calling.
// Work is split over (image, row-band) units claimed from an atomic counter by the calling
// thread and XLA's intra-op thread pool; a worker that starts after all units are claimed
// does nothing, so no task can outlive the call's data.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int VL = 16;
constexpr int kMaxAcc = 28;  // of 32 vector registers: accumulators, the rest for operands
#else
constexpr int VL = 8;
constexpr int kMaxAcc = 12;  // of 16
#endif

typedef float vec __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float))));

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }

// ---- parallel loop over units on the caller thread plus XLA's intra-op pool ----------

struct Claim {
  std::atomic<int64_t> next{0};
  std::atomic<int> active{0};
  std::atomic<int> ids{1};  // 0 is the caller
};

template <typename Body>
void parallel_units(ffi::ThreadPool& pool, int64_t units, int workers, Body& body) {
  auto claim = std::make_shared<Claim>();
  auto work = [claim, units](int id, Body* b) {
    claim->active.fetch_add(1);
    for (int64_t u; (u = claim->next.fetch_add(1)) < units;) (*b)(id, u);
    claim->active.fetch_sub(1);
  };
  for (int t = 1; t < workers; ++t) {
    pool.Schedule([claim, units, work, &body]() {
      // Late tasks find every unit claimed and never touch `body`.
      if (claim->next.load() >= units) return;
      int id = claim->ids.fetch_add(1);
      work(id, &body);
    });
  }
  work(0, &body);
  while (claim->active.load() != 0) std::this_thread::yield();
}

int worker_count(ffi::ThreadPool& pool, int64_t units) {
  int64_t t = pool.num_threads();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(t, units)));
}

// Rows per unit: a band whose padded input fits about 256 KiB (L2-resident across the
// taps), and at least ~4 units per worker so the two cores stay busy on small batches.
int64_t band_rows(int64_t n, int64_t h, int64_t w, int64_t channels, int64_t threads) {
  int64_t row_bytes = (w + 2) * channels * 4;
  int64_t rows = std::max<int64_t>(1, (256 << 10) / row_bytes);
  int64_t want_units = 4 * std::max<int64_t>(threads, 1);
  if (n * ((h + rows - 1) / rows) < want_units) {
    int64_t bands = (want_units + n - 1) / n;
    rows = std::min(rows, std::max<int64_t>(1, h / bands));
  }
  return std::min(rows, h);
}

// Copies input rows [r0, r1) of one image into `slab` with a zero border of `pad` columns on
// each side, and zero rows where r0 < 0 or r1 > h: slab is (r1 - r0) x (w + 2 pad) x c.
void fill_slab(const float* img, int64_t h, int64_t w, int64_t c, int64_t r0, int64_t r1, int64_t pad,
               float* slab) {
  const int64_t prow = (w + 2 * pad) * c;
  for (int64_t r = r0; r < r1; ++r) {
    float* dst = slab + (r - r0) * prow;
    if (r < 0 || r >= h) {
      std::memset(dst, 0, prow * sizeof(float));
      continue;
    }
    std::memset(dst, 0, pad * c * sizeof(float));
    std::memcpy(dst + pad * c, img + r * w * c, w * c * sizeof(float));
    std::memset(dst + (w + pad) * c, 0, pad * c * sizeof(float));
  }
}

// ---- forward --------------------------------------------------------------------------

// WT output pixels x OT*VL output channels; xs points at the slab's top-left input of the tile.
// CC is the input channel count when known at compile time (0: use c), so the WT input
// offsets become immediates and each step is one kernel load and WT broadcast-FMAs.
template <int WT, int OT, int CC>
inline void forward_tile(const float* xs, int64_t prow, int64_t c_, const float* wk, int64_t o,
                         float* y) {
  const int64_t c = CC ? CC : c_;
  vec acc[WT][OT];
  _Pragma("GCC unroll 32")
  for (int p = 0; p < WT; ++p)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) acc[p][j] = vec{};
  for (int i = 0; i < 3; ++i) {
    for (int k = 0; k < 3; ++k) {
      const float* xr = xs + i * prow + k * c;
      const float* wr = wk + (i * 3 + k) * c * o;
      for (int64_t ci = 0; ci < c; ++ci) {
        vec wv[OT];
        _Pragma("GCC unroll 32")
        for (int j = 0; j < OT; ++j) wv[j] = load(wr + ci * o + j * VL);
        _Pragma("GCC unroll 32")
        for (int p = 0; p < WT; ++p) {
          const float b = xr[p * c + ci];
          _Pragma("GCC unroll 32")
          for (int j = 0; j < OT; ++j) acc[p][j] += b * wv[j];
        }
      }
    }
  }
  _Pragma("GCC unroll 32")
  for (int p = 0; p < WT; ++p)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) store(y + p * o + j * VL, acc[p][j]);
}

template <int OT, int CC, int WT>
inline void forward_row_tail(int64_t rem, const float* xs, int64_t prow, int64_t c, const float* wk,
                             int64_t o, float* y) {
  if constexpr (WT > 0) {
    if (rem == WT) return forward_tile<WT, OT, CC>(xs, prow, c, wk, o, y);
    forward_row_tail<OT, CC, WT - 1>(rem, xs, prow, c, wk, o, y);
  }
}

template <int OT, int CC>
void forward_band(const float* slab, int64_t prow, int64_t rows, int64_t w, int64_t c,
                  const float* wk, int64_t o, float* y) {
  constexpr int WT = kMaxAcc / OT;
  // O-blocks outermost: one block's kernel (9 x C x OT*VL floats, <= 295 KB up to 128 input
  // channels) stays in L2 across the band. Wider layers stay on XLA (conv3x3.py).
  for (int64_t ob = 0; ob < o; ob += OT * VL)
    for (int64_t r = 0; r < rows; ++r) {
      const float* xs = slab + r * prow;
      float* yr = y + r * w * o + ob;
      // Tiles of near-equal width: 64 columns as 22+21+21 rather than 28+28+8.
      const int64_t tiles = (w + WT - 1) / WT, base = w / tiles, wider = w % tiles;
      for (int64_t t = 0, x0 = 0; t < tiles; ++t) {
        const int64_t width = base + (t < wider);
        forward_row_tail<OT, CC, WT>(width, xs + x0 * c, prow, c, wk + ob, o, yr + x0 * o);
        x0 += width;
      }
    }
}

template <int OT>
void forward_band_c(const float* slab, int64_t prow, int64_t rows, int64_t w, int64_t c,
                    const float* wk, int64_t o, float* y) {
  switch (c) {
    case 16: return forward_band<OT, 16>(slab, prow, rows, w, c, wk, o, y);
    case 32: return forward_band<OT, 32>(slab, prow, rows, w, c, wk, o, y);
    case 64: return forward_band<OT, 64>(slab, prow, rows, w, c, wk, o, y);
    case 128: return forward_band<OT, 128>(slab, prow, rows, w, c, wk, o, y);
    case 256: return forward_band<OT, 256>(slab, prow, rows, w, c, wk, o, y);
    case 512: return forward_band<OT, 512>(slab, prow, rows, w, c, wk, o, y);
    default: return forward_band<OT, 0>(slab, prow, rows, w, c, wk, o, y);
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wk,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = wk.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != 3 || wd[1] != 3 || wd[2] != xd[3])
    return ffi::Error::InvalidArgument("agejax_conv3x3_forward: want x NHWC and w (3, 3, C, O)");
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], o = wd[3];
  if (o % VL != 0) return ffi::Error::InvalidArgument("agejax_conv3x3_forward: O must be a multiple of the vector width");
  const int64_t threads = pool.num_threads();
  const int64_t rows = band_rows(n, h, w, c, threads);
  const int64_t bands = (h + rows - 1) / rows;
  const int64_t units = n * bands;
  const int workers = worker_count(pool, units);
  const int64_t prow = (w + 2) * c;
  std::vector<std::vector<float>> slabs(workers, std::vector<float>((rows + 2) * prow));
  const float* xp = x.typed_data();
  const float* wp = wk.typed_data();
  float* yp = y->typed_data();
  auto body = [&](int id, int64_t u) {
    const int64_t img = u / bands, r0 = (u % bands) * rows, r1 = std::min(h, r0 + rows);
    float* slab = slabs[id].data();
    fill_slab(xp + img * h * w * c, h, w, c, r0 - 1, r1 + 1, 1, slab);
    float* out = yp + (img * h + r0) * w * o;
    if (o % (4 * VL) == 0 && VL == 16) forward_band_c<4>(slab, prow, r1 - r0, w, c, wp, o, out);
    else if (o % (2 * VL) == 0) forward_band_c<2>(slab, prow, r1 - r0, w, c, wp, o, out);
    else forward_band_c<1>(slab, prow, r1 - r0, w, c, wp, o, out);
  };
  parallel_units(pool, units, workers, body);
  return ffi::Error::Success();
}

// ---- kernel gradient --------------------------------------------------------------------

// Accumulates dw[tap, c0:c0+CT, o0:o0+OT*VL] over `images` slabs (islab floats apart) of `rows`
// rows each: CT input channels x OT vectors of gradient channels in registers.
template <int CT, int OT>
void kernel_grad_tile(const float* slab, int64_t islab, int64_t images, int64_t prow, int64_t rows,
                      int64_t w, int64_t c, int i, int k, int64_t c0, const float* g, int64_t ig,
                      int64_t o, int64_t o0, float* dw) {
  vec acc[CT][OT];
  _Pragma("GCC unroll 32")
  for (int a = 0; a < CT; ++a)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) acc[a][j] = vec{};
  for (int64_t m = 0; m < images; ++m) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = slab + m * islab + (r + i) * prow + k * c + c0;
      const float* gr = g + m * ig + r * w * o + o0;
      for (int64_t x = 0; x < w; ++x) {
        vec gv[OT];
        _Pragma("GCC unroll 32")
        for (int j = 0; j < OT; ++j) gv[j] = load(gr + x * o + j * VL);
        const float* xv = xr + x * c;
        _Pragma("GCC unroll 32")
        for (int a = 0; a < CT; ++a) {
          const float b = xv[a];
          _Pragma("GCC unroll 32")
          for (int j = 0; j < OT; ++j) acc[a][j] += b * gv[j];
        }
      }
    }
  }
  float* d = dw + ((i * 3 + k) * c + c0) * o + o0;
  _Pragma("GCC unroll 32")
  for (int a = 0; a < CT; ++a)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) store(d + a * o + j * VL, load(d + a * o + j * VL) + acc[a][j]);
}

template <int OT>
void kernel_grad_band(const float* slab, int64_t islab, int64_t images, int64_t prow, int64_t rows,
                      int64_t w, int64_t c, const float* g, int64_t ig, int64_t o, float* dw) {
  constexpr int CT = kMaxAcc / OT >= 16 ? 16 : (kMaxAcc / OT >= 8 ? 8 : 4);
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k)
      for (int64_t ob = 0; ob < o; ob += OT * VL) {
        int64_t c0 = 0;
        for (; c0 + CT <= c; c0 += CT)
          kernel_grad_tile<CT, OT>(slab, islab, images, prow, rows, w, c, i, k, c0, g, ig, o, ob, dw);
        for (; c0 < c; ++c0)
          kernel_grad_tile<1, OT>(slab, islab, images, prow, rows, w, c, i, k, c0, g, ig, o, ob, dw);
      }
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                      ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  if (xd.size() != 4 || gd.size() != 4 || xd[0] != gd[0] || xd[1] != gd[1] || xd[2] != gd[2])
    return ffi::Error::InvalidArgument("agejax_conv3x3_kernel_grad: want x and g NHWC of one size");
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], o = gd[3];
  if (o % VL != 0) return ffi::Error::InvalidArgument("agejax_conv3x3_kernel_grad: O must be a multiple of the vector width");
  const int64_t threads = pool.num_threads();
  const int64_t rows = band_rows(n, h, w, std::max(c, o), threads);
  const int64_t bands = (h + rows - 1) / rows;
  const int64_t prow = (w + 2) * c;
  // Small maps: several whole images a unit, so each worker's partial sum (9 C O floats, 2.4 MB
  // at 256 channels) is read and written once per group instead of once per image.
  int64_t group = 1;
  if (bands == 1) {
    const int64_t image_floats = (h + 2) * prow;
    group = std::max<int64_t>(1, std::min<int64_t>((1 << 18) / image_floats,
                                                   n / (4 * std::max<int64_t>(threads, 1))));
  }
  const int64_t units = bands == 1 ? (n + group - 1) / group : n * bands;
  // Deterministic sums: unit ranges are fixed per chunk (one chunk per thread), each chunk sums its
  // units in order into its own partial, and the partials are added in chunk order, whichever
  // thread ran which chunk. Bitwise-reproducible training (checkpoint resume) relies on this.
  const int workers = worker_count(pool, units);
  const int64_t islab = (rows + 2) * prow;
  const int64_t size = 9 * c * o;
  std::vector<std::vector<float>> slabs(workers, std::vector<float>(group * islab));
  std::vector<std::vector<float>> partial(workers, std::vector<float>(size, 0.0f));
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  auto unit = [&](int id, int64_t chunk, int64_t u) {
    const int64_t img = bands == 1 ? u * group : u / bands;
    const int64_t images = bands == 1 ? std::min(group, n - img) : 1;
    const int64_t r0 = bands == 1 ? 0 : (u % bands) * rows, r1 = std::min(h, r0 + rows);
    float* slab = slabs[id].data();
    for (int64_t m = 0; m < images; ++m)
      fill_slab(xp + (img + m) * h * w * c, h, w, c, r0 - 1, r1 + 1, 1, slab + m * islab);
    const float* gb = gp + (img * h + r0) * w * o;
    float* d = partial[chunk].data();
    if (o % (2 * VL) == 0) kernel_grad_band<2>(slab, islab, images, prow, r1 - r0, w, c, gb, h * w * o, o, d);
    else kernel_grad_band<1>(slab, islab, images, prow, r1 - r0, w, c, gb, h * w * o, o, d);
  };
  auto body = [&](int id, int64_t chunk) {
    for (int64_t u = chunk * units / workers; u < (chunk + 1) * units / workers; ++u) unit(id, chunk, u);
  };
  parallel_units(pool, workers, workers, body);
  float* out = dw->typed_data();
  std::memcpy(out, partial[0].data(), size * sizeof(float));
  for (int t = 1; t < workers; ++t)
    for (int64_t e = 0; e < size; ++e) out[e] += partial[t][e];
  return ffi::Error::Success();
}

// ---- strided convolution over few input channels (a stem: ResNet's 7x7/2 over RGB) ----------
//
// x (N, H, W, C), w (K, K, C, O), stride S, padding P: y (N, HO, WO, O). With C this small the
// 3x3 kernels' channel tiles would hold one channel each, so kernel columns and channels are
// taken together: for kernel row i, the K*C values (j, c) an output pixel reads are one
// contiguous run of the padded input row, and w[i] is the matching (K*C, O) matrix. Forward and
// kernel gradient then run as the 3x3 ones do, over A = K*C "virtual channels", with output
// pixels S*C floats apart in the input.

struct Strided {  // the shapes of one call
  int64_t n, h, w, c, o, k, s, p, ho, wo, prow, a;
  Strided(ffi::Span<const int64_t> xd, int64_t k_, int64_t o_, int64_t s_, int64_t p_)
      : n(xd[0]), h(xd[1]), w(xd[2]), c(xd[3]), o(o_), k(k_), s(s_), p(p_),
        ho((xd[1] + 2 * p_ - k_) / s_ + 1), wo((xd[2] + 2 * p_ - k_) / s_ + 1),
        prow((xd[2] + 2 * p_) * xd[3]), a(k_ * xd[3]) {}
  // Input rows (padded) behind output rows [r0, r1).
  int64_t in_rows(int64_t r0, int64_t r1) const { return (r1 - r0 - 1) * s + k; }
  void fill(const float* x, int64_t img, int64_t r0, int64_t r1, float* slab) const {
    fill_slab(x + img * h * w * c, h, w, c, r0 * s - p, (r1 - 1) * s - p + k, p, slab);
  }
};

template <int WT, int OT>
inline void strided_forward_tile(const float* xs, const Strided& d, const float* wk, float* y) {
  vec acc[WT][OT];
  _Pragma("GCC unroll 32")
  for (int q = 0; q < WT; ++q)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) acc[q][j] = vec{};
  const int64_t step = d.s * d.c;
  for (int64_t i = 0; i < d.k; ++i) {
    const float* xr = xs + i * d.prow;
    const float* wr = wk + i * d.a * d.o;
    for (int64_t a = 0; a < d.a; ++a) {
      vec wv[OT];
      _Pragma("GCC unroll 32")
      for (int j = 0; j < OT; ++j) wv[j] = load(wr + a * d.o + j * VL);
      _Pragma("GCC unroll 32")
      for (int q = 0; q < WT; ++q) {
        const float b = xr[q * step + a];
        _Pragma("GCC unroll 32")
        for (int j = 0; j < OT; ++j) acc[q][j] += b * wv[j];
      }
    }
  }
  _Pragma("GCC unroll 32")
  for (int q = 0; q < WT; ++q)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) store(y + q * d.o + j * VL, acc[q][j]);
}

template <int OT, int WT>
inline void strided_forward_tail(int64_t rem, const float* xs, const Strided& d, const float* wk, float* y) {
  if constexpr (WT > 0) {
    if (rem == WT) return strided_forward_tile<WT, OT>(xs, d, wk, y);
    strided_forward_tail<OT, WT - 1>(rem, xs, d, wk, y);
  }
}

template <int OT>
void strided_forward_band(const float* slab, const Strided& d, int64_t rows, const float* wk, float* y) {
  constexpr int WT = kMaxAcc / OT;
  const int64_t tiles = (d.wo + WT - 1) / WT, base = d.wo / tiles, wider = d.wo % tiles;
  for (int64_t ob = 0; ob < d.o; ob += OT * VL)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t t = 0, x0 = 0; t < tiles; ++t) {
        const int64_t width = base + (t < wider);
        strided_forward_tail<OT, WT>(width, slab + r * d.s * d.prow + x0 * d.s * d.c, d, wk + ob,
                                     y + (r * d.wo + x0) * d.o + ob);
        x0 += width;
      }
}

// Accumulates dw[i, a0:a0+CT, o0:o0+OT*VL] over one band's output pixels.
template <int CT, int OT>
void strided_kernel_grad_tile(const float* slab, const Strided& d, int64_t rows, int64_t i, int64_t a0,
                              const float* g, int64_t o0, float* dw) {
  vec acc[CT][OT];
  _Pragma("GCC unroll 32")
  for (int b = 0; b < CT; ++b)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) acc[b][j] = vec{};
  const int64_t step = d.s * d.c;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = slab + (r * d.s + i) * d.prow + a0;
    const float* gr = g + r * d.wo * d.o + o0;
    for (int64_t x = 0; x < d.wo; ++x) {
      vec gv[OT];
      _Pragma("GCC unroll 32")
      for (int j = 0; j < OT; ++j) gv[j] = load(gr + x * d.o + j * VL);
      const float* xv = xr + x * step;
      _Pragma("GCC unroll 32")
      for (int b = 0; b < CT; ++b) {
        const float v = xv[b];
        _Pragma("GCC unroll 32")
        for (int j = 0; j < OT; ++j) acc[b][j] += v * gv[j];
      }
    }
  }
  float* out = dw + (i * d.a + a0) * d.o + o0;
  _Pragma("GCC unroll 32")
  for (int b = 0; b < CT; ++b)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) store(out + b * d.o + j * VL, load(out + b * d.o + j * VL) + acc[b][j]);
}

template <int OT, int CT>
inline void strided_kernel_grad_tail(int64_t rem, const float* slab, const Strided& d, int64_t rows, int64_t i,
                                     int64_t a0, const float* g, int64_t o0, float* dw) {
  if constexpr (CT > 0) {
    if (rem == CT) return strided_kernel_grad_tile<CT, OT>(slab, d, rows, i, a0, g, o0, dw);
    strided_kernel_grad_tail<OT, CT - 1>(rem, slab, d, rows, i, a0, g, o0, dw);
  }
}

template <int OT>
void strided_kernel_grad_band(const float* slab, const Strided& d, int64_t rows, const float* g, float* dw) {
  constexpr int CT = kMaxAcc / OT;
  for (int64_t i = 0; i < d.k; ++i)
    for (int64_t ob = 0; ob < d.o; ob += OT * VL)
      for (int64_t a0 = 0; a0 < d.a; a0 += CT)
        strided_kernel_grad_tail<OT, CT>(std::min<int64_t>(CT, d.a - a0), slab, d, rows, i, a0, g, ob, dw);
}

// The band functions with the widest register tile of output vectors that divides O.
void strided_forward_rows(const float* slab, const Strided& d, int64_t rows, const float* wk, float* y) {
  if (VL == 16 && d.o % (4 * VL) == 0) strided_forward_band<4>(slab, d, rows, wk, y);
  else if (d.o % (2 * VL) == 0) strided_forward_band<2>(slab, d, rows, wk, y);
  else strided_forward_band<1>(slab, d, rows, wk, y);
}

void strided_kernel_grad_rows(const float* slab, const Strided& d, int64_t rows, const float* g, float* dw) {
  if (VL == 16 && d.o % (4 * VL) == 0) strided_kernel_grad_band<4>(slab, d, rows, g, dw);
  else if (d.o % (2 * VL) == 0) strided_kernel_grad_band<2>(slab, d, rows, g, dw);
  else strided_kernel_grad_band<1>(slab, d, rows, g, dw);
}

ffi::Error StridedForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> wk,
                          ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t pad) {
  auto xd = x.dimensions();
  auto wd = wk.dimensions();
  if (xd.size() != 4 || wd.size() != 4 || wd[0] != wd[1] || wd[2] != xd[3] || stride < 1 || pad < 0)
    return ffi::Error::InvalidArgument("agejax_strided_forward: want x NHWC and w (K, K, C, O)");
  if (wd[3] % VL != 0) return ffi::Error::InvalidArgument("agejax_strided_forward: O must be a multiple of the vector width");
  const Strided d(xd, wd[0], wd[3], stride, pad);
  const int64_t rows = band_rows(d.n, d.ho, d.wo, d.o, pool.num_threads());
  const int64_t bands = (d.ho + rows - 1) / rows, units = d.n * bands;
  const int workers = worker_count(pool, units);
  std::vector<std::vector<float>> slabs(workers, std::vector<float>(d.in_rows(0, rows) * d.prow));
  const float* xp = x.typed_data();
  auto body = [&](int id, int64_t u) {
    const int64_t img = u / bands, r0 = (u % bands) * rows, r1 = std::min(d.ho, r0 + rows);
    d.fill(xp, img, r0, r1, slabs[id].data());
    strided_forward_rows(slabs[id].data(), d, r1 - r0, wk.typed_data(),
                         y->typed_data() + (img * d.ho + r0) * d.wo * d.o);
  };
  parallel_units(pool, units, workers, body);
  return ffi::Error::Success();
}

ffi::Error StridedKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                             ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad) {
  auto xd = x.dimensions();
  auto gd = g.dimensions();
  auto wd = dw->dimensions();
  if (xd.size() != 4 || gd.size() != 4 || wd.size() != 4 || wd[0] != wd[1] || wd[2] != xd[3] || wd[3] != gd[3]
      || stride < 1 || pad < 0)
    return ffi::Error::InvalidArgument("agejax_strided_kernel_grad: want x, g NHWC and dw (K, K, C, O)");
  const Strided d(xd, wd[0], wd[3], stride, pad);
  if (gd[0] != d.n || gd[1] != d.ho || gd[2] != d.wo)
    return ffi::Error::InvalidArgument("agejax_strided_kernel_grad: g is not the output's shape");
  if (d.o % VL != 0) return ffi::Error::InvalidArgument("agejax_strided_kernel_grad: O must be a multiple of the vector width");
  const int64_t rows = band_rows(d.n, d.ho, d.wo, d.o, pool.num_threads());
  const int64_t bands = (d.ho + rows - 1) / rows, units = d.n * bands;
  // Deterministic sums, as in KernelGrad: fixed unit ranges per chunk, partials added in chunk order.
  const int workers = worker_count(pool, units);
  const int64_t size = d.k * d.a * d.o;
  std::vector<std::vector<float>> slabs(workers, std::vector<float>(d.in_rows(0, rows) * d.prow));
  std::vector<std::vector<float>> partial(workers, std::vector<float>(size, 0.0f));
  const float* xp = x.typed_data();
  auto body = [&](int id, int64_t chunk) {
    for (int64_t u = chunk * units / workers; u < (chunk + 1) * units / workers; ++u) {
      const int64_t img = u / bands, r0 = (u % bands) * rows, r1 = std::min(d.ho, r0 + rows);
      d.fill(xp, img, r0, r1, slabs[id].data());
      strided_kernel_grad_rows(slabs[id].data(), d, r1 - r0,
                               g.typed_data() + (img * d.ho + r0) * d.wo * d.o, partial[chunk].data());
    }
  };
  parallel_units(pool, workers, workers, body);
  float* out = dw->typed_data();
  std::memcpy(out, partial[0].data(), size * sizeof(float));
  for (int t = 1; t < workers; ++t)
    for (int64_t e = 0; e < size; ++e) out[e] += partial[t][e];
  return ffi::Error::Success();
}

// ---- the input gradient's kernel -------------------------------------------------------

// wt[i, j, o, c] = w[kh-1-i, kw-1-j, c, o]: a convolution's kernel flipped and its channel axes
// swapped, which the input gradient convolves with. XLA:CPU fuses this into a loop that reads
// with stride O: 2.3 ms for 3x3x512x512 (up to 7 ms in ResNet-34's step), against 1.4 for
// 32x32 tiles that stay in L1 (a memcpy of it: 0.7).
ffi::Error FlipSwap(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> wt) {
  auto d = w.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("agejax_flip_swap: want w (KH, KW, C, O)");
  constexpr int64_t T = 32;
  const int64_t taps = d[0] * d[1], c = d[2], o = d[3];
  const int64_t cblocks = (c + T - 1) / T, units = taps * cblocks;
  const float* src = w.typed_data();
  float* dst = wt->typed_data();
  auto body = [&](int, int64_t u) {  // one tap, T input channels, every output channel
    const int64_t t = u / cblocks, c0 = (u % cblocks) * T, c1 = std::min(c, c0 + T);
    const float* s = src + (taps - 1 - t) * c * o;
    float* q = dst + t * o * c;
    for (int64_t o0 = 0; o0 < o; o0 += T)
      for (int64_t oo = o0; oo < std::min(o, o0 + T); ++oo)
        for (int64_t cc = c0; cc < c1; ++cc) q[oo * c + cc] = s[cc * o + oo];
  };
  parallel_units(pool, units, worker_count(pool, units), body);
  return ffi::Error::Success();
}

}  // namespace

// The 3x3 handlers: the intra-op thread pool, two float32 operands, one float32 result.
#define AGEJAX_CONV3X3_BINDING                                                          \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>() \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_conv3x3_forward, Forward, AGEJAX_CONV3X3_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_conv3x3_kernel_grad, KernelGrad, AGEJAX_CONV3X3_BINDING);

// The strided handlers: the same, with the stride and padding as attributes.
#define AGEJAX_STRIDED_BINDING AGEJAX_CONV3X3_BINDING.Attr<int64_t>("stride").Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_strided_forward, StridedForward, AGEJAX_STRIDED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_strided_kernel_grad, StridedKernelGrad, AGEJAX_STRIDED_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_flip_swap, FlipSwap,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int agejax_vector_floats() { return VL; }

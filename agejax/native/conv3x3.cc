// 3x3 stride-1 SAME convolution (NHWC x HWIO, float32) for XLA:CPU, as XLA FFI handlers.
//
// Why: jaxlib's XLA:CPU convolves through Eigen's im2col + contraction, which on
// 16-64-channel maps runs 2-5x slower than PyTorch's oneDNN direct convolution
// (docs/RESULTS.md). This is a direct convolution in the same style: a register tile
// of WT output pixels x OT vectors of output channels accumulates over the 3x3 taps
// and input channels, one broadcast input value and OT kernel vectors per step.
//
// Three handlers:
//   agejax_conv3x3_forward(x, w) -> y            y = conv(x, w)
//   agejax_conv3x3_kernel_grad(x, g) -> dw       dw[i,j,c,o] = sum x[n,h+i-1,w+j-1,c] g[n,h,w,o]
//   agejax_flip_swap(w) -> wt                    wt[i,j,o,c] = w[KH-1-i,KW-1-j,c,o], any KH x KW
// The input gradient is a convolution of g with flip_swap(w): the forward here, XLA's elsewhere.
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

// Copies input rows [r0 - 1, r1 + 1) of one image into `slab` with a zero border:
// slab is (r1 - r0 + 2) x (w + 2) x c.
void fill_slab(const float* img, int64_t h, int64_t w, int64_t c, int64_t r0, int64_t r1, float* slab) {
  const int64_t prow = (w + 2) * c;
  for (int64_t r = r0 - 1; r <= r1; ++r) {
    float* dst = slab + (r - r0 + 1) * prow;
    if (r < 0 || r >= h) {
      std::memset(dst, 0, prow * sizeof(float));
      continue;
    }
    std::memset(dst, 0, c * sizeof(float));
    std::memcpy(dst + c, img + r * w * c, w * c * sizeof(float));
    std::memset(dst + (w + 1) * c, 0, c * sizeof(float));
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
    fill_slab(xp + img * h * w * c, h, w, c, r0, r1, slab);
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
      fill_slab(xp + (img + m) * h * w * c, h, w, c, r0, r1, slab + m * islab);
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

// Both convolution handlers: the intra-op thread pool, two float32 operands, one float32 result.
#define AGEJAX_CONV3X3_BINDING                                                          \
  ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>() \
      .Ret<ffi::Buffer<ffi::F32>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_conv3x3_forward, Forward, AGEJAX_CONV3X3_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_conv3x3_kernel_grad, KernelGrad, AGEJAX_CONV3X3_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(agejax_flip_swap, FlipSwap,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

extern "C" int agejax_conv3x3_vector_floats() { return VL; }

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

// ---- register tiles, shared by the 3x3 and the strided convolutions ------------------------
//
// Both read a zero-bordered slab of input rows. For kernel row i, the values one output pixel
// reads are a contiguous run of A "virtual channels" (kernel columns x channels): 3C for a 3x3
// stride-1 convolution, K*C for a KxK one; w[i] is the matching (A, O) matrix, and dw[i] too.
struct Geometry {
  int64_t k;      // kernel rows
  int64_t a;      // virtual channels a kernel row
  int64_t step;   // floats between the reads of adjacent output pixels (stride x C)
  int64_t prow;   // floats a slab row
  int64_t rstep;  // floats between the reads of adjacent output rows (stride x prow)
  bool is_3x3(int64_t c) const { return k == 3 && a == 3 * c && step == c; }
};

// ---- forward --------------------------------------------------------------------------

// WT output pixels x OT*VL output channels; xs points at the slab's top-left input of the tile.
// CC > 0: a 3x3 stride-1 tile over CC input channels, known at compile time, so the WT input
// offsets become immediates and each step is one kernel load and WT broadcast-FMAs.
template <int WT, int OT, int CC>
inline void forward_tile(const float* xs, const Geometry& t, const float* wk, int64_t o, float* y) {
  const int64_t rows = CC ? 3 : t.k, a_n = CC ? 3 * CC : t.a, step = CC ? CC : t.step;
  vec acc[WT][OT];
  _Pragma("GCC unroll 32")
  for (int p = 0; p < WT; ++p)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) acc[p][j] = vec{};
  for (int64_t i = 0; i < rows; ++i) {
    const float* xr = xs + i * t.prow;
    const float* wr = wk + i * a_n * o;
    for (int64_t a = 0; a < a_n; ++a) {
      vec wv[OT];
      _Pragma("GCC unroll 32")
      for (int j = 0; j < OT; ++j) wv[j] = load(wr + a * o + j * VL);
      _Pragma("GCC unroll 32")
      for (int p = 0; p < WT; ++p) {
        const float b = xr[p * step + a];
        _Pragma("GCC unroll 32")
        for (int j = 0; j < OT; ++j) acc[p][j] += b * wv[j];
      }
    }
  }
  _Pragma("GCC unroll 32")
  for (int p = 0; p < WT; ++p)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) store(y + p * o + j * VL, acc[p][j]);
}

template <int OT, int CC, int WT>
inline void forward_row_tail(int64_t rem, const float* xs, const Geometry& t, const float* wk, int64_t o,
                             float* y) {
  if constexpr (WT > 0) {
    if (rem == WT) return forward_tile<WT, OT, CC>(xs, t, wk, o, y);
    forward_row_tail<OT, CC, WT - 1>(rem, xs, t, wk, o, y);
  }
}

// `rows` output rows of `wo` pixels into y, from the slab.
template <int OT, int CC>
void forward_band(const float* slab, const Geometry& t, int64_t rows, int64_t wo, const float* wk, int64_t o,
                  float* y) {
  constexpr int WT = kMaxAcc / OT;
  // Tiles of near-equal width: 64 columns as 22+21+21 rather than 28+28+8.
  const int64_t tiles = (wo + WT - 1) / WT, base = wo / tiles, wider = wo % tiles;
  // O-blocks outermost: one block's kernel (9 x C x OT*VL floats, <= 295 KB up to 128 input
  // channels) stays in L2 across the band. Wider layers stay on XLA (conv3x3.py).
  for (int64_t ob = 0; ob < o; ob += OT * VL)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0, x0 = 0; i < tiles; ++i) {
        const int64_t width = base + (i < wider);
        forward_row_tail<OT, CC, WT>(width, slab + r * t.rstep + x0 * t.step, t, wk + ob, o,
                                     y + (r * wo + x0) * o + ob);
        x0 += width;
      }
}

template <int OT>
void forward_band_c(const float* slab, const Geometry& t, int64_t rows, int64_t wo, int64_t c, const float* wk,
                    int64_t o, float* y) {
  if (t.is_3x3(c)) switch (c) {
      case 16: return forward_band<OT, 16>(slab, t, rows, wo, wk, o, y);
      case 32: return forward_band<OT, 32>(slab, t, rows, wo, wk, o, y);
      case 64: return forward_band<OT, 64>(slab, t, rows, wo, wk, o, y);
      case 128: return forward_band<OT, 128>(slab, t, rows, wo, wk, o, y);
      case 256: return forward_band<OT, 256>(slab, t, rows, wo, wk, o, y);
      case 512: return forward_band<OT, 512>(slab, t, rows, wo, wk, o, y);
    }
  forward_band<OT, 0>(slab, t, rows, wo, wk, o, y);
}

// With the widest register tile of output vectors that divides O.
void forward_rows(const float* slab, const Geometry& t, int64_t rows, int64_t wo, int64_t c, const float* wk,
                  int64_t o, float* y) {
  if (o % (4 * VL) == 0 && VL == 16) forward_band_c<4>(slab, t, rows, wo, c, wk, o, y);
  else if (o % (2 * VL) == 0) forward_band_c<2>(slab, t, rows, wo, c, wk, o, y);
  else forward_band_c<1>(slab, t, rows, wo, c, wk, o, y);
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
  const Geometry t{3, 3 * c, c, prow, prow};
  std::vector<std::vector<float>> slabs(workers, std::vector<float>((rows + 2) * prow));
  const float* xp = x.typed_data();
  auto body = [&](int id, int64_t u) {
    const int64_t img = u / bands, r0 = (u % bands) * rows, r1 = std::min(h, r0 + rows);
    float* slab = slabs[id].data();
    fill_slab(xp + img * h * w * c, h, w, c, r0 - 1, r1 + 1, 1, slab);
    forward_rows(slab, t, r1 - r0, w, c, wk.typed_data(), o, y->typed_data() + (img * h + r0) * w * o);
  };
  parallel_units(pool, units, workers, body);
  return ffi::Error::Success();
}

// ---- kernel gradient --------------------------------------------------------------------

// Accumulates dw[i, a0:a0+CT, o0:o0+OT*VL] over `images` slabs (islab floats apart) of `rows`
// output rows each: CT virtual channels x OT vectors of gradient channels in registers.
template <int CT, int OT>
void kernel_grad_tile(const float* slab, int64_t islab, int64_t images, const Geometry& t, int64_t rows,
                      int64_t wo, int64_t i, int64_t a0, const float* g, int64_t ig, int64_t o, int64_t o0,
                      float* dw) {
  vec acc[CT][OT];
  _Pragma("GCC unroll 32")
  for (int b = 0; b < CT; ++b)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) acc[b][j] = vec{};
  for (int64_t m = 0; m < images; ++m) {
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = slab + m * islab + r * t.rstep + i * t.prow + a0;
      const float* gr = g + m * ig + r * wo * o + o0;
      for (int64_t x = 0; x < wo; ++x) {
        vec gv[OT];
        _Pragma("GCC unroll 32")
        for (int j = 0; j < OT; ++j) gv[j] = load(gr + x * o + j * VL);
        const float* xv = xr + x * t.step;
        _Pragma("GCC unroll 32")
        for (int b = 0; b < CT; ++b) {
          const float v = xv[b];
          _Pragma("GCC unroll 32")
          for (int j = 0; j < OT; ++j) acc[b][j] += v * gv[j];
        }
      }
    }
  }
  float* d = dw + (i * t.a + a0) * o + o0;
  _Pragma("GCC unroll 32")
  for (int b = 0; b < CT; ++b)
    _Pragma("GCC unroll 32")
    for (int j = 0; j < OT; ++j) store(d + b * o + j * VL, load(d + b * o + j * VL) + acc[b][j]);
}

template <int OT, int CT>
inline void kernel_grad_tail(int64_t rem, const float* slab, int64_t islab, int64_t images, const Geometry& t,
                             int64_t rows, int64_t wo, int64_t i, int64_t a0, const float* g, int64_t ig,
                             int64_t o, int64_t o0, float* dw) {
  if constexpr (CT > 0) {
    if (rem == CT) return kernel_grad_tile<CT, OT>(slab, islab, images, t, rows, wo, i, a0, g, ig, o, o0, dw);
    kernel_grad_tail<OT, CT - 1>(rem, slab, islab, images, t, rows, wo, i, a0, g, ig, o, o0, dw);
  }
}

template <int OT, int CT>
void kernel_grad_band(const float* slab, int64_t islab, int64_t images, const Geometry& t, int64_t rows,
                      int64_t wo, const float* g, int64_t ig, int64_t o, float* dw) {
  for (int64_t i = 0; i < t.k; ++i)
    for (int64_t ob = 0; ob < o; ob += OT * VL)
      for (int64_t a0 = 0; a0 < t.a; a0 += CT)
        kernel_grad_tail<OT, CT>(std::min<int64_t>(CT, t.a - a0), slab, islab, images, t, rows, wo, i, a0, g,
                                 ig, o, ob, dw);
}

// Tiles of 16, 8 or 4 virtual channels where they divide A (3x3 layers of 16k channels, measured),
// else the widest the registers hold (7x7 over RGB: A = 21 = 3 x 7).
template <int OT>
void kernel_grad_band_a(const float* slab, int64_t islab, int64_t images, const Geometry& t, int64_t rows,
                        int64_t wo, const float* g, int64_t ig, int64_t o, float* dw) {
  constexpr int wide = kMaxAcc / OT, even = wide >= 16 ? 16 : (wide >= 8 ? 8 : 4);
  if (t.a % even == 0) kernel_grad_band<OT, even>(slab, islab, images, t, rows, wo, g, ig, o, dw);
  else kernel_grad_band<OT, wide>(slab, islab, images, t, rows, wo, g, ig, o, dw);
}

// Two vectors of gradient channels, or four where 7-wide tiles fill A exactly (7x7 over RGB:
// 8.2 ms against 9.5 for two vectors at 112 px, batch 32).
void kernel_grad_rows(const float* slab, int64_t islab, int64_t images, const Geometry& t, int64_t rows,
                      int64_t wo, const float* g, int64_t ig, int64_t o, float* dw) {
  if (VL == 16 && o % (4 * VL) == 0 && t.a % (kMaxAcc / 4) == 0)
    kernel_grad_band_a<4>(slab, islab, images, t, rows, wo, g, ig, o, dw);
  else if (o % (2 * VL) == 0) kernel_grad_band_a<2>(slab, islab, images, t, rows, wo, g, ig, o, dw);
  else kernel_grad_band_a<1>(slab, islab, images, t, rows, wo, g, ig, o, dw);
}

// Runs unit(slab, u, partial) for every unit and writes the sum of the partials (`size` floats)
// to out. Deterministic: unit ranges are fixed per chunk (one chunk per thread), each chunk sums
// its units in order into its own partial, and the partials are added in chunk order, whichever
// thread ran which chunk. Bitwise-reproducible training (checkpoint resume) relies on this.
template <typename Unit>
void summed_units(ffi::ThreadPool& pool, int64_t units, int64_t slab_floats, int64_t size, Unit& unit,
                  float* out) {
  const int workers = worker_count(pool, units);
  std::vector<std::vector<float>> slabs(workers, std::vector<float>(slab_floats));
  std::vector<std::vector<float>> partial(workers, std::vector<float>(size, 0.0f));
  auto body = [&](int id, int64_t chunk) {
    for (int64_t u = chunk * units / workers; u < (chunk + 1) * units / workers; ++u)
      unit(slabs[id].data(), u, partial[chunk].data());
  };
  parallel_units(pool, workers, workers, body);
  std::memcpy(out, partial[0].data(), size * sizeof(float));
  for (int t = 1; t < workers; ++t)
    for (int64_t e = 0; e < size; ++e) out[e] += partial[t][e];
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
  const Geometry t{3, 3 * c, c, prow, prow};
  // Small maps: several whole images a unit, so each worker's partial sum (9 C O floats, 2.4 MB
  // at 256 channels) is read and written once per group instead of once per image.
  int64_t group = 1;
  if (bands == 1) {
    const int64_t image_floats = (h + 2) * prow;
    group = std::max<int64_t>(1, std::min<int64_t>((1 << 18) / image_floats,
                                                   n / (4 * std::max<int64_t>(threads, 1))));
  }
  const int64_t units = bands == 1 ? (n + group - 1) / group : n * bands;
  const int64_t islab = (rows + 2) * prow;
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  auto unit = [&](float* slab, int64_t u, float* partial) {
    const int64_t img = bands == 1 ? u * group : u / bands;
    const int64_t images = bands == 1 ? std::min(group, n - img) : 1;
    const int64_t r0 = bands == 1 ? 0 : (u % bands) * rows, r1 = std::min(h, r0 + rows);
    for (int64_t m = 0; m < images; ++m)
      fill_slab(xp + (img + m) * h * w * c, h, w, c, r0 - 1, r1 + 1, 1, slab + m * islab);
    kernel_grad_rows(slab, islab, images, t, r1 - r0, w, gp + (img * h + r0) * w * o, h * w * o, o, partial);
  };
  summed_units(pool, units, group * islab, 9 * c * o, unit, dw->typed_data());
  return ffi::Error::Success();
}

// ---- strided convolution over few input channels (a stem: ResNet's 7x7/2 over RGB) ----------
//
// x (N, H, W, C), w (K, K, C, O), stride S, padding P: y (N, HO, WO, O). With C this small the
// 3x3 kernels' channel tiles would hold one channel each; as virtual channels (Geometry), a
// kernel row over RGB is A = K*C = 21 wide, and the register tiles fill as on a wide layer.

struct Strided {  // the shapes of one call
  int64_t n, h, w, c, o, k, s, p, ho, wo;
  Geometry t;
  Strided(ffi::Span<const int64_t> xd, int64_t k_, int64_t o_, int64_t s_, int64_t p_)
      : n(xd[0]), h(xd[1]), w(xd[2]), c(xd[3]), o(o_), k(k_), s(s_), p(p_),
        ho((xd[1] + 2 * p_ - k_) / s_ + 1), wo((xd[2] + 2 * p_ - k_) / s_ + 1),
        t{k_, k_ * xd[3], s_ * xd[3], (xd[2] + 2 * p_) * xd[3], s_ * (xd[2] + 2 * p_) * xd[3]} {}
  int64_t band_floats(int64_t rows) const { return ((rows - 1) * s + k) * t.prow; }
  // The padded input rows behind output rows [r0, r1) of image img.
  void fill(const float* x, int64_t img, int64_t r0, int64_t r1, float* slab) const {
    fill_slab(x + img * h * w * c, h, w, c, r0 * s - p, (r1 - 1) * s - p + k, p, slab);
  }
};

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
  std::vector<std::vector<float>> slabs(workers, std::vector<float>(d.band_floats(rows)));
  const float* xp = x.typed_data();
  auto body = [&](int id, int64_t u) {
    const int64_t img = u / bands, r0 = (u % bands) * rows, r1 = std::min(d.ho, r0 + rows);
    d.fill(xp, img, r0, r1, slabs[id].data());
    forward_rows(slabs[id].data(), d.t, r1 - r0, d.wo, d.c, wk.typed_data(), d.o,
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
  const int64_t bands = (d.ho + rows - 1) / rows;
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  auto unit = [&](float* slab, int64_t u, float* partial) {
    const int64_t img = u / bands, r0 = (u % bands) * rows, r1 = std::min(d.ho, r0 + rows);
    d.fill(xp, img, r0, r1, slab);
    kernel_grad_rows(slab, 0, 1, d.t, r1 - r0, d.wo, gp + (img * d.ho + r0) * d.wo * d.o, 0, d.o, partial);
  };
  summed_units(pool, d.n * bands, d.band_floats(rows), d.k * d.t.a * d.o, unit, dw->typed_data());
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

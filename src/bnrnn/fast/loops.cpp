// The recurrence of the fast path, compiled: the same two functions as loops.py
// (forward_loop, backward_loop), with the same buffers and the same results to float
// tolerance. Per step: the GEMMs (oneDNN's brgemm micro-kernel by default, see Gemm) and
// one fused pass over the step's gates, split over threads by hidden units (every BN
// statistic is per feature, so hidden units are independent within a step): see Blocks,
// BlockGemm and RowGemm.
//
// Registered as torch.ops.bnrnn_fast.forward_loop / backward_loop; the tensors come as one
// list in the order of compiled.py (_ORDER).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <dlfcn.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace {

enum Kind { LSTM = 0, RNN_TANH = 1, RNN_RELU = 2 };
constexpr int64_t CHUNK = 256;  // hidden units per inner block (stack arrays)

// ---------------------------------------------------------------------------------------
// Element-wise math. float: vectorisable approximations (Cephes expf / tanhf, ~2 ulp);
// double: the C library (double is for tests, not speed). Built with -fno-trapping-math so
// that both sides of a select may be evaluated (vectorised).

__attribute__((always_inline)) inline float exp_f(float x) {
  // Branch-free so that gcc vectorises the loops calling it (no floor, fmin, memcpy).
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // k = round(x / ln 2) by the 1.5 * 2^23 trick; its integer value is in the low bits.
  const float kf = x * 1.44269504088896341f + 12582912.0f;
  const int32_t ki = __builtin_bit_cast(int32_t, kf) - 0x4B400000;
  const float k = kf - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * __builtin_bit_cast(float, (ki + 127) << 23);
}

__attribute__((always_inline)) inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }

__attribute__((always_inline)) inline float tanh_f(float x) {
  // Both branches are computed and blended arithmetically: gcc does not vectorise a select
  // whose one side divides. The small-|x| polynomial sees 0 for large |x| (no overflow).
  const float ax = x < 0.0f ? -x : x;
  const float m = ax < 0.625f ? 1.0f : 0.0f;
  const float xs = x * m;
  const float z = xs * xs;
  const float small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) *
                            z + 1.33314422036e-1f) * z - 3.33332819422e-1f) * z * xs + xs;
  const float big = 1.0f - 2.0f / (exp_f(2.0f * ax) + 1.0f);
  return m * small + (1.0f - m) * (x < 0.0f ? -big : big);
}

template <typename T> __attribute__((always_inline)) inline T sigm(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <> __attribute__((always_inline)) inline float sigm<float>(float x) { return sigmoid_f(x); }
template <typename T> __attribute__((always_inline)) inline T th(T x) { return std::tanh(x); }
template <> __attribute__((always_inline)) inline float th<float>(float x) { return tanh_f(x); }

// Row kernels kept out of line: small loops over contiguous memory that gcc vectorises.
template <typename T>
__attribute__((noinline)) void sigmoid_row(T* __restrict__ o, int64_t w) {
  for (int64_t j = 0; j < w; ++j) o[j] = sigm<T>(o[j]);
}
template <typename T>
__attribute__((noinline)) void tanh_row(T* __restrict__ o, int64_t w) {
  for (int64_t j = 0; j < w; ++j) o[j] = th<T>(o[j]);
}
// tc <- tanh(tc); h <- o * tc
template <typename T>
__attribute__((noinline)) void tanh_mul_row(T* __restrict__ tc, T* __restrict__ h,
                                           const T* __restrict__ o, int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    const T v = th<T>(tc[j]);
    tc[j] = v;
    h[j] = o[j] * v;
  }
}

// o <- act(b * A + a * B + C) in one pass (act: 0 sigmoid, 1 tanh, 2 relu): the evaluation
// pre-activation with every BN an affine map per feature.
template <typename T, int ACT>
__attribute__((noinline)) void affine_act_row(T* __restrict__ o, const T* __restrict__ a,
                                              const T* __restrict__ b, const T* __restrict__ A,
                                              const T* __restrict__ B, const T* __restrict__ C,
                                              int64_t w) {
  for (int64_t j = 0; j < w; ++j) {
    const T v = b[j] * A[j] + a[j] * B[j] + C[j];
    o[j] = ACT == 0 ? sigm<T>(v) : ACT == 1 ? th<T>(v) : (v > T(0) ? v : T(0));
  }
}

// One row of an LSTM step in evaluation, w units, every BN an affine map per feature: gate
// k's pre-activation is wh[k H + j] * co[k] + wx[k H + j] * co[4 + k] + co[8 + k], and
// BN(c) is c * co[12] + co[13] (co: 14 arrays of CHUNK). c is updated in place (c_{t-1} in,
// c_t out) and h = o * tanh(BN(c_t)) written; nothing is kept for a backward. In passes
// over tmp (4 CHUNK): the pre-activations, each gate's activation by the row kernels, then
// c and h. Against one fused pass per unit (five activations in one loop body), paired with
// nn.LSTM in one process: evaluation 2-3% faster at mid and char-PTB, 7% at sMNIST.
template <typename T>
__attribute__((noinline)) void lstm_affine_row(int64_t w, int64_t H, const T* __restrict__ wh,
                                               const T* __restrict__ wx, const T* __restrict__ co,
                                               T* __restrict__ c, T* __restrict__ h,
                                               T* __restrict__ tmp) {
  constexpr int64_t S = CHUNK;
  for (int64_t k = 0; k < 4; ++k) {
    const T* a = wh + k * H;
    const T* b = wx + k * H;
    const T* A = co + k * S;
    const T* B = co + (4 + k) * S;
    const T* C0 = co + (8 + k) * S;
    T* o = tmp + k * S;
    for (int64_t j = 0; j < w; ++j) o[j] = a[j] * A[j] + b[j] * B[j] + C0[j];
  }
  sigmoid_row<T>(tmp, w);
  sigmoid_row<T>(tmp + S, w);
  tanh_row<T>(tmp + 2 * S, w);
  sigmoid_row<T>(tmp + 3 * S, w);
  const T* Ac = co + 12 * S;
  const T* Bc = co + 13 * S;
  T* u = tmp + 2 * S;  // tanh(g), then BN(c_t)
  for (int64_t j = 0; j < w; ++j) {
    const T cn = tmp[S + j] * c[j] + tmp[j] * u[j];
    c[j] = cn;
    u[j] = cn * Ac[j] + Bc[j];
  }
  tanh_mul_row<T>(u, h, tmp + 3 * S, w);
}

// One row of a gate's pre-activation with given BN statistics (training, or batch
// statistics without a backward), w units: q[0..), q[S..), q[2 S..) hold mean,
// 1/sqrt(var + eps) and gamma of BN(W_hh h) (0, 1, 1 when absent), q[3 S..) to q[5 S..) the
// same of BN(W_ih x), q[6 S..) the bias (Cooijmans eq. 6). wh, and wx if STORE_WX, are
// replaced by their normalised values (kept for the backward; a one-step wx is not).
template <typename T, bool STORE_WX>
__attribute__((noinline)) void bn_gate_row(int64_t w, T* __restrict__ wh, T* __restrict__ wx,
                                           const T* __restrict__ q, T* __restrict__ a) {
  constexpr int64_t S = CHUNK;
  for (int64_t j = 0; j < w; ++j) {
    const T xh = (wh[j] - q[j]) * q[S + j];
    const T xi = (wx[j] - q[3 * S + j]) * q[4 * S + j];
    wh[j] = xh;
    if (STORE_WX) wx[j] = xi;
    a[j] = xi * q[5 * S + j] + xh * q[2 * S + j] + q[6 * S + j];
  }
}

// One row of an LSTM cell, w units: the pre-activations in act (i, f, g, o at offsets 0, H,
// 2H, 3H) are replaced by the gate activations and c receives c_t = f c_{t-1} + i g.
// INPLACE: c holds c_{t-1} (cp unused).
template <typename T, bool INPLACE>
__attribute__((noinline)) void lstm_cell_row(int64_t w, int64_t H, T* __restrict__ act,
                                             const T* __restrict__ cp, T* __restrict__ c) {
  for (int64_t j = 0; j < w; ++j) {
    const T i = sigm<T>(act[j]), f = sigm<T>(act[H + j]);
    const T g = th<T>(act[2 * H + j]), o = sigm<T>(act[3 * H + j]);
    act[j] = i, act[H + j] = f, act[2 * H + j] = g, act[3 * H + j] = o;
    c[j] = f * (INPLACE ? c[j] : cp[j]) + i * g;
  }
}

// h = o * tanh((c - mu) * rs * g + b) for w units (BN(c) of Cooijmans eq. 8; mu 0, rs 1,
// g 1, b 0 without it).
template <typename T>
__attribute__((noinline)) void lstm_out_row(int64_t w, const T* __restrict__ c,
                                            const T* __restrict__ o, const T* __restrict__ mu,
                                            const T* __restrict__ rs, const T* __restrict__ g,
                                            const T* __restrict__ b, T* __restrict__ h) {
  for (int64_t j = 0; j < w; ++j) h[j] = o[j] * th<T>((c[j] - mu[j]) * rs[j] * g[j] + b[j]);
}

// ---------------------------------------------------------------------------------------
// Buffer cache.
//
// The fast path's internal buffers (the saved XH and C, the backward's DWX and DWH, the
// GEMMs' weight copies, ...) are large and short-lived: a fresh one from the system costs
// its page faults on first touch, about 0.6 ms per MB here (char-PTB writes some 250 MB per
// training step). Freed blocks are kept and handed out again for requests of their size
// or up to a fifth smaller (a block at most 1.25 times the request), as PyTorch's CUDA
// caching allocator does, up to a limit of free bytes (set_cache_limit; empty_cache
// returns them). Paired with nn.LSTM in one process, training: char-PTB 1.25 -> 1.15,
// mid 1.09 -> 1.06, sMNIST 0.90 -> 0.76.

struct Cache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // by size
  size_t free_bytes = 0;
  size_t limit = size_t(1) << 30;
  static constexpr size_t ALIGN = 4096, GRAIN = 64 << 10;

  std::pair<void*, size_t> take(size_t bytes) {
    bytes = std::max<size_t>(GRAIN, (bytes + GRAIN - 1) / GRAIN * GRAIN);
    {
      std::lock_guard<std::mutex> lock(mu);
      auto it = free_blocks.lower_bound(bytes);
      if (it != free_blocks.end() && it->first <= bytes + bytes / 4) {
        auto block = std::make_pair(it->second, it->first);
        free_bytes -= it->first;
        free_blocks.erase(it);
        return block;
      }
    }
    void* p = std::aligned_alloc(ALIGN, bytes);
    if (!p) {  // free what is kept, then try once more
      release();
      p = std::aligned_alloc(ALIGN, bytes);
    }
    TORCH_CHECK(p, "bnrnn_fast: out of memory allocating ", bytes, " bytes");
    return {p, bytes};
  }
  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (free_bytes + bytes <= limit) {
        free_blocks.emplace(bytes, p);
        free_bytes += bytes;
        return;
      }
    }
    std::free(p);
  }
  void release() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mu);
      blocks.swap(free_blocks);
      free_bytes = 0;
    }
    for (auto& b : blocks) std::free(b.second);
  }
};

Cache& cache() {
  static Cache* c = new Cache;  // never destroyed: tensors may outlive static destruction
  return *c;
}

// An uninitialised 1-d tensor of n elements from the cache.
at::Tensor cached_empty(int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(n >= 0, "cached_empty: negative size");
  auto [p, bytes] = cache().take(size_t(n) * at::elementSize(dtype));
  return at::from_blob(
      p, {n}, [bytes = bytes](void* q) { cache().give(q, bytes); },
      at::TensorOptions().dtype(dtype));
}

// ---------------------------------------------------------------------------------------
// GEMM: C (m, n) = A (m, k) @ B (k, n), row-major, B fixed for the whole loop.

typedef size_t (*pack_size_fn)(int, int, int, int);
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float*, int, float*);
typedef void (*compute_fn)(int, int, int, int, int, int, const float*, int, const float*, int,
                           float, float*, int);

struct Mkl {
  pack_size_fn size = nullptr;
  pack_fn pack = nullptr;
  compute_fn compute = nullptr;
  int (*set_local)(int) = nullptr;  // MKL threads of the calling thread (0: global setting)
  Mkl() {
    set_local = reinterpret_cast<int (*)(int)>(dlsym(RTLD_DEFAULT, "MKL_Set_Num_Threads_Local"));
    size = reinterpret_cast<pack_size_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack_get_size"));
    pack = reinterpret_cast<pack_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm_pack"));
    compute = reinterpret_cast<compute_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm_compute"));
  }
  bool ok() const { return size && pack && compute; }
};

const Mkl& mkl() {
  static Mkl m;
  return m;
}

// MKL limited to the calling thread while in scope (its threads cost more than they save on
// a step's GEMM), restored on exit, exceptions included.
struct MklOneThread {
  int old = 0;
  MklOneThread() {
    if (mkl().set_local) old = mkl().set_local(1);
  }
  ~MklOneThread() {
    if (mkl().set_local) mkl().set_local(old);
  }
};

// The per-step GEMMs (float32; double always uses at::mm):
// - BRGEMM: oneDNN's batch-reduce GEMM micro-kernel through at::native::cpublas::brgemm,
//   which reads A and B in place and writes C with beta 0 directly (torch falls back to
//   its gemm where oneDNN's micro-kernels are not built or the CPU lacks AVX2);
// - PACKED: MKL's packed GEMM (cblas_sgemm_compute on a B packed once per call);
// - MM: at::mm.
// On an AVX-512 AMD EPYC, per step (M 32, K 256, four gates of 128 columns, one thread):
// BRGEMM 80 us, PACKED 96 us (MKL repacks A and scales C by beta each call), MM 117 us.
enum Gemm { BRGEMM = 0, PACKED = 1, MM = 2 };
Gemm g_gemm = BRGEMM;  // set_gemm("brgemm" | "packed" | "mm")

// The GEMM a loop uses for B: g_gemm for float32 (at::mm if MKL's packed GEMM is chosen
// but not exported), at::mm for double.
inline Gemm gemm_mode(const at::Tensor& B, int64_t max_m) {
  if (B.scalar_type() != at::kFloat) return MM;
  return g_gemm == PACKED && !(mkl().ok() && max_m > 0) ? MM : g_gemm;
}

// A step split by hidden units: block p owns units [j0, j1). In the forward it computes the
// columns of its four gates (k H + j0 .. k H + j1) of the step GEMMs itself, then the gate
// and BN work of the same units, so each thread reads back what it just wrote (L1/L2) and
// keeps its slice of W_hh in its own L2 across steps; the backward likewise (gate and BN
// gradients, then its columns of dh_{t-1}).
struct Blocks {
  std::vector<int64_t> j0, j1;
  Blocks(int64_t H, int64_t n_blocks) {
    // boundaries on multiples of 16 units (a 64-byte line of floats), as even as that allows
    int64_t a = 0;
    for (int64_t p = 1; p <= n_blocks && a < H; ++p) {
      const int64_t b = p == n_blocks ? H : std::max(a + 16, (H * p / n_blocks + 8) / 16 * 16);
      j0.push_back(a), j1.push_back(std::min(H, b));
      a = std::min(H, b);
    }
  }
  int64_t size() const { return (int64_t)j0.size(); }
};

// Columns per brgemm call for a B block of k rows and n columns: all of them when the
// block fits in a thread's share of L2, else panels of 64. The micro-kernel sweeps all of B
// once per block of a few rows of A: at char-PTB (k 1000, n 500, 2 MB per gate) that
// streamed B from L3 about ten times per step; a (k, 64) panel stays in L2 across the
// sweeps. Against nn.LSTM at (N 64, H 1000), 2 threads, paired in one process: training
// 1.20-1.23 -> 1.12-1.19 (loop GEMMs: forward 403 -> 377 ms, backward 365 -> 325 ms per
// step of 100 time steps); (32, 256) has no block above the budget. Contiguous panels
// (ldb 64) measured no faster than reading them in place.
constexpr int64_t L2_SHARE = 256 << 10;  // bytes of B per brgemm call kept in L2
inline int64_t panel_cols(int64_t k, int64_t n) {
  constexpr int64_t PANEL = 64;
  return k * n * (int64_t)sizeof(float) > L2_SHARE ? PANEL : n;
}

struct BlockGemm {
  // C[:, k S + j0 : k S + j1] = A @ B[:, k S + j0 : k S + j1] for k < gates, block p: the
  // forward's h_{t-1} W_hh^T (B = W_hh^T (H, G), S = H, four gates) and W_ih x_t (B =
  // W_ih^T (I, G)).
  at::Tensor B;  // (K, L), contiguous for PACKED and whole
  int64_t K, L, S, gates;
  const Blocks* blocks;
  Gemm mode;
  // [p * gates + k]: PACKED: MKL's packed B; BRGEMM: B[:, k S + j0 : k S + j1] contiguous
  // (K, w), which streams 5-9% faster than reading the columns in place (ld L).
  std::vector<at::Tensor> parts;
  // BRGEMM with one block of all units and B within L2_SHARE: one GEMM of all L columns of
  // B in place (at (N 32, H 100) one call of 400 columns instead of four of 100, each with
  // a masked tail). A larger B goes by gates: (M 16, K 256, L 1024), one thread, ran at 189
  // GFLOP/s in one call and 231 in four; the mid configuration's evaluation with its rows
  // split over threads 15.9 -> 14.5 ms.
  bool whole = false;
  // B_ may be a strided view (W_hh^T of the forward): BRGEMM copies each block's gate columns
  // from it (one transposing copy instead of a contiguous W_hh^T and then the parts)
  BlockGemm(const at::Tensor& B_, int64_t S_, int64_t gates_, const Blocks& bl, int64_t max_m)
      : B(B_), K(B_.size(0)), L(B_.size(1)), S(S_), gates(gates_), blocks(&bl) {
    mode = gemm_mode(B, max_m);
    whole = mode == BRGEMM && bl.size() == 1 && bl.j1[0] - bl.j0[0] == S && L == gates * S &&
            K * L * (int64_t)sizeof(float) <= L2_SHARE;
    if (whole) B = cached_empty(K * L, at::kFloat).view({K, L}).copy_(B);
    if (mode == PACKED) B = B.contiguous();
    if (mode == BRGEMM && !whole) {  // the parts one after another in one cached block
      std::vector<int64_t> start{0};  // of each part, 64-byte aligned
      for (int64_t q = 0; q < bl.size() * gates; ++q)
        start.push_back(start.back() + (K * (bl.j1[q / gates] - bl.j0[q / gates]) + 15) / 16 * 16);
      at::Tensor all = cached_empty(start.back(), at::kFloat);
      for (int64_t q = 0; q < bl.size() * gates; ++q) {
        const int64_t w = bl.j1[q / gates] - bl.j0[q / gates];
        parts.push_back(all.narrow(0, start[q], K * w).view({K, w}));
      }
    }
    for (int64_t p = 0; p < bl.size() && mode == PACKED; ++p) {
      const int64_t w = bl.j1[p] - bl.j0[p];
      for (int64_t k = 0; k < gates; ++k) {
        size_t bytes = mkl().size(162, (int)max_m, (int)w, (int)K);
        at::Tensor out = at::empty({(int64_t)(bytes / sizeof(float)) + 16}, B.options());
        mkl().pack(101, 162, 111, (int)max_m, (int)w, (int)K, 1.0f,
                   B.data_ptr<float>() + k * S + bl.j0[p], (int)L, out.data_ptr<float>());
        parts.push_back(out);
      }
    }
    if (mode != BRGEMM || whole) return;
    // the parts' columns, on all threads: a tiled transposing copy when B is W_hh^T as a
    // view of W_hh (16 MB of it at H 1000 took 7 ms through a contiguous W_hh^T first)
    const int64_t sk = B.stride(0), sl = B.stride(1);
    const float* src = B.const_data_ptr<float>();
    at::parallel_for(0, (int64_t)parts.size(), 1, [&](int64_t a, int64_t b) {
      for (int64_t q = a; q < b; ++q) {
        const int64_t p = q / gates, k = q % gates, w = bl.j1[p] - bl.j0[p];
        const float* from = src + (k * S + bl.j0[p]) * sl;
        float* to = parts[q].data_ptr<float>();
        constexpr int64_t TB = 16;
        for (int64_t i0 = 0; i0 < K; i0 += TB)
          for (int64_t j0 = 0; j0 < w; j0 += TB)
            for (int64_t i = i0; i < std::min(K, i0 + TB); ++i)
              for (int64_t j = j0; j < std::min(w, j0 + TB); ++j)
                to[i * w + j] = from[i * sk + j * sl];
      }
    });
  }
  // A: m rows of K (leading dim K); C: m rows, leading dim L. Called inside a parallel
  // region: the GEMM itself runs on this thread.
  template <typename T> void run(int64_t p, const T* A, T* C, int64_t m) const {
    if (m == 0) return;
    if (whole) {
      at::native::cpublas::brgemm(m, L, K, K, L, L, false, reinterpret_cast<const float*>(A),
                                  B.const_data_ptr<float>(), reinterpret_cast<float*>(C));
      return;
    }
    const int64_t j0 = blocks->j0[p], w = blocks->j1[p] - j0;
    for (int64_t k = 0; k < gates; ++k) {
      if (mode == BRGEMM) {
        const float* b = parts[p * gates + k].const_data_ptr<float>();
        float* c = reinterpret_cast<float*>(C) + k * S + j0;
        const int64_t nc = panel_cols(K, w);
        for (int64_t c0 = 0; c0 < w; c0 += nc)
          at::native::cpublas::brgemm(m, std::min(nc, w - c0), K, K, w, L, false,
                                      reinterpret_cast<const float*>(A), b + c0, c + c0);
      } else if (mode == PACKED) {
        mkl().compute(101, 111, 151, (int)m, (int)w, (int)K, reinterpret_cast<const float*>(A),
                      (int)K, parts[p * gates + k].data_ptr<float>(), (int)w, 0.0f,
                      reinterpret_cast<float*>(C) + k * S + j0, (int)L);
      } else {
        auto opt = B.options();
        at::Tensor a = at::from_blob(const_cast<T*>(A), {m, K}, opt);
        at::Tensor c = at::from_blob(C + k * S + j0, {m, w}, {L, 1}, opt);
        at::mm_out(c, a, B.narrow(1, k * S + j0, w));
      }
    }
  }
};

struct RowGemm {
  // C = sum over gates k of A[:, k S + j0 : k S + j1] @ B[k S + j0 : k S + j1, :] for block
  // p: its part of the backward's dh_{t-1} = da_t W_hh (A = da_t (m, G), B = W_hh (G, H),
  // S = H), from its own columns of da.
  at::Tensor B;  // (G, L) contiguous
  int64_t G, L, S;
  const Blocks* blocks;
  Gemm mode;
  std::vector<at::Tensor> packed;  // [p * 4 + k] when mode == PACKED
  RowGemm(const at::Tensor& B_, int64_t S_, const Blocks& bl, int64_t max_m)
      : B(B_.contiguous()), G(B_.size(0)), L(B_.size(1)), S(S_), blocks(&bl) {
    mode = gemm_mode(B, max_m);
    for (int64_t p = 0; p < bl.size() && mode == PACKED; ++p) {
      const int64_t w = bl.j1[p] - bl.j0[p];
      for (int64_t k = 0; k < G / S; ++k) {
        size_t bytes = mkl().size(162, (int)max_m, (int)L, (int)w);
        at::Tensor out = at::empty({(int64_t)(bytes / sizeof(float)) + 16}, B.options());
        mkl().pack(101, 162, 111, (int)max_m, (int)L, (int)w, 1.0f,
                   B.data_ptr<float>() + (k * S + bl.j0[p]) * L, (int)L, out.data_ptr<float>());
        packed.push_back(out);
      }
    }
  }
  // A: m rows, leading dim G; C: m rows of L (leading dim L), overwritten. Called inside a
  // parallel region: the GEMM itself runs on this thread.
  template <typename T> void run(int64_t p, const T* A, T* C, int64_t m) const {
    if (m == 0) return;
    const int64_t j0 = blocks->j0[p], w = blocks->j1[p] - j0;
    for (int64_t k = 0; k < G / S; ++k) {
      if (mode == BRGEMM) {
        const float* b = B.const_data_ptr<float>() + (k * S + j0) * L;
        const int64_t nc = panel_cols(w, L);
        for (int64_t c0 = 0; c0 < L; c0 += nc)
          at::native::cpublas::brgemm(m, std::min(nc, L - c0), w, G, L, L, k > 0,
                                      reinterpret_cast<const float*>(A) + k * S + j0, b + c0,
                                      reinterpret_cast<float*>(C) + c0);
      } else if (mode == PACKED) {
        mkl().compute(101, 111, 151, (int)m, (int)L, (int)w,
                      reinterpret_cast<const float*>(A) + k * S + j0, (int)G,
                      packed[p * (G / S) + k].data_ptr<float>(), (int)L, k ? 1.0f : 0.0f,
                      reinterpret_cast<float*>(C), (int)L);
      } else {
        auto opt = B.options();
        at::Tensor a = at::from_blob(const_cast<T*>(A) + k * S + j0, {m, w}, {G, 1}, opt);
        at::Tensor c = at::from_blob(C, {m, L}, opt);
        at::Tensor b = B.narrow(0, k * S + j0, w);
        if (k == 0) {
          at::mm_out(c, a, b);
        } else {
          c.addmm_(a, b);
        }
      }
    }
  }
};

int64_t g_block_macs = 1 << 16;  // multiply-adds of a step's GEMM per block (set_block_macs)

// As many blocks as threads when the step's GEMM (macs multiply-adds) is large enough to
// share: below that, the barrier and moving the step's data between cores cost more. With
// one parallel region per call, two blocks pay off from small steps on: against nn.LSTM on
// 2 threads, (N 64, H 100) 1.32 -> 1.01 train, 1.35 -> 0.99 eval; (N 32, H 64) 1.13 ->
// 1.01, 1.52 -> 1.07; (N 8, H 32) no clear difference either way.
inline int64_t n_blocks(int64_t macs) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), macs / g_block_macs));
}

// The first exception thrown by work run in a parallel region, rethrown after it: an
// exception may not leave an OpenMP region, and after one the other work is skipped.
struct FirstError {
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  template <typename F> void run(const F& work) {
    if (failed.load(std::memory_order_relaxed)) return;
    try {
      work();
    } catch (...) {
#pragma omp critical(bnrnn_fast_error)
      if (!failed.exchange(true)) error = std::current_exception();
    }
  }
  void rethrow() const {
    if (error) std::rethrow_exception(error);
  }
};

// Runs step(i, p) for i < steps and every block p: the blocks on their own threads in one
// parallel region for all steps, with a barrier after each step (step i + 1 reads what every
// block wrote at step i), and MKL limited to the calling thread (a single block too: MKL's
// threads cost more than they save on a GEMM this small). One region instead of a fork and
// join per step. If the region has fewer threads than blocks, a thread runs several.
template <typename F> void for_steps(const Blocks& bl, int64_t steps, const F& step) {
  const int64_t nb = bl.size();
  if (nb == 1 || at::get_num_threads() == 1 || at::in_parallel_region()) {
    MklOneThread one;
    for (int64_t i = 0; i < steps; ++i)
      for (int64_t p = 0; p < nb; ++p) step(i, p);
    return;
  }
  FirstError first;
#pragma omp parallel num_threads(nb)
  {
    MklOneThread one;
    const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
    for (int64_t i = 0; i < steps; ++i) {
      // an exception stops the work, not the barriers (every thread must reach them)
      first.run([&] {
        for (int64_t p = tid; p < nb; p += nth) step(i, p);
      });
#pragma omp barrier
    }
  }
  first.rethrow();
}

// ---------------------------------------------------------------------------------------
// Arguments

struct Norm {  // one BN's statistics at one step
  bool on = false;     // this BN exists
  bool batch = false;  // batch statistics at this step (computed here), else given
  void* M = nullptr;   // (rows, F) means
  void* V = nullptr;   // (rows, F) biased variances
  int64_t F = 0;
  double eps = 1e-5;
  bool seq = false;  // one row for all steps (sequence-wise ih)
  const uint8_t* flags = nullptr;
  template <typename T> T* mean(int64_t t) const { return static_cast<T*>(M) + (seq ? 0 : t) * F; }
  template <typename T> T* var(int64_t t) const { return static_cast<T*>(V) + (seq ? 0 : t) * F; }
  bool batch_at(int64_t t) const { return on && !seq && flags[t]; }
};

// Tensor list order: see compiled.py.
enum Fwd {
  WX, XH, ACT, OUT, H0, WHT, C, TC, C0, BIAS, G_IH, G_HH, G_PRE, G_C, B_C,
  M_IH, V_IH, M_HH, V_HH, M_PRE, V_PRE, M_C, V_C, B_IH, B_HH, B_PRE, B_C_FLAGS,
  D_OUT, D_H, D_C, DWX, DWH, W_HH, GS_SUM, GS_IH, GS_HH, GS_PRE, GS_C, GS_BC,
  X_IN, W_IHT, W_IH, XS, GS_WIHT, D_X, N_TENSORS
};

struct Ctx {
  int64_t kind, H, G, N, T, I = 0;
  bool has_ih, ih_seq, has_hh, has_pre, has_c, save;
  // Small input size: W_ih x_t is computed inside the step from x_t (T, N, I) and
  // W_ih^T (I, G) instead of read from a (T, N, G) buffer; the backward recomputes it.
  bool inline_ih = false;
  // The forward's WX, and the backward's DWX and DWH, hold steps [base, ...) of a chunk.
  int64_t base = 0;
  // W_ih x_t computed at each step by the blocks (BlockGemm) from x (T, N, I) and
  // W_ih^T (I, G) into a one-step WX, read back from L1/L2. Else WX is given.
  bool step_ih = false;
  // Without a backward, for a full batch: step t reads x and writes h at time T - 1 - t
  // (the reverse direction without flipping its input and output). Statistics stay
  // indexed by step.
  bool rev = false;
  int64_t row(int64_t t) const { return rev ? T - 1 - t : t; }
  // LSTM with BN of W_ih x and W_hh h (Cooijmans eq. 6) or of the pre-activation (Laurent
  // eq. 17): ACT is a one-step scratch and the backward recomputes the gate activations
  // from xhat_hh (XH) and xhat_ih, or from xhat_pre (WX), which it has anyway (a (T, N, G)
  // buffer less to write, keep and read back)
  bool recompute_act = false;
  std::vector<int64_t> sizes;
  std::vector<c10::optional<at::Tensor>> ts;
  Norm ih, hh, pre, c;

  Ctx(at::IntArrayRef cfg, at::ArrayRef<double> eps, at::IntArrayRef sizes_,
      const c10::List<c10::optional<at::Tensor>>& list)
      : sizes(sizes_.begin(), sizes_.end()) {
    kind = cfg[0];
    has_ih = cfg[1];
    ih_seq = cfg[2];
    has_hh = cfg[3];
    has_pre = cfg[4];
    has_c = cfg[5];
    save = cfg[6];
    H = cfg[7];
    G = cfg[8];
    N = cfg[9];
    inline_ih = cfg.size() > 10 && cfg[10];
    base = cfg.size() > 11 ? cfg[11] : 0;
    step_ih = cfg.size() > 12 && cfg[12];
    rev = cfg.size() > 13 && cfg[13];
    recompute_act = cfg.size() > 14 && cfg[14];
    T = (int64_t)sizes.size();
    TORCH_CHECK(!rev || (!save && (inline_ih || step_ih)), "reversed time: no-grad steps only");
    TORCH_CHECK(!recompute_act || (kind == LSTM && ((has_ih && has_hh) || has_pre)),
                "recomputed gates: LSTM with BN of both terms or of the pre-activation only");
    for (size_t i = 0; i < list.size(); ++i) ts.push_back(list.get(i));
    ts.resize(N_TENSORS);
    if (ts[X_IN].has_value() && ts[X_IN]->defined()) I = ts[X_IN]->size(2);
    setup(ih, has_ih, M_IH, V_IH, B_IH, G, eps[0], ih_seq);
    setup(hh, has_hh, M_HH, V_HH, B_HH, G, eps[1], false);
    setup(pre, has_pre, M_PRE, V_PRE, B_PRE, G, eps[2], false);
    setup(c, has_c, M_C, V_C, B_C_FLAGS, H, eps[3], false);
  }
  void setup(Norm& nm, bool on, int m, int v, int f, int64_t F, double eps, bool seq) {
    nm.on = on;
    if (!on) return;
    nm.M = ts[m]->data_ptr();
    nm.V = ts[v]->data_ptr();
    nm.F = F;
    nm.eps = eps;
    nm.seq = seq;
    if (!seq) nm.flags = ts[f]->data_ptr<uint8_t>();
  }
  at::Tensor& at_(int i) { return *ts[i]; }
  template <typename T> T* ptr(int i) const {
    return ts[i].has_value() && ts[i]->defined() ? ts[i]->data_ptr<T>() : nullptr;
  }
};

// A BN with given statistics (population rows) as an affine map per feature, for w columns
// from col: scale = gamma / sqrt(var + eps); shift -= scale * mean.
template <typename T>
inline void fold_bn(const Norm& nm, int64_t t, int64_t col, int64_t w, const T* __restrict__ gamma,
                    T* __restrict__ scale, T* __restrict__ shift) {
  const T* m = nm.mean<T>(t) + col;
  const T* v = nm.var<T>(t) + col;
  for (int64_t j = 0; j < w; ++j) {
    scale[j] = gamma[j] / std::sqrt(v[j] + T(nm.eps));
    shift[j] -= scale[j] * m[j];
  }
}

// Column statistics of z (n rows, w columns, leading dim ld): mean and biased variance.
template <typename T>
inline void col_stats(const T* __restrict__ z, int64_t ld, int64_t n, int64_t w,
                      T* __restrict__ mean, T* __restrict__ var) {
  T m[CHUNK], v[CHUNK];
  for (int64_t j = 0; j < w; ++j) m[j] = 0, v[j] = 0;
  for (int64_t r = 0; r < n; ++r) {
    const T* row = z + r * ld;
    for (int64_t j = 0; j < w; ++j) m[j] += row[j];
  }
  for (int64_t j = 0; j < w; ++j) m[j] /= T(n);
  for (int64_t r = 0; r < n; ++r) {
    const T* row = z + r * ld;
    for (int64_t j = 0; j < w; ++j) {
      T d = row[j] - m[j];
      v[j] += d * d;
    }
  }
  for (int64_t j = 0; j < w; ++j) mean[j] = m[j], var[j] = v[j] / T(n);
}

// z <- (z - mean) * rstd over n rows of w columns, statistics of step t (computed if batch).
template <typename T>
inline void normalise(T* __restrict__ z, int64_t ld, int64_t n, int64_t w, const Norm& nm,
                      int64_t t, int64_t col) {
  T* mean = nm.mean<T>(t) + col;
  T* var = nm.var<T>(t) + col;
  if (nm.batch_at(t)) col_stats(z, ld, n, w, mean, var);
  T mu[CHUNK], rs[CHUNK];
  for (int64_t j = 0; j < w; ++j) mu[j] = mean[j], rs[j] = T(1) / std::sqrt(var[j] + T(nm.eps));
  for (int64_t r = 0; r < n; ++r) {
    T* row = z + r * ld;
    for (int64_t j = 0; j < w; ++j) row[j] = (row[j] - mu[j]) * rs[j];
  }
}

// For the w columns from col of z (n rows, leading dim ld): q[0..w) the mean, q[CHUNK..) the
// reciprocal standard deviation and q[2 CHUNK..) gamma of the BN nm at step t (its batch
// statistics computed and stored if it has them at t), or 0, 1 and 1 if there is no BN.
template <typename T>
inline void stats_or_identity(const Norm& nm, bool on, int64_t t, const T* z, int64_t ld,
                              int64_t n, int64_t col, int64_t w, const T* gamma, T* q) {
  if (!on) {
    for (int64_t j = 0; j < w; ++j) q[j] = T(0), q[CHUNK + j] = T(1), q[2 * CHUNK + j] = T(1);
    return;
  }
  T* mean = nm.mean<T>(t) + col;
  T* var = nm.var<T>(t) + col;
  if (nm.batch_at(t)) col_stats(z, ld, n, w, mean, var);
  for (int64_t j = 0; j < w; ++j) {
    q[j] = mean[j];
    q[CHUNK + j] = T(1) / std::sqrt(var[j] + T(nm.eps));
    q[2 * CHUNK + j] = gamma[col + j];
  }
}

// out (n rows, w columns, row stride G) = x_t @ W_ih^T for the columns [col, col + w).
template <typename T>
void project(const Ctx& x, int64_t t, int64_t n, int64_t col, int64_t w, T* __restrict__ out,
             int64_t r0 = 0) {
  const int64_t G = x.G, I = x.I;
  const T* X = x.ptr<T>(X_IN) + (x.row(t) * x.N + r0) * I;
  const T* WT = x.ptr<T>(W_IHT) + col;
  for (int64_t r = 0; r < n; ++r) {
    T* o = out + r * G;
    const T* xr = X + r * I;
    const T x0 = xr[0];
    for (int64_t j = 0; j < w; ++j) o[j] = x0 * WT[j];
    for (int64_t i = 1; i < I; ++i) {
      const T xi = xr[i];
      const T* wr = WT + i * G;
      for (int64_t j = 0; j < w; ++j) o[j] += xi * wr[j];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Forward: one step for hidden units [j0, j1).

template <typename T>
void forward_block(Ctx& x, int64_t t, int64_t n_all, int64_t j0, int64_t j1, int64_t r0,
                   int64_t r1) {
  // rows [r0, r1) of the batch (all of them unless rows are split, see forward_impl): every
  // pointer starts at row r0, n rows of them are present at t
  const int64_t H = x.H, G = x.G, N = x.N, Nr = r1 - r0;
  const int64_t n = std::clamp<int64_t>(n_all - r0, 0, Nr);
  const int64_t s = x.save ? t : 0;
  const int64_t gates = G / H;
  T* wx = x.ptr<T>(WX) + (x.inline_ih || x.step_ih ? 0 : t - x.base) * N * G + r0 * G;
  T* wh = x.ptr<T>(XH) + (x.has_hh ? s : 0) * N * G + r0 * G;
  T* act = x.ptr<T>(ACT) + (x.kind == LSTM && !x.recompute_act ? s : 0) * N * G + r0 * G;
  T* out = x.ptr<T>(OUT) + x.row(t) * N * H + r0 * H;
  const T* bias = x.ptr<T>(BIAS);
  const T* g_ih = x.ptr<T>(G_IH);
  const T* g_hh = x.ptr<T>(G_HH);
  const T* g_pre = x.ptr<T>(G_PRE);
  // Population statistics and nothing kept for a backward: every BN is an affine map per
  // feature, so the pre-activation is one pass a = wh * A + wx * B + C.
  const bool affine =
      !x.save && !x.pre.batch_at(t) && !x.hh.batch_at(t) && !x.ih.batch_at(t);
  const bool affine_c = !x.save && !x.c.batch_at(t);
  for (int64_t ja = j0; ja < j1; ja += CHUNK) {
    const int64_t w = std::min(CHUNK, j1 - ja);
    if (affine && affine_c && x.kind == LSTM) {  // evaluation: lstm_affine_row per row
      alignas(64) T co[18 * CHUNK];  // 14 arrays of coefficients, then lstm_affine_row's 4
      for (int64_t k = 0; k < 4; ++k) {
        const int64_t col = k * H + ja;
        if (x.inline_ih) project(x, t, n, col, w, wx + col, r0);
        T* A = co + k * CHUNK;
        T* B = co + (4 + k) * CHUNK;
        T* Cst = co + (8 + k) * CHUNK;
        for (int64_t j = 0; j < w; ++j) {
          A[j] = T(1), B[j] = T(1), Cst[j] = bias ? bias[col + j] : T(0);
        }
        if (x.has_hh) fold_bn(x.hh, t, col, w, g_hh + col, A, Cst);
        if (x.has_ih) fold_bn(x.ih, t, col, w, g_ih + col, B, Cst);
        if (x.has_pre) {  // Laurent eq. 17 with population statistics: one scale for both
          fold_bn(x.pre, t, col, w, g_pre + col, A, Cst);
          std::copy(A, A + w, B);
        }
      }
      T* Ac = co + 12 * CHUNK;
      T* Cc = co + 13 * CHUNK;
      for (int64_t j = 0; j < w; ++j) Ac[j] = T(1), Cc[j] = T(0);
      if (x.has_c) {  // Cooijmans eq. 8 with population statistics
        std::copy(x.ptr<T>(B_C) + ja, x.ptr<T>(B_C) + ja + w, Cc);
        fold_bn(x.c, t, ja, w, x.ptr<T>(G_C) + ja, Ac, Cc);
      }
      T* c = x.ptr<T>(C) + r0 * H;  // one step, c_{t-1} in and c_t out
      for (int64_t r = 0; r < n; ++r)
        lstm_affine_row<T>(w, H, wh + r * G + ja, wx + r * G + ja, co, c + r * H + ja,
                           out + r * H + ja, co + 14 * CHUNK);
      for (int64_t r = n; r < Nr; ++r) std::memset(out + r * H + ja, 0, w * sizeof(T));
      continue;
    }
    if (x.kind == LSTM && !x.has_pre) {  // training: the same in three passes per row
      T co[28 * CHUNK];
      for (int64_t k = 0; k < 4; ++k) {
        const int64_t col = k * H + ja;
        if (x.inline_ih) project(x, t, n, col, w, wx + col, r0);
        T* q = co + 7 * k * CHUNK;
        stats_or_identity(x.hh, x.has_hh, t, wh + col, G, n, col, w, g_hh, q);
        stats_or_identity(x.ih, x.has_ih, t, wx + col, G, n, col, w, g_ih, q + 3 * CHUNK);
        for (int64_t j = 0; j < w; ++j) q[6 * CHUNK + j] = bias ? bias[col + j] : T(0);
      }
      T* c = x.ptr<T>(C) + s * N * H + r0 * H;
      const bool inplace = !x.save;  // one-step C: c_{t-1} in, c_t out
      const T* c_prev = inplace ? nullptr
                        : t == 0  ? x.ptr<T>(C0) + r0 * H
                                  : x.ptr<T>(C) + (t - 1) * N * H + r0 * H;
      for (int64_t r = 0; r < n; ++r) {
        T* a = act + r * G + ja;
        for (int64_t k = 0; k < 4; ++k) {
          const int64_t o = r * G + k * H + ja;
          if (x.inline_ih || x.step_ih) {  // WX is one step: xhat_ih is recomputed later
            bn_gate_row<T, false>(w, wh + o, wx + o, co + 7 * k * CHUNK, act + o);
          } else {
            bn_gate_row<T, true>(w, wh + o, wx + o, co + 7 * k * CHUNK, act + o);
          }
        }
        if (inplace) {
          lstm_cell_row<T, true>(w, H, a, nullptr, c + r * H + ja);
        } else {
          lstm_cell_row<T, false>(w, H, a, c_prev + r * H + ja, c + r * H + ja);
        }
      }
      T* q = co;  // BN(c) as mean, rstd, gamma, beta
      if (x.has_c) {
        stats_or_identity(x.c, true, t, c + ja, H, n, ja, w, x.ptr<T>(G_C), q);
        std::copy(x.ptr<T>(B_C) + ja, x.ptr<T>(B_C) + ja + w, q + 3 * CHUNK);
      } else {
        stats_or_identity(x.c, false, t, c + ja, H, n, ja, w, x.ptr<T>(G_C), q);
        std::fill(q + 3 * CHUNK, q + 3 * CHUNK + w, T(0));
      }
      for (int64_t r = 0; r < n; ++r)
        lstm_out_row<T>(w, c + r * H + ja, act + r * G + 3 * H + ja, q, q + CHUNK,
                        q + 2 * CHUNK, q + 3 * CHUNK, out + r * H + ja);
      for (int64_t r = n; r < Nr; ++r) std::memset(out + r * H + ja, 0, w * sizeof(T));
      continue;
    }
    for (int64_t k = 0; k < gates && affine; ++k) {
      const int64_t col = k * H + ja;
      if (x.inline_ih) project(x, t, n, col, w, wx + col, r0);
      T A[CHUNK], B[CHUNK], Cst[CHUNK];
      for (int64_t j = 0; j < w; ++j) {
        A[j] = T(1), B[j] = T(1), Cst[j] = bias ? bias[col + j] : T(0);
      }
      if (x.has_hh) fold_bn(x.hh, t, col, w, g_hh + col, A, Cst);
      if (x.has_ih) fold_bn(x.ih, t, col, w, g_ih + col, B, Cst);
      if (x.has_pre) {  // Laurent eq. 17 with population statistics: one scale for both terms
        fold_bn(x.pre, t, col, w, g_pre + col, A, Cst);
        std::copy(A, A + w, B);
      }
      const bool is_tanh = (x.kind == LSTM && k == 2) || x.kind == RNN_TANH;
      auto row = x.kind == RNN_RELU ? affine_act_row<T, 2>
                 : is_tanh            ? affine_act_row<T, 1>
                                      : affine_act_row<T, 0>;
      for (int64_t r = 0; r < n; ++r)
        row(act + r * G + col, wx + r * G + col, wh + r * G + col, A, B, Cst, w);
    }
    for (int64_t k = 0; k < gates && !affine; ++k) {
      const int64_t col = k * H + ja;
      if (x.inline_ih) project(x, t, n, col, w, wx + col, r0);
      if (x.has_hh) normalise(wh + col, G, n, w, x.hh, t, col);
      if (x.has_ih) normalise(wx + col, G, n, w, x.ih, t, col);
      // pre-activation into act
      for (int64_t r = 0; r < n; ++r) {
        const T* a = wx + r * G + col;
        const T* b = wh + r * G + col;
        T* o = act + r * G + col;
        if (x.has_ih && x.has_hh) {
          for (int64_t j = 0; j < w; ++j) o[j] = a[j] * g_ih[col + j] + b[j] * g_hh[col + j];
        } else if (x.has_ih) {
          for (int64_t j = 0; j < w; ++j) o[j] = a[j] * g_ih[col + j] + b[j];
        } else {
          for (int64_t j = 0; j < w; ++j) o[j] = a[j] + b[j];
        }
      }
      if (x.has_pre) {  // Laurent eq. 17: xhat of the whole pre-activation, kept in WX
        for (int64_t r = 0; r < n; ++r) {
          T* o = act + r * G + col;
          T* a = wx + r * G + col;
          for (int64_t j = 0; j < w; ++j) a[j] = o[j];
        }
        normalise(wx + col, G, n, w, x.pre, t, col);
        for (int64_t r = 0; r < n; ++r) {
          T* o = act + r * G + col;
          const T* a = wx + r * G + col;
          for (int64_t j = 0; j < w; ++j) o[j] = a[j] * g_pre[col + j];
        }
      }
      const bool is_tanh = (x.kind == LSTM && k == 2) || x.kind == RNN_TANH;
      for (int64_t r = 0; r < n; ++r) {
        T* o = act + r * G + col;
        if (bias) {
          for (int64_t j = 0; j < w; ++j) o[j] += bias[col + j];
        }
        if (x.kind == RNN_RELU) {
          for (int64_t j = 0; j < w; ++j) o[j] = o[j] > T(0) ? o[j] : T(0);
        } else if (is_tanh) {
          tanh_row(o, w);
        } else {
          sigmoid_row(o, w);
        }
      }
    }
    if (x.kind != LSTM) {  // h = act
      for (int64_t r = 0; r < n; ++r)
        std::memcpy(out + r * H + ja, act + r * G + ja, w * sizeof(T));
    } else {
      T* c = x.ptr<T>(C) + s * N * H + r0 * H;
      const T* c_prev = (t == 0 || !x.save) ? (x.save ? x.ptr<T>(C0) + r0 * H : c)
                                            : x.ptr<T>(C) + (t - 1) * N * H + r0 * H;
      T* tc = x.ptr<T>(TC) + r0 * H;  // one step: the backward recomputes it
      T Ac[CHUNK], Cc[CHUNK];  // BN(c) as an affine map (population statistics)
      for (int64_t j = 0; j < w; ++j) Ac[j] = T(1), Cc[j] = T(0);
      if (x.has_c && affine_c) {
        std::copy(x.ptr<T>(B_C) + ja, x.ptr<T>(B_C) + ja + w, Cc);
        fold_bn(x.c, t, ja, w, x.ptr<T>(G_C) + ja, Ac, Cc);
      }
      for (int64_t r = 0; r < n; ++r) {
        const T* a = act + r * G + ja;
        const T* cp = c_prev + r * H + ja;
        T* cr = c + r * H + ja;
        T* tr = tc + r * H + ja;
        for (int64_t j = 0; j < w; ++j) {
          T v = a[H + j] * cp[j] + a[j] * a[2 * H + j];
          cr[j] = v;
          tr[j] = v * Ac[j] + Cc[j];
        }
      }
      if (x.has_c && !affine_c) {  // Cooijmans eq. 8: BN(c_t; gamma_c, beta_c)
        normalise(tc + ja, H, n, w, x.c, t, ja);
        const T* g_c = x.ptr<T>(G_C) + ja;
        const T* b_c = x.ptr<T>(B_C) + ja;
        for (int64_t r = 0; r < n; ++r) {
          T* tr = tc + r * H + ja;
          for (int64_t j = 0; j < w; ++j) tr[j] = tr[j] * g_c[j] + b_c[j];
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        const T* a = act + r * G + ja;
        T* tr = tc + r * H + ja;
        T* o = out + r * H + ja;
        tanh_mul_row(tr, o, a + 3 * H, w);
      }
    }
    for (int64_t r = n; r < Nr; ++r) std::memset(out + r * H + ja, 0, w * sizeof(T));
  }
}

// Bytes of W_hh (and W_ih) up to which a forward without batch statistics splits the batch
// rows over threads instead of the hidden units (set_row_split_bytes).
int64_t g_row_split_bytes = 1 << 21;

// Without batch statistics and without a backward, the rows of the batch are independent
// for the whole sequence: each thread runs all steps for its own rows, with no barrier
// between steps, reading all of W_hh (small enough to stay in its L2).
template <typename T>
bool forward_rows(Ctx& x, int64_t t0, int64_t t1) {
  const int64_t N = x.N, H = x.H, G = x.G;
  const int64_t K = H + (x.step_ih ? x.I : 0);
  const int64_t nth = std::min<int64_t>(n_blocks(N * G * K), N);
  if (x.save || nth < 2 || at::in_parallel_region() || K * G * (int64_t)sizeof(T) > g_row_split_bytes)
    return false;
  for (int64_t t = t0; t < t1; ++t)
    if (x.ih.batch_at(t) || x.hh.batch_at(t) || x.pre.batch_at(t) || x.c.batch_at(t)) return false;
  Blocks bl(H, 1);
  BlockGemm gh(x.at_(WHT), H, G / H, bl, (N + nth - 1) / nth);
  c10::optional<BlockGemm> gi;
  if (x.step_ih) gi.emplace(x.at_(W_IHT), H, G / H, bl, (N + nth - 1) / nth);
  FirstError first;
#pragma omp parallel num_threads(nth)
  {
    MklOneThread one;
    const int64_t tid = omp_get_thread_num(), k = omp_get_num_threads();
    const int64_t r0 = N * tid / k, r1 = N * (tid + 1) / k;
    first.run([&] {
      for (int64_t t = t0; t < t1 && r1 > r0; ++t) {
        const int64_t m = std::clamp<int64_t>(x.sizes[t] - r0, 0, r1 - r0);
        const T* h_prev = t == 0 ? x.ptr<T>(H0) : x.ptr<T>(OUT) + x.row(t - 1) * N * H;
        T* wh = x.ptr<T>(XH);  // one step (nothing is saved here)
        gh.run<T>(0, h_prev + r0 * H, wh + r0 * G, m);
        if (gi) gi->run<T>(0, x.ptr<T>(X_IN) + (x.row(t) * N + r0) * x.I, x.ptr<T>(WX) + r0 * G, m);
        forward_block<T>(x, t, x.sizes[t], 0, H, r0, r1);
      }
    });
  }
  first.rethrow();
  return true;
}

template <typename T>
void forward_impl(Ctx& x, int64_t t0, int64_t t1) {
  if (forward_rows<T>(x, t0, t1)) return;
  const int64_t N = x.N, H = x.H, G = x.G;
  Blocks bl(H, n_blocks(N * G * (H + (x.step_ih ? x.I : 0))));
  BlockGemm gh(x.at_(WHT), H, G / H, bl, N);
  c10::optional<BlockGemm> gi;
  if (x.step_ih) gi.emplace(x.at_(W_IHT), H, G / H, bl, N);
  for_steps(bl, t1 - t0, [&](int64_t i, int64_t p) {
    const int64_t t = t0 + i;
    const int64_t n = x.sizes[t];
    const int64_t s = x.save ? t : 0;
    const T* h_prev = t == 0 ? x.ptr<T>(H0) : x.ptr<T>(OUT) + x.row(t - 1) * N * H;
    T* wh = x.ptr<T>(XH) + (x.has_hh ? s : 0) * N * G;
    gh.run<T>(p, h_prev, wh, n);
    if (gi) gi->run<T>(p, x.ptr<T>(X_IN) + x.row(t) * N * x.I, x.ptr<T>(WX), n);
    forward_block<T>(x, t, n, bl.j0[p], bl.j1[p], 0, N);
  });
}

// ---------------------------------------------------------------------------------------
// Backward: one step for hidden units [j0, j1).

// Per column of da (n rows): sum(da) and sum(da * xhat) for each BN present.
template <typename T>
void bn_backward_cols(Ctx& x, int64_t t, int64_t n, int64_t col, int64_t w, T* __restrict__ da,
                      T* __restrict__ dwh, const T* __restrict__ xih, const T* __restrict__ xhh) {
  const int64_t G = x.G, N = x.N;
  T s1[CHUNK] = {}, sih[CHUNK] = {}, shh[CHUNK] = {};
  for (int64_t r = 0; r < n; ++r) {
    const T* d = da + r * G;
    for (int64_t j = 0; j < w; ++j) s1[j] += d[j];
    if (xih) {
      const T* a = xih + r * G;
      for (int64_t j = 0; j < w; ++j) sih[j] += d[j] * a[j];
    }
    if (xhh) {
      const T* b = xhh + r * G;
      for (int64_t j = 0; j < w; ++j) shh[j] += d[j] * b[j];
    }
  }
  T* gsum = x.ptr<T>(GS_SUM) + col;
  for (int64_t j = 0; j < w; ++j) gsum[j] += s1[j];
  // the BN on the input side (ih, or pre for Laurent eq. 17) writes in place into da = DWX
  const Norm& nin = x.has_pre ? x.pre : x.ih;
  T* gin = x.has_pre ? x.ptr<T>(GS_PRE) : x.ptr<T>(GS_IH);
  const T* gam_in = x.has_pre ? x.ptr<T>(G_PRE) : x.ptr<T>(G_IH);
  if (xih) {
    for (int64_t j = 0; j < w; ++j) gin[col + j] += sih[j];
  }
  if (xhh) {
    T* ghh = x.ptr<T>(GS_HH);
    for (int64_t j = 0; j < w; ++j) ghh[col + j] += shh[j];
  }
  // dwh first (reads da), then the input side in place
  if (dwh) {
    if (xhh) {
      const T* var = x.hh.var<T>(t) + col;
      const T* gam = x.ptr<T>(G_HH) + col;
      T sc[CHUNK], m1[CHUNK], m2[CHUNK];
      const bool batch = x.hh.batch_at(t);
      for (int64_t j = 0; j < w; ++j) {
        sc[j] = gam[j] / std::sqrt(var[j] + T(x.hh.eps));
        m1[j] = batch ? s1[j] / T(n) : T(0);
        m2[j] = batch ? shh[j] / T(n) : T(0);
      }
      for (int64_t r = 0; r < n; ++r) {
        const T* d = da + r * G;
        const T* b = xhh + r * G;
        T* o = dwh + r * G;
        for (int64_t j = 0; j < w; ++j) o[j] = (d[j] - m1[j] - b[j] * m2[j]) * sc[j];
      }
    } else {
      for (int64_t r = 0; r < n; ++r) std::memcpy(dwh + r * G, da + r * G, w * sizeof(T));
    }
    for (int64_t r = n; r < N; ++r) std::memset(dwh + r * G, 0, w * sizeof(T));
  }
  if (xih && !(x.has_ih && x.ih_seq)) {
    const T* var = nin.var<T>(t) + col;
    const T* gam = gam_in + col;
    T sc[CHUNK], m1[CHUNK], m2[CHUNK];
    const bool batch = nin.batch_at(t);
    for (int64_t j = 0; j < w; ++j) {
      sc[j] = gam[j] / std::sqrt(var[j] + T(nin.eps));
      m1[j] = batch ? s1[j] / T(n) : T(0);
      m2[j] = batch ? sih[j] / T(n) : T(0);
    }
    for (int64_t r = 0; r < n; ++r) {
      T* d = da + r * G;
      const T* a = xih + r * G;
      for (int64_t j = 0; j < w; ++j) d[j] = (d[j] - m1[j] - a[j] * m2[j]) * sc[j];
    }
  }
  for (int64_t r = n; r < N; ++r) std::memset(da + r * G, 0, w * sizeof(T));
}

// One row of an LSTM step's backward, w units: from the gate activations a (i, f, g, o at
// offsets 0, H, 2H, 3H), tr = tanh(BN(c_t)), dL/dh_t from the output (dr) and from step
// t + 1 (hr), c_t (cr), c_{t-1} (cp) and dL/d(BN(c_t)) (sr): d, the gradients of the four
// pre-activations, and dcr, dL/dc_t from step t + 1 in, dL/dc_{t-1} out. Out of line with
// restrict parameters and BN(c) as a template flag, so that gcc vectorises it.
template <typename T, bool BN_C>
__attribute__((noinline)) void lstm_gate_grads(
    int64_t w, int64_t H, const T* __restrict__ a, const T* __restrict__ tr,
    const T* __restrict__ dr, const T* __restrict__ hr, const T* __restrict__ cr,
    const T* __restrict__ cp, const T* __restrict__ sr, T* __restrict__ dcr, T* __restrict__ d,
    const T* __restrict__ m1, const T* __restrict__ m2, const T* __restrict__ mu,
    const T* __restrict__ rs, const T* __restrict__ sc) {
  for (int64_t j = 0; j < w; ++j) {
    T dcb = sr[j];
    if (BN_C) dcb = (dcb - m1[j] - (cr[j] - mu[j]) * rs[j] * m2[j]) * sc[j];
    const T dc = dcr[j] + dcb;
    const T i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
    const T dh = dr[j] + hr[j];
    d[j] = dc * g * i * (T(1) - i);
    d[H + j] = dc * cp[j] * f * (T(1) - f);
    d[2 * H + j] = dc * i * (T(1) - g * g);
    d[3 * H + j] = dh * tr[j] * o * (T(1) - o);
    dcr[j] = dc * f;
  }
}

// One row of the gate activations as the forward computed them, w units, for the four
// gates at offsets 0, H, 2H, 3H (sigmoid, sigmoid, tanh, sigmoid): TWO: a = act(xhat_ih g_ih
// + xhat_hh g_hh + b) (bn_gate_row, then lstm_cell_row); else a = act(xhat_pre g_pre + b)
// (Laurent eq. 17, xh and gh unused).
template <typename T, bool TWO>
__attribute__((noinline)) void lstm_act_row(int64_t w, int64_t H, const T* __restrict__ xi,
                                            const T* __restrict__ xh, const T* __restrict__ gi,
                                            const T* __restrict__ gh, const T* __restrict__ b,
                                            T* __restrict__ a) {
  auto pre = [&](int64_t o, int64_t j) {
    return TWO ? xi[o + j] * gi[o + j] + xh[o + j] * gh[o + j] + b[o + j]
               : xi[o + j] * gi[o + j] + b[o + j];
  };
  for (int64_t k = 0; k < 4; ++k) {  // (one loop per function: vectorised, no blend)
    const int64_t o = k * H;
    if (k == 2) {
      for (int64_t j = 0; j < w; ++j) a[o + j] = th<T>(pre(o, j));
    } else {
      for (int64_t j = 0; j < w; ++j) a[o + j] = sigm<T>(pre(o, j));
    }
  }
}

template <typename T>
void backward_block(Ctx& x, int64_t t, int64_t n, int64_t j0, int64_t j1, T* scratch, T* tc,
                    const T* zero_bias) {
  const int64_t H = x.H, G = x.G, N = x.N;
  const int64_t gates = G / H;
  const T* dout = x.ptr<T>(D_OUT) + t * N * H;
  T* dh_buf = x.ptr<T>(D_H);
  // da is computed here and the BN backward is done in place; with the inline projection
  // and a separate DWH, DWX is a one-step scratch.
  T* da = x.ptr<T>(DWX) + (x.at_(DWX).size(0) == 1 ? 0 : t - x.base) * N * G;
  T* dwx_sep = x.ptr<T>(DWH);
  T* dwh = (dwx_sep == x.ptr<T>(DWX)) ? nullptr : dwx_sep + (t - x.base) * N * G;
  const T* xih = nullptr;
  if ((x.inline_ih || x.step_ih) && x.has_ih) {
    xih = x.ptr<T>(XS);  // recomputed for this block's columns (below, or by the caller)
  } else if (x.has_ih || x.has_pre) {
    xih = x.ptr<T>(WX) + (t - x.base) * N * G;  // WX holds the chunk's steps
  }
  const T* xhh = x.has_hh ? x.ptr<T>(XH) + t * N * G : nullptr;
  T* act = x.ptr<T>(ACT) + (x.recompute_act ? 0 : t) * N * G;
  for (int64_t ja = j0; ja < j1; ja += CHUNK) {
    const int64_t w = std::min(CHUNK, j1 - ja);
    // xhat_ih = (W_ih x_t - mean) * rstd for the columns from col, when W_ih x_t is
    // recomputed (step_ih: the caller's GEMM put it in XS; inline: computed here)
    auto prepare_xih = [&](int64_t col) {
      if (!((x.inline_ih || x.step_ih) && x.has_ih)) return;
      T* xs = x.ptr<T>(XS) + col;
      if (x.inline_ih) project(x, t, n, col, w, xs);
      const T* mean = x.ih.mean<T>(t) + col;
      const T* var = x.ih.var<T>(t) + col;
      T rs[CHUNK];
      for (int64_t j = 0; j < w; ++j) rs[j] = T(1) / std::sqrt(var[j] + T(x.ih.eps));
      for (int64_t r = 0; r < n; ++r) {
        T* row = xs + r * G;
        for (int64_t j = 0; j < w; ++j) row[j] = (row[j] - mean[j]) * rs[j];
      }
    };
    if (x.recompute_act) {  // the gate activations of the chunk's units, as the forward did
      for (int64_t k = 0; k < gates; ++k) prepare_xih(k * H + ja);
      const T* bias = x.ptr<T>(BIAS) ? x.ptr<T>(BIAS) : zero_bias;
      for (int64_t r = 0; r < n; ++r) {
        if (x.has_pre) {  // xih: xhat_pre, kept
          lstm_act_row<T, false>(w, H, xih + r * G + ja, nullptr, x.ptr<T>(G_PRE) + ja, nullptr,
                                 bias + ja, act + r * G + ja);
        } else {
          lstm_act_row<T, true>(w, H, xih + r * G + ja, xhh + r * G + ja, x.ptr<T>(G_IH) + ja,
                                x.ptr<T>(G_HH) + ja, bias + ja, act + r * G + ja);
        }
      }
    }
    if (x.kind == LSTM) {
      const T* c = x.ptr<T>(C) + t * N * H;
      const T* c_prev = t == 0 ? x.ptr<T>(C0) : x.ptr<T>(C) + (t - 1) * N * H;
      T* dc_buf = x.ptr<T>(D_C);
      // dcout = dL/d(BN(c)) (or dL/dc without BN(c)), kept in scratch (n, CHUNK)
      T s1[CHUNK] = {}, s2[CHUNK] = {}, mu[CHUNK], rs[CHUNK];
      if (x.has_c) {
        const T* mean = x.c.mean<T>(t) + ja;
        const T* var = x.c.var<T>(t) + ja;
        for (int64_t j = 0; j < w; ++j)
          mu[j] = mean[j], rs[j] = T(1) / std::sqrt(var[j] + T(x.c.eps));
      }
      // tc = tanh(BN(c_t)) (or tanh(c_t)) recomputed as the forward did, in scratch (n, CHUNK)
      for (int64_t r = 0; r < n; ++r) {
        const T* cr = c + r * H + ja;
        T* tr = tc + r * CHUNK;
        if (x.has_c) {
          const T* g_c = x.ptr<T>(G_C) + ja;
          const T* b_c = x.ptr<T>(B_C) + ja;
          for (int64_t j = 0; j < w; ++j) tr[j] = (cr[j] - mu[j]) * rs[j] * g_c[j] + b_c[j];
        } else {
          for (int64_t j = 0; j < w; ++j) tr[j] = cr[j];
        }
        tanh_row(tr, w);
      }
      for (int64_t r = 0; r < n; ++r) {
        const T* a = act + r * G + ja;
        const T* tr = tc + r * CHUNK;
        const T* dr = dout + r * H + ja;
        const T* hr = dh_buf + r * H + ja;
        const T* cr = c + r * H + ja;
        T* sr = scratch + r * CHUNK;
        for (int64_t j = 0; j < w; ++j) {
          T dh = dr[j] + hr[j];
          T v = dh * a[3 * H + j] * (T(1) - tr[j] * tr[j]);
          sr[j] = v;
          if (x.has_c) {
            T xc = (cr[j] - mu[j]) * rs[j];
            s1[j] += v;
            s2[j] += v * xc;
          }
        }
      }
      T sc[CHUNK], m1[CHUNK], m2[CHUNK];
      if (x.has_c) {
        T* gbc = x.ptr<T>(GS_BC) + ja;
        T* gc = x.ptr<T>(GS_C) + ja;
        const T* gam = x.ptr<T>(G_C) + ja;
        const bool batch = x.c.batch_at(t);
        for (int64_t j = 0; j < w; ++j) {
          gbc[j] += s1[j];
          gc[j] += s2[j];
          sc[j] = gam[j] * rs[j];
          m1[j] = batch ? s1[j] / T(n) : T(0);
          m2[j] = batch ? s2[j] / T(n) : T(0);
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t o = r * H + ja;
        auto kernel = x.has_c ? lstm_gate_grads<T, true> : lstm_gate_grads<T, false>;
        kernel(w, H, act + r * G + ja, tc + r * CHUNK, dout + o, dh_buf + o, c + o, c_prev + o,
               scratch + r * CHUNK, dc_buf + o, da + r * G + ja, m1, m2, mu, rs, sc);
      }
    } else {
      const T* h = x.ptr<T>(OUT) + t * N * H;
      for (int64_t r = 0; r < n; ++r) {
        const T* hr = h + r * H + ja;
        const T* dr = dout + r * H + ja;
        const T* br = dh_buf + r * H + ja;
        T* d = da + r * G + ja;
        if (x.kind == RNN_TANH) {
          for (int64_t j = 0; j < w; ++j) d[j] = (dr[j] + br[j]) * (T(1) - hr[j] * hr[j]);
        } else {
          for (int64_t j = 0; j < w; ++j) d[j] = hr[j] > T(0) ? dr[j] + br[j] : T(0);
        }
      }
    }
    for (int64_t k = 0; k < gates; ++k) {
      const int64_t col = k * H + ja;
      if (!x.recompute_act) prepare_xih(col);
      bn_backward_cols<T>(x, t, n, col, w, da + col, dwh ? dwh + col : nullptr,
                          xih ? xih + col : nullptr, xhh ? xhh + col : nullptr);
      if (x.inline_ih) {  // dW_ih^T (I, G) += x_t^T @ dwx_t, this block's columns
        const T* X = x.ptr<T>(X_IN) + t * N * x.I;
        T* gw = x.ptr<T>(GS_WIHT) + col;
        for (int64_t i = 0; i < x.I; ++i) {
          T acc[CHUNK] = {};
          for (int64_t r = 0; r < n; ++r) {
            const T xi = X[r * x.I + i];
            const T* d = da + col + r * G;
            for (int64_t j = 0; j < w; ++j) acc[j] += xi * d[j];
          }
          T* g = gw + i * G;
          for (int64_t j = 0; j < w; ++j) g[j] += acc[j];
        }
      }
    }
  }
}

template <typename T>
void backward_impl(Ctx& x, int64_t t0, int64_t t1) {
  const int64_t N = x.N, H = x.H, G = x.G;
  // Block p computes the gate and BN gradients of its units, then its part of
  // dh_{t-1} = da_t W_hh over its own columns of da (its gates' rows of W_hh) into a partial
  // sum P[t % 2][p] (N, H); at step t - 1 it adds the partials up for its units. Nothing
  // waits on another block within a step (one barrier per step), and each block multiplies
  // what it just computed. P alternates between two buffers: at step t - 1 a block writes
  // one while another may still read the other. A single block writes dh itself.
  Blocks bl(H, n_blocks(N * G * H));
  const int64_t nb = bl.size();
  RowGemm gh(x.at_(W_HH), H, bl, N);
  // step_ih: W_ih x_t recomputed at each step by the blocks for their own columns (read
  // back from L1/L2) instead of a GEMM over the chunk before the loop and a pass to
  // normalise it
  c10::optional<BlockGemm> gi;
  if (x.step_ih && x.has_ih) gi.emplace(x.at_(W_IHT), H, G / H, bl, N);
  T* dh = x.ptr<T>(D_H);
  at::Tensor partial_t;
  if (nb > 1) partial_t = at::empty({2, nb, N, H}, x.at_(W_HH).options());
  T* partial = nb > 1 ? partial_t.data_ptr<T>() : nullptr;
  // per block: dL/d(BN(c_t)) and tanh(BN(c_t)), (N, CHUNK) each
  std::vector<std::vector<T>> scratch(nb, std::vector<T>(2 * N * CHUNK));
  std::vector<T> zero_bias(x.recompute_act && !x.ptr<T>(BIAS) ? G : 0, T(0));
  x.base = t0;
  // dh[:rows, units of block p] = sum of the partials of buffer b
  auto gather = [&](int64_t b, int64_t rows, int64_t p) {
    const int64_t j0 = bl.j0[p], w = bl.j1[p] - j0;
    for (int64_t r = 0; r < rows; ++r) {
      T* o = dh + r * H + j0;
      const T* a = partial + (b * nb * N + r) * H + j0;
      std::copy(a, a + w, o);
      for (int64_t q = 1; q < nb; ++q) {
        const T* c = a + q * N * H;
        for (int64_t j = 0; j < w; ++j) o[j] += c[j];
      }
    }
  };
  for_steps(bl, t1 - t0 + (nb > 1), [&](int64_t i, int64_t p) {
    const int64_t t = t1 - 1 - i;
    if (t < t0) {  // after the last step: dL/dh_{t0 - 1}
      gather(t0 % 2, x.sizes[t0], p);
      return;
    }
    const int64_t n = x.sizes[t];
    // rows beyond the sequences present at t + 1 keep dh as it came in (dL/dh_n)
    if (nb > 1 && t + 1 < t1) gather((t + 1) % 2, x.sizes[t + 1], p);
    T* s = scratch[p].data();
    if (gi) gi->run<T>(p, x.ptr<T>(X_IN) + t * N * x.I, x.ptr<T>(XS), n);
    backward_block<T>(x, t, n, bl.j0[p], bl.j1[p], s, s + N * CHUNK, zero_bias.data());
    const T* dwh = x.ptr<T>(DWH) + (t - t0) * N * G;
    gh.run<T>(p, dwh, nb > 1 ? partial + ((t % 2) * nb + p) * N * H : dh, n);
  });
  if (x.inline_ih && x.ts[D_X].has_value() && x.ts[D_X]->defined()) {
    // dx_t = dL/d(W_ih x_t) W_ih for the chunk's steps (DWX holds them: rows beyond each
    // step's sequences are zero)
    const int64_t k = t1 - t0;
    at::Tensor dx = x.at_(D_X).narrow(0, t0, k).view({k * N, x.I});
    at::mm_out(dx, x.at_(DWX).narrow(0, 0, k).view({k * N, G}), x.at_(W_IH));
  }
}

void check(const Ctx& x) {
  TORCH_CHECK(x.ts[WX].has_value() && x.ts[WX]->device().is_cpu(), "bnrnn_fast: CPU tensors");
  for (size_t i = 0; i < x.ts.size(); ++i) {  // W_hh^T may be a view (see BlockGemm)
    const auto& t = x.ts[i];
    if (i != WHT && t.has_value() && t->defined())
      TORCH_CHECK(t->is_contiguous(), "bnrnn_fast: tensors must be contiguous");
  }
}

void forward_loop(at::IntArrayRef cfg, at::ArrayRef<double> eps, at::IntArrayRef sizes,
                  const c10::List<c10::optional<at::Tensor>>& tensors, int64_t t0, int64_t t1) {
  Ctx x(cfg, eps, sizes, tensors);
  check(x);
  TORCH_CHECK(x.I > 0 || !(x.inline_ih || x.step_ih), "bnrnn_fast: x is needed");
  AT_DISPATCH_FLOATING_TYPES(x.at_(WX).scalar_type(), "bnrnn_fast_forward",
                             [&] { forward_impl<scalar_t>(x, t0, t1); });
}

void backward_loop(at::IntArrayRef cfg, at::ArrayRef<double> eps, at::IntArrayRef sizes,
                   const c10::List<c10::optional<at::Tensor>>& tensors, int64_t t0, int64_t t1) {
  Ctx x(cfg, eps, sizes, tensors);
  check(x);
  AT_DISPATCH_FLOATING_TYPES(x.at_(WX).scalar_type(), "bnrnn_fast_backward",
                             [&] { backward_impl<scalar_t>(x, t0, t1); });
}

int64_t set_row_split_bytes(int64_t bytes) {
  const int64_t old = g_row_split_bytes;
  if (bytes >= 0) g_row_split_bytes = bytes;
  return old;
}

int64_t set_block_macs(int64_t macs) {
  const int64_t old = g_block_macs;
  if (macs > 0) g_block_macs = macs;
  return old;
}

int64_t set_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cache_limit: negative limit");
  std::lock_guard<std::mutex> lock(cache().mu);
  const int64_t old = (int64_t)cache().limit;
  cache().limit = (size_t)bytes;
  return old;
}

void empty_cache() { cache().release(); }

std::vector<int64_t> cache_info() {  // free bytes kept, free blocks kept, limit
  std::lock_guard<std::mutex> lock(cache().mu);
  return {(int64_t)cache().free_bytes, (int64_t)cache().free_blocks.size(),
          (int64_t)cache().limit};
}

bool set_gemm(std::string name) {
  TORCH_CHECK(name == "brgemm" || name == "packed" || name == "mm", "unknown GEMM ", name);
  g_gemm = name == "brgemm" ? BRGEMM : name == "packed" ? PACKED : MM;
  return g_gemm != PACKED || mkl().ok();
}

}  // namespace

TORCH_LIBRARY(bnrnn_fast, m) {
  m.def("forward_loop(int[] cfg, float[] eps, int[] sizes, Tensor?[] tensors, int t0, int t1) -> ()",
        &forward_loop);
  m.def("backward_loop(int[] cfg, float[] eps, int[] sizes, Tensor?[] tensors, int t0, int t1) -> ()",
        &backward_loop);
  m.def("set_gemm(str name) -> bool", &set_gemm);
  m.def("cached_empty(int n, ScalarType dtype) -> Tensor", &cached_empty);
  m.def("set_cache_limit(int bytes) -> int", &set_cache_limit);
  m.def("empty_cache() -> ()", &empty_cache);
  m.def("cache_info() -> int[]", &cache_info);
  m.def("set_block_macs(int macs) -> int", &set_block_macs);
  m.def("set_row_split_bytes(int bytes) -> int", &set_row_split_bytes);
}

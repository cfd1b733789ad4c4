// The GEMM back-ends of the compiled loops and how a step is split over threads.
//
// The per-step products, C (m, n) = A (m, k) @ B (k, n), row-major, B fixed for a loop:
//   BlockGemm (B: W^T (K, L) = W_hh^T (H, G) or W_ih^T (I, G), may be a strided view)
//       run(p, A (m, K), C (m, L)): block p's columns of every gate,
//       C[:, k S + j0 : k S + j1] = A @ B[:, k S + j0 : k S + j1], the forward's W_hh h_{t-1}
//       and the per-step W_ih x_t
//   RowGemm (B: W_hh (G, H), contiguous)
//       run(p, A (m, G), C (m, H)): block p's part of the backward's dh_{t-1} = da_t W_hh,
//       the sum over gates of A[:, k S + j0 : k S + j1] @ B[k S + j0 : k S + j1, :]
// each through one of three back-ends (Gemm: oneDNN's brgemm, MKL's packed GEMM, at::mm),
// for float32; double always uses at::mm.
//
// Threads: a step is split by hidden units into Blocks (block p owns units [j0, j1));
// for_steps(blocks, steps, step) runs step(i, p) for every step and block in one parallel
// region with a barrier per step; n_blocks(macs) says how many blocks a step's GEMM pays
// for (set_block_macs).
//
//   set_gemm(name) -> available    "brgemm" | "packed" | "mm"
//   set_block_macs(macs) -> old    multiply-adds per block below which a step runs on one

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <string>
#include <vector>

#include "cache.h"

namespace bnrnn_fast {

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

inline const Mkl& mkl() {
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
// BRGEMM is the fastest of the three on a step's shapes (MKL repacks A and scales C by beta
// at each call).
enum Gemm { BRGEMM = 0, PACKED = 1, MM = 2 };
inline Gemm g_gemm = BRGEMM;  // set_gemm("brgemm" | "packed" | "mm")

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
// sweeps. Contiguous panels (ldb 64) were no faster than reading them in place.
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
  // (K, w), which streams faster than reading the columns in place (ld L).
  std::vector<at::Tensor> parts;
  // BRGEMM with one block of all units and B within L2_SHARE: one GEMM of all L columns of
  // B in place (at H 100 one call of 400 columns instead of four of 100, each with a
  // masked tail). A larger B goes by gates: one call over all of them then streams B from
  // beyond L2 and runs slower than four.
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
    // view of W_hh (a contiguous W_hh^T first would be a second pass over all of it)
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

inline int64_t g_block_macs = 1 << 16;  // multiply-adds of a step's GEMM per block

// As many blocks as threads when the step's GEMM (macs multiply-adds) is large enough to
// share: below that, the barrier and moving the step's data between cores cost more. With
// one parallel region per call, two blocks pay off from small steps on (hidden 64 at a
// batch of 32).
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
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = 0; i < steps; ++i)
      for (int64_t p = 0; p < nb; ++p) step(i, p);
    return;
  }
  FirstError first;
#pragma omp parallel num_threads(nb)
  {
    MklOneThread one;
    // (the ATen calls of the at::mm back-end: no autograd on any thread, whose modes are
    // thread-local)
    at::AutoDispatchBelowADInplaceOrView below_autograd;
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

// Runs work(tid, r0, r1) on each thread's rows [r0, r1) of N, for loops whose rows never
// meet (no barrier), with MKL on the calling thread only.
template <typename F> void for_rows(int64_t N, int64_t nth, const F& work) {
  FirstError first;
#pragma omp parallel num_threads(nth)
  {
    MklOneThread one;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t tid = omp_get_thread_num(), k = omp_get_num_threads();
    const int64_t r0 = N * tid / k, r1 = N * (tid + 1) / k;
    first.run([&] { work(tid, r0, r1); });
  }
  first.rethrow();
}

inline bool set_gemm(const std::string& name) {
  TORCH_CHECK(name == "brgemm" || name == "packed" || name == "mm", "unknown GEMM ", name);
  g_gemm = name == "brgemm" ? BRGEMM : name == "packed" ? PACKED : MM;
  return g_gemm != PACKED || mkl().ok();
}

inline int64_t set_block_macs(int64_t macs) {
  const int64_t old = g_block_macs;
  if (macs > 0) g_block_macs = macs;
  return old;
}

}  // namespace bnrnn_fast

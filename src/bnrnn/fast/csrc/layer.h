// The compiled loops of norm="layer": the layer-normalised LSTM and RNN of Ba et al. (2016,
// §6.5 and supplementary), steps [t0, t1) of one direction (bnrnn/fast/loops.py does the
// same in PyTorch, with NormPlan.layer):
//   (i, f, g, o) = LN(W_hh h_{t-1}; g_hh) + LN(W_ih x_t; g_ih) + b
//   c_t = sig(f) c_{t-1} + sig(i) tanh(g),  h_t = sig(o) tanh(LN(c_t; g_c, b_c))
// (the RNN: h_t = act(LN(W_hh h_{t-1}) + LN(W_ih x_t) + b)).
//
// Each LN normalises one row (one sequence at one step) over all its features, so the rows
// of the batch are independent for the whole sequence: each thread runs every step for
// its own rows, with no barrier (forward_rows in forward.h does the same for evaluation
// of the BN placements). Buffers as in loop.h, with the statistics of each LN as (T, N)
// rows of means and biased variances, one per row; wx holds W_ih x for every step (or a
// chunk of them from wx_base), normalised in place to xhat_ih, or with inline_ih (small
// I: sequential MNIST) one step computed in the step from x; gates are saved per step (no
// recomputation); the backward reads xhat_ih of the chunk's steps at t - t0 in wx, or
// with inline_ih recomputes it per row and sums dW_ih^T itself.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "kernels.h"
#include "loop.h"

namespace bnrnn_fast {

// The sum of f(j) for j < F in 16 independent partial sums: gcc vectorises it without
// reassociating (no -ffast-math), where a single running sum is a serial chain of adds.
template <typename T, typename Fn>
__attribute__((always_inline)) inline T sum16(int64_t F, const Fn& f) {
  constexpr int64_t L = 16;
  T acc[L] = {};
  int64_t j = 0;
  for (; j + L <= F; j += L)
    for (int64_t q = 0; q < L; ++q) acc[q] += f(j + q);
  T s = T(0);
  for (; j < F; ++j) s += f(j);
  for (int64_t q = 0; q < L; ++q) s += acc[q];
  return s;
}

// The mean and biased variance of z[0..F), stored, and 1 / sqrt(var + eps) (Ba et al. §3.1
// eq. 4). Two passes, as torch's layer_norm computes them.
template <typename T>
__attribute__((noinline)) T ln_moments(const T* __restrict__ z, int64_t F, T eps, T* mean,
                                       T* var) {
  const T m = sum16<T>(F, [&](int64_t j) { return z[j]; }) / T(F);
  const T v = sum16<T>(F, [&](int64_t j) { return (z[j] - m) * (z[j] - m); }) / T(F);
  *mean = m, *var = v;
  return T(1) / std::sqrt(v + eps);
}

// The gate pre-activation of one row, a = xhat_ih g_ih + xhat_hh g_hh + b, in one pass
// over the G features; with keep, xhat_ih and xhat_hh replace W_ih x and W_hh h in place
// (the backward reads them). The same arithmetic either way, so that evaluation and
// training give the same outputs.
template <typename T, bool keep>
__attribute__((noinline)) void ln_gates_row(T* __restrict__ xi, T* __restrict__ xh,
                                            T* __restrict__ a, const T* __restrict__ g_ih,
                                            const T* __restrict__ g_hh, const T* __restrict__ b,
                                            int64_t G, T mi, T ri, T mh, T rh) {
  for (int64_t j = 0; j < G; ++j) {
    const T ni = (xi[j] - mi) * ri, nh = (xh[j] - mh) * rh;
    if (keep) xi[j] = ni, xh[j] = nh;
    a[j] = ni * g_ih[j] + nh * g_hh[j] + b[j];
  }
}

// dz[0..F) = dL/dz of y = gamma * xhat(z) over one row, from dy: the row's mean and
// variance depend on z, so with d = dy gamma: dz = rstd (d - mean(d) - xhat mean(d xhat)).
// Accumulates dL/dgamma (+= dy xhat) into gg.
template <typename T>
__attribute__((noinline)) void ln_row_backward(const T* __restrict__ dy, const T* __restrict__ xhat,
                                               const T* __restrict__ gamma, T rstd, int64_t F,
                                               T* __restrict__ gg, T* __restrict__ dz) {
  for (int64_t j = 0; j < F; ++j) {
    dz[j] = dy[j] * gamma[j];
    gg[j] += dy[j] * xhat[j];
  }
  const T m1 = sum16<T>(F, [&](int64_t j) { return dz[j]; }) / T(F);
  const T m2 = sum16<T>(F, [&](int64_t j) { return dz[j] * xhat[j]; }) / T(F);
  for (int64_t j = 0; j < F; ++j) dz[j] = (dz[j] - m1 - xhat[j] * m2) * rstd;
}

// Threads for n rows: as forward_rows splits them (no more threads than rows).
inline int64_t layer_threads(const Loop& lp) {
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(n_blocks(lp.N * lp.G * lp.H), lp.N));
}

template <typename T>
void layer_forward_impl(const Loop& lp) {
  const int64_t N = lp.N, H = lp.H, G = lp.G;
  const bool lstm = lp.kind == LSTM;
  const int64_t nth = layer_threads(lp);
  Blocks bl(H, 1);  // every unit in one block: a thread computes whole rows
  BlockGemm gh(lp.w_hh_t, H, G / H, bl, (N + nth - 1) / nth);
  // step_ih (no backward): W_ih x_t of the thread's rows in the step, as forward_rows does
  // (read from L2, no GEMM over all steps before the loop)
  c10::optional<BlockGemm> gi;
  if (lp.step_ih) gi.emplace(lp.w_ih_t, H, G / H, bl, (N + nth - 1) / nth);
  const T* bias = data<T>(lp.bias);
  const T* g_ih = data<T>(lp.gamma_ih);
  const T* g_hh = data<T>(lp.gamma_hh);
  const T* g_c = data<T>(lp.gamma_c);
  const T* b_c = data<T>(lp.beta_c);
  auto stat = [&](const Norm& nm, int64_t t, int64_t r, bool var) {
    return static_cast<T*>(var ? nm.var : nm.mean) + t * N + r;
  };
  for_rows(N, nth, [&](int64_t, int64_t r0, int64_t r1) {
    std::vector<T> tc_row(H), zero_bias(bias ? 0 : G, T(0));
    T* tc = tc_row.data();
    const T* b = bias ? bias : zero_bias.data();  // (+ 0 changes no value)
    for (int64_t t = lp.t0; t < lp.t1 && r1 > r0; ++t) {
      const int64_t m = std::clamp<int64_t>(lp.sizes[t] - r0, 0, r1 - r0);
      const int64_t s = lp.save ? t : 0;
      // (reversed time, without a backward only: step t reads x and writes out at row(t))
      const T* h_prev = t == 0 ? data<T>(lp.h0) : data<T>(lp.out) + lp.row(t - 1) * N * H;
      T* wh = data<T>(lp.wh) + s * N * G;
      gh.run<T>(0, h_prev + r0 * H, wh + r0 * G, m);
      T* wx = data<T>(lp.wx) + (lp.inline_ih || lp.step_ih ? 0 : t - lp.wx_base) * N * G;
      if (gi) gi->run<T>(0, data<T>(lp.x) + (lp.row(t) * N + r0) * lp.I, wx + r0 * G, m);
      T* act = data<T>(lp.gates) + (lstm ? s : 0) * N * G;  // (the RNN's: one step)
      T* out = data<T>(lp.out) + lp.row(t) * N * H;
      T* cell = lstm ? data<T>(lp.cell) + s * N * H : nullptr;
      // c_{t-1}: without save the one-step cell itself (updated in place)
      const T* c_prev = !lstm        ? nullptr
                        : !lp.save   ? cell
                        : t == 0     ? data<T>(lp.c0)
                                     : data<T>(lp.cell) + (t - 1) * N * H;
      for (int64_t r = r0; r < r0 + m; ++r) {
        T* xh = wh + r * G;
        T* xi = wx + r * G;
        T* a = act + r * G;
        if (lp.inline_ih) project(lp, t, 1, 0, G, xi, r);  // W_ih x_t of the row
        const T rh = ln_moments<T>(xh, G, T(lp.hh.eps), stat(lp.hh, t, r, false),
                                   stat(lp.hh, t, r, true));
        const T ri = ln_moments<T>(xi, G, T(lp.ih.eps), stat(lp.ih, t, r, false),
                                   stat(lp.ih, t, r, true));
        const T mh = *stat(lp.hh, t, r, false), mi = *stat(lp.ih, t, r, false);
        if (lp.save) {
          ln_gates_row<T, true>(xi, xh, a, g_ih, g_hh, b, G, mi, ri, mh, rh);
        } else {
          ln_gates_row<T, false>(xi, xh, a, g_ih, g_hh, b, G, mi, ri, mh, rh);
        }
        T* h = out + r * H;
        if (lstm) {
          T* c = cell + r * H;
          if (lp.save) {
            lstm_cell_row<T, false>(H, H, a, c_prev + r * H, c);
          } else {
            lstm_cell_row<T, true>(H, H, a, nullptr, c);
          }
          const T rc = ln_moments<T>(c, H, T(lp.c.eps), stat(lp.c, t, r, false),
                                     stat(lp.c, t, r, true));
          const T mc = *stat(lp.c, t, r, false);
          for (int64_t j = 0; j < H; ++j) tc[j] = (c[j] - mc) * rc * g_c[j] + b_c[j];
          tanh_mul_row<T>(tc, h, a + 3 * H, H);
        } else if (lp.kind == RNN_TANH) {
          for (int64_t j = 0; j < H; ++j) h[j] = th<T>(a[j]);
        } else {
          for (int64_t j = 0; j < H; ++j) h[j] = a[j] > T(0) ? a[j] : T(0);
        }
      }
      for (int64_t r = r0 + m; r < r1; ++r) std::memset(out + r * H, 0, H * sizeof(T));
    }
  });
}

template <typename T>
void layer_backward_impl(const Loop& lp) {
  const int64_t N = lp.N, H = lp.H, G = lp.G, t0 = lp.t0, t1 = lp.t1;
  const bool lstm = lp.kind == LSTM;
  const int64_t nth = layer_threads(lp);
  Blocks bl(H, 1);
  RowGemm gh(lp.w_hh, H, bl, (N + nth - 1) / nth);  // dh_{t-1} = da_t W_hh, per thread's rows
  const T* g_ih = data<T>(lp.gamma_ih);
  const T* g_hh = data<T>(lp.gamma_hh);
  const T* g_c = data<T>(lp.gamma_c);
  const T* b_c = data<T>(lp.beta_c);
  auto rstd = [&](const Norm& nm, int64_t t, int64_t r) {
    return T(1) / std::sqrt(static_cast<T*>(nm.var)[t * N + r] + T(nm.eps));
  };
  // per thread: the sums of dL/d(bias, g_ih, g_hh) (G each), of dL/d(g_c, b_c) (H each)
  // and, with the inline projection, of dL/dW_ih^T (I, G)
  const int64_t I = lp.I, WI = lp.inline_ih ? I * G : 0;
  const int64_t A = 3 * G + 2 * H + WI;
  std::vector<T> sums(nth * A, T(0));
  T* dh_all = data<T>(lp.d_h);
  for_rows(N, nth, [&](int64_t tid, int64_t r0, int64_t r1) {
    T* acc = sums.data() + tid * A;
    T *s_bias = acc, *s_gi = acc + G, *s_gh = acc + 2 * G, *s_gc = acc + 3 * G,
      *s_bc = acc + 3 * G + H, *s_wi = acc + 3 * G + 2 * H;
    std::vector<T> scratch(2 * G + 5 * H);
    T* xi_row = scratch.data() + G + 5 * H;  // inline: xhat_ih of the row, recomputed
    T* da = scratch.data();
    T* dh = da + G;  // dL/dh_t of the row
    T* xc = dh + H;  // xhat_c
    T* tc = xc + H;  // tanh(LN(c_t))
    T* dcn = tc + H;  // dL/d(LN(c_t))
    T* dcl = dcn + H;  // dL/dc_t through the LN
    for (int64_t t = t1 - 1; t >= t0 && r1 > r0; --t) {
      const int64_t m = std::clamp<int64_t>(lp.sizes[t] - r0, 0, r1 - r0);
      const int64_t k = t - t0;
      const T* xi_t = lp.inline_ih ? nullptr : data<T>(lp.wx) + k * N * G;  // xhat_ih
      const T* xh_t = data<T>(lp.wh) + t * N * G;  // xhat_hh
      const T* act_t = data<T>(lp.gates) + t * N * G;
      const T* d_out = data<T>(lp.d_out) + t * N * H;
      // (inline: one step when nothing else needs it: dW_ih is summed here)
      T* d_wx = data<T>(lp.d_wx) + (lp.d_wx.size(0) == 1 ? 0 : k) * N * G;
      T* d_wh = data<T>(lp.d_wh) + k * N * G;
      for (int64_t r = r0; r < r0 + m; ++r) {
        const T* xh = xh_t + r * G;
        const T* xi = xi_row;
        if (lp.inline_ih) {  // xhat_ih = (W_ih x_t - mean) * rstd, as the forward computed it
          project(lp, t, 1, 0, G, xi_row, r);
          const T mu = static_cast<T*>(lp.ih.mean)[t * N + r], rs = rstd(lp.ih, t, r);
          for (int64_t j = 0; j < G; ++j) xi_row[j] = (xi_row[j] - mu) * rs;
        } else {
          xi = xi_t + r * G;
        }
        for (int64_t j = 0; j < H; ++j) dh[j] = d_out[r * H + j] + dh_all[r * H + j];
        if (lstm) {
          const T* a = act_t + r * G;
          const T* c = data<T>(lp.cell) + (t * N + r) * H;
          const T* cp = t == 0 ? data<T>(lp.c0) + r * H : c - N * H;
          T* dc_r = data<T>(lp.d_c) + r * H;
          const T mu = static_cast<T*>(lp.c.mean)[t * N + r], rs = rstd(lp.c, t, r);
          for (int64_t j = 0; j < H; ++j) {
            xc[j] = (c[j] - mu) * rs;
            tc[j] = xc[j] * g_c[j] + b_c[j];
          }
          tanh_row<T>(tc, H);
          for (int64_t j = 0; j < H; ++j) {
            const T o = a[3 * H + j];
            dcn[j] = dh[j] * o * (T(1) - tc[j] * tc[j]);
            s_bc[j] += dcn[j];
          }
          ln_row_backward<T>(dcn, xc, g_c, rs, H, s_gc, dcl);
          for (int64_t j = 0; j < H; ++j) {
            const T i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
            const T dc = dc_r[j] + dcl[j];
            da[j] = dc * g * i * (T(1) - i);
            da[H + j] = dc * cp[j] * f * (T(1) - f);
            da[2 * H + j] = dc * i * (T(1) - g * g);
            da[3 * H + j] = dh[j] * tc[j] * o * (T(1) - o);
            dc_r[j] = dc * f;
          }
        } else {
          const T* h = data<T>(lp.out) + (t * N + r) * H;
          if (lp.kind == RNN_TANH) {
            for (int64_t j = 0; j < H; ++j) da[j] = dh[j] * (T(1) - h[j] * h[j]);
          } else {
            for (int64_t j = 0; j < H; ++j) da[j] = h[j] > T(0) ? dh[j] : T(0);
          }
        }
        for (int64_t j = 0; j < G; ++j) s_bias[j] += da[j];
        T* dwx = d_wx + r * G;
        ln_row_backward<T>(da, xi, g_ih, rstd(lp.ih, t, r), G, s_gi, dwx);
        ln_row_backward<T>(da, xh, g_hh, rstd(lp.hh, t, r), G, s_gh, d_wh + r * G);
        if (lp.inline_ih) {  // dW_ih^T += x_t^T dL/d(W_ih x_t), the row's part
          const T* xr = data<T>(lp.x) + (t * N + r) * I;
          for (int64_t i = 0; i < I; ++i) {
            T* o = s_wi + i * G;
            const T xv = xr[i];
            for (int64_t j = 0; j < G; ++j) o[j] += xv * dwx[j];
          }
        }
      }
      for (int64_t r = r0 + m; r < r1; ++r) {  // sequences already finished at t
        std::memset(d_wx + r * G, 0, G * sizeof(T));
        std::memset(d_wh + r * G, 0, G * sizeof(T));
      }
      gh.run<T>(0, d_wh + r0 * G, dh_all + r0 * H, m);  // dL/dh_{t-1} of the present rows
    }
  });
  T* out[6] = {data<T>(lp.grad_bias), data<T>(lp.grad_gamma_ih), data<T>(lp.grad_gamma_hh),
               data<T>(lp.grad_gamma_c), data<T>(lp.grad_beta_c),
               lp.inline_ih ? data<T>(lp.grad_w_ih_t) : nullptr};
  const int64_t off[6] = {0, G, 2 * G, 3 * G, 3 * G + H, 3 * G + 2 * H};
  const int64_t len[6] = {G, G, G, H, H, WI};
  for (int64_t q = 0; q < 6; ++q) {
    if (!out[q]) continue;
    for (int64_t p = 0; p < nth; ++p) {
      const T* s = sums.data() + p * A + off[q];
      for (int64_t j = 0; j < len[q]; ++j) out[q][j] += s[j];
    }
  }
  if (lp.inline_ih && lp.d_x.defined()) {
    // dx_t = dL/d(W_ih x_t) W_ih for the chunk's steps (d_wx holds them: rows beyond each
    // step's sequences are zero)
    const int64_t k = t1 - t0;
    at::Tensor dx = lp.d_x.narrow(0, t0, k).view({k * N, I});
    at::mm_out(dx, lp.d_wx.narrow(0, 0, k).view({k * N, G}), lp.w_ih);
  }
}

}  // namespace bnrnn_fast

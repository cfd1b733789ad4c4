// The backward of the compiled loops: steps t1 - 1 down to t0 of one direction, one chunk
// of the backward (bnrnn/fast/loops.py backward_loop does the same in PyTorch).
//
// Reads (Loop's buffers, as the forward saved them; step t of the chunk at index t - t0
// where marked):
//   wx (K, N, G)    xhat_ih or xhat_pre of the chunk's steps [t - t0] (absent when W_ih x_t
//                   is recomputed: inline_ih, step_ih)
//   wh (T, N, G)    xhat_hh; gates (T, N, G) the gate activations (one step scratch with
//                   recompute_act: recomputed here); cell (T, N, H) c_t; out (T, N, H) h_t
//   d_out (T, N, H) dL/dh_t from the output
// Updates:
//   d_h, d_c (N, H) in: dL/dh, dL/dc after step t1 - 1; out: after step t0 - 1 (rows past
//                   a step's present sequences pass through unchanged)
//   hold_h, hold_c (N, H) with active (Cooijmans §5.4): at step t the rows not updated
//                   there (in their leading padding: their state is h0, c0) move d_h, d_c
//                   into these, accumulated, and take part in the step with zero dL/dh_t
//                   and dL/dc_t (the caller zeroes their d_out)
//   d_wx (K, N, G)  out: dL/d(W_ih x_t) [t - t0] (one step scratch with inline_ih when
//                   nothing else needs it), zero beyond each step's present rows
//   d_wh (K, N, G)  out: dL/d(W_hh h_{t-1}) [t - t0]; absent: the same as d_wx (BN of the
//                   pre-activation, or no separate BN of the two terms)
//   grad_bias (G,), grad_gamma_* (F,), grad_beta_c (H,): accumulated over the steps
//   inline_ih: grad_w_ih_t (I, G) accumulated, d_x (T, N, I) rows [t0, t1) written
//   xhat_ih (1, N, G) scratch: xhat_ih of the step, recomputed (inline_ih, step_ih)
//
// Threads: backward_impl splits the hidden units into blocks as the forward does; block p
// computes the gate and BN gradients of its units (backward_block), then its part of
// dh_{t-1} = da_t W_hh (RowGemm), one barrier per step.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "kernels.h"
#include "loop.h"

namespace bnrnn_fast {

// The BN backward of one gate column block (w columns from col, n rows) of da = dL/da_t
// (the pre-activation's gradient): accumulates the bias and gamma gradients; writes
// dL/d(W_hh h) into dwh (when separate) and replaces da by dL/d(W_ih x) (or, with BN of the
// pre-activation, dL/d(the pre-activation)). With batch statistics the mean and variance
// depend on the input: dz = (dy - mean(dy) - xhat mean(dy xhat)) gamma / sqrt(var + eps).
template <typename T>
void bn_backward_cols(const Loop& lp, int64_t t, int64_t n, int64_t col, int64_t w,
                      T* __restrict__ da, T* __restrict__ dwh, const T* __restrict__ xih,
                      const T* __restrict__ xhh) {
  const int64_t G = lp.G, N = lp.N;
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
  T* gsum = data<T>(lp.grad_bias) + col;
  for (int64_t j = 0; j < w; ++j) gsum[j] += s1[j];
  // the BN on the input side (ih, or pre for Laurent eq. 17) writes in place into da = d_wx
  const Norm& nin = lp.pre.on ? lp.pre : lp.ih;
  T* gin = lp.pre.on ? data<T>(lp.grad_gamma_pre) : data<T>(lp.grad_gamma_ih);
  const T* gam_in = lp.pre.on ? data<T>(lp.gamma_pre) : data<T>(lp.gamma_ih);
  if (xih) {
    for (int64_t j = 0; j < w; ++j) gin[col + j] += sih[j];
  }
  if (xhh) {
    T* ghh = data<T>(lp.grad_gamma_hh);
    for (int64_t j = 0; j < w; ++j) ghh[col + j] += shh[j];
  }
  // dwh first (reads da), then the input side in place
  if (dwh) {
    if (xhh) {
      const T* var = lp.hh.var_at<T>(t) + col;
      const T* gam = data<T>(lp.gamma_hh) + col;
      T sc[CHUNK], m1[CHUNK], m2[CHUNK];
      const bool batch = lp.hh.batch_at(t);
      for (int64_t j = 0; j < w; ++j) {
        sc[j] = gam[j] / std::sqrt(var[j] + T(lp.hh.eps));
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
  if (xih && !(lp.ih.on && lp.ih.seq)) {  // (sequence-wise: done by the caller, all steps)
    const T* var = nin.var_at<T>(t) + col;
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

// xhat_ih = (W_ih x_t - mean) * rstd of step t for the w columns from col (n rows) into the
// scratch xhat_ih, when W_ih x_t is recomputed: step_ih, the caller's GEMM put W_ih x_t
// there; inline_ih, computed here.
template <typename T>
void recompute_xhat_ih(const Loop& lp, int64_t t, int64_t n, int64_t col, int64_t w) {
  if (!((lp.inline_ih || lp.step_ih) && lp.ih.on)) return;
  const int64_t G = lp.G;
  T* xs = data<T>(lp.xhat_ih) + col;
  if (lp.inline_ih) project(lp, t, n, col, w, xs);
  const T* mean = lp.ih.mean_at<T>(t) + col;
  const T* var = lp.ih.var_at<T>(t) + col;
  T rs[CHUNK];
  for (int64_t j = 0; j < w; ++j) rs[j] = T(1) / std::sqrt(var[j] + T(lp.ih.eps));
  for (int64_t r = 0; r < n; ++r) {
    T* row = xs + r * G;
    for (int64_t j = 0; j < w; ++j) row[j] = (row[j] - mean[j]) * rs[j];
  }
}

// da (n rows of G, units [ja, ja + w) of each gate) = dL/d(the pre-activation) of an LSTM
// step from dL/dh_t (d_out + d_h) and dL/dc_t (d_c, then dL/dc_{t-1}), through
// h = o tanh(BN(c)) (Cooijmans eq. 8: the BN's gamma and beta gradients accumulated) and
// c_t = f c_{t-1} + i g. tanh(BN(c_t)) is recomputed into tc, dL/d(BN(c_t)) kept in
// scratch (n, CHUNK each).
template <typename T>
void lstm_units_backward(const Loop& lp, int64_t t, int64_t n, int64_t ja, int64_t w,
                         const T* act, T* da, T* scratch, T* tc) {
  const int64_t H = lp.H, G = lp.G, N = lp.N;
  const T* dout = data<T>(lp.d_out) + t * N * H;
  const T* dh_buf = data<T>(lp.d_h);
  const T* c = data<T>(lp.cell) + t * N * H;
  const T* c_prev = t == 0 ? data<T>(lp.c0) : data<T>(lp.cell) + (t - 1) * N * H;
  const int64_t init = lp.initial_from(t);  // rows [init, n) read c0 (Cooijmans §5.4)
  T* dc_buf = data<T>(lp.d_c);
  T s1[CHUNK] = {}, s2[CHUNK] = {}, mu[CHUNK], rs[CHUNK];
  if (lp.c.on) {
    const T* mean = lp.c.mean_at<T>(t) + ja;
    const T* var = lp.c.var_at<T>(t) + ja;
    for (int64_t j = 0; j < w; ++j) mu[j] = mean[j], rs[j] = T(1) / std::sqrt(var[j] + T(lp.c.eps));
  }
  // tc = tanh(BN(c_t)) (or tanh(c_t)) as the forward computed it
  for (int64_t r = 0; r < n; ++r) {
    const T* cr = c + r * H + ja;
    T* tr = tc + r * CHUNK;
    if (lp.c.on) {
      const T* g_c = data<T>(lp.gamma_c) + ja;
      const T* b_c = data<T>(lp.beta_c) + ja;
      for (int64_t j = 0; j < w; ++j) tr[j] = (cr[j] - mu[j]) * rs[j] * g_c[j] + b_c[j];
    } else {
      for (int64_t j = 0; j < w; ++j) tr[j] = cr[j];
    }
    tanh_row(tr, w);
  }
  // scratch = dL/d(BN(c_t)) (or dL/dc_t from h_t without BN(c))
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
      if (lp.c.on) {
        T xc = (cr[j] - mu[j]) * rs[j];
        s1[j] += v;
        s2[j] += v * xc;
      }
    }
  }
  T sc[CHUNK], m1[CHUNK], m2[CHUNK];
  if (lp.c.on) {
    T* gbc = data<T>(lp.grad_beta_c) + ja;
    T* gc = data<T>(lp.grad_gamma_c) + ja;
    const T* gam = data<T>(lp.gamma_c) + ja;
    const bool batch = lp.c.batch_at(t);
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
    auto kernel = lp.c.on ? lstm_gate_grads<T, true> : lstm_gate_grads<T, false>;
    const T* cp = (r >= init ? data<T>(lp.c0) : c_prev) + o;
    kernel(w, H, act + r * G + ja, tc + r * CHUNK, dout + o, dh_buf + o, c + o, cp,
           scratch + r * CHUNK, dc_buf + o, da + r * G + ja, m1, m2, mu, rs, sc);
  }
}

// One step for hidden units [j0, j1) (chunk start t0): da = dL/d(the pre-activation), its
// BN backward into d_wx (in place) and d_wh, with the inline projection dW_ih accumulated.
// scratch and tc: (N, CHUNK) each, this block's own.
template <typename T>
void backward_block(const Loop& lp, int64_t t0, int64_t t, int64_t n, int64_t j0, int64_t j1,
                    T* scratch, T* tc, const T* zero_bias) {
  const int64_t H = lp.H, G = lp.G, N = lp.N;
  const int64_t gates = G / H;
  // da is computed here and the BN backward is done in place; with the inline projection
  // and a separate d_wh, d_wx is a one-step scratch.
  T* da = data<T>(lp.d_wx) + (lp.d_wx.size(0) == 1 ? 0 : t - t0) * N * G;
  T* dwh = lp.d_wh.defined() ? data<T>(lp.d_wh) + (t - t0) * N * G : nullptr;
  const T* xih = nullptr;
  if ((lp.inline_ih || lp.step_ih) && lp.ih.on) {
    xih = data<T>(lp.xhat_ih);  // recomputed for this block's columns (below, or by the caller)
  } else if (lp.ih.on || lp.pre.on) {
    xih = data<T>(lp.wx) + (t - t0) * N * G;  // wx holds the chunk's steps
  }
  const T* xhh = lp.hh.on ? data<T>(lp.wh) + t * N * G : nullptr;
  T* act = data<T>(lp.gates) + (lp.recompute_act ? 0 : t) * N * G;
  for (int64_t ja = j0; ja < j1; ja += CHUNK) {
    const int64_t w = std::min(CHUNK, j1 - ja);
    if (lp.recompute_act) {  // the gate activations of the chunk's units, as the forward did
      for (int64_t k = 0; k < gates; ++k) recompute_xhat_ih<T>(lp, t, n, k * H + ja, w);
      const T* bias = data<T>(lp.bias) ? data<T>(lp.bias) : zero_bias;
      for (int64_t r = 0; r < n; ++r) {
        if (lp.pre.on) {  // xih: xhat_pre, kept
          lstm_act_row<T, false>(w, H, xih + r * G + ja, nullptr, data<T>(lp.gamma_pre) + ja,
                                 nullptr, bias + ja, act + r * G + ja);
        } else {
          lstm_act_row<T, true>(w, H, xih + r * G + ja, xhh + r * G + ja,
                                data<T>(lp.gamma_ih) + ja, data<T>(lp.gamma_hh) + ja, bias + ja,
                                act + r * G + ja);
        }
      }
    }
    if (lp.kind == LSTM) {
      lstm_units_backward<T>(lp, t, n, ja, w, act, da, scratch, tc);
    } else {  // h = act(a)
      const T* h = data<T>(lp.out) + t * N * H;
      const T* dout = data<T>(lp.d_out) + t * N * H;
      const T* dh_buf = data<T>(lp.d_h);
      for (int64_t r = 0; r < n; ++r) {
        const T* hr = h + r * H + ja;
        const T* dr = dout + r * H + ja;
        const T* br = dh_buf + r * H + ja;
        T* d = da + r * G + ja;
        if (lp.kind == RNN_TANH) {
          for (int64_t j = 0; j < w; ++j) d[j] = (dr[j] + br[j]) * (T(1) - hr[j] * hr[j]);
        } else {
          for (int64_t j = 0; j < w; ++j) d[j] = hr[j] > T(0) ? dr[j] + br[j] : T(0);
        }
      }
    }
    for (int64_t k = 0; k < gates; ++k) {
      const int64_t col = k * H + ja;
      if (!lp.recompute_act) recompute_xhat_ih<T>(lp, t, n, col, w);
      bn_backward_cols<T>(lp, t, n, col, w, da + col, dwh ? dwh + col : nullptr,
                          xih ? xih + col : nullptr, xhh ? xhh + col : nullptr);
      if (lp.inline_ih) {  // dW_ih^T (I, G) += x_t^T @ dwx_t, this block's columns
        const T* X = data<T>(lp.x) + t * N * lp.I;
        T* gw = data<T>(lp.grad_w_ih_t) + col;
        for (int64_t i = 0; i < lp.I; ++i) {
          T acc[CHUNK] = {};
          for (int64_t r = 0; r < n; ++r) {
            const T xi = X[r * lp.I + i];
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

// Cooijmans §5.4, with active: the rows [updated(t), n) keep their initial state through
// step t, so dL/d(their state after t) is dL/d(h0, c0): move it from d_h, d_c into hold_h,
// hold_c for units [j0, j1), leaving zero as the gradient of what step t computed for them.
template <typename T>
void hold_rows(const Loop& lp, int64_t t, int64_t n, int64_t j0, int64_t j1) {
  const int64_t H = lp.H;
  for (int64_t r = lp.updated(t); r < n; ++r) {
    T* dh = data<T>(lp.d_h) + r * H;
    T* acc = data<T>(lp.hold_h) + r * H;
    for (int64_t j = j0; j < j1; ++j) acc[j] += dh[j], dh[j] = T(0);
    if (lp.kind != LSTM) continue;
    T* dc = data<T>(lp.d_c) + r * H;
    T* acc_c = data<T>(lp.hold_c) + r * H;
    for (int64_t j = j0; j < j1; ++j) acc_c[j] += dc[j], dc[j] = T(0);
  }
}

template <typename T>
void backward_impl(const Loop& lp) {
  const int64_t N = lp.N, H = lp.H, G = lp.G, t0 = lp.t0, t1 = lp.t1;
  // Block p computes the gate and BN gradients of its units, then its part of
  // dh_{t-1} = da_t W_hh over its own columns of da (its gates' rows of W_hh) into a partial
  // sum P[t % 2][p] (N, H); at step t - 1 it adds the partials up for its units. Nothing
  // waits on another block within a step (one barrier per step), and each block multiplies
  // what it just computed. P alternates between two buffers: at step t - 1 a block writes
  // one while another may still read the other. A single block writes dh itself.
  Blocks bl(H, n_blocks(N * G * H));
  const int64_t nb = bl.size();
  RowGemm gh(lp.w_hh, H, bl, N);
  // step_ih: W_ih x_t recomputed at each step by the blocks for their own columns (read
  // back from L1/L2) instead of a GEMM over the chunk before the loop and a pass to
  // normalise it
  c10::optional<BlockGemm> gi;
  if (lp.step_ih && lp.ih.on) gi.emplace(lp.w_ih_t, H, G / H, bl, N);
  T* dh = data<T>(lp.d_h);
  at::Tensor partial_t;
  if (nb > 1) partial_t = at::empty({2, nb, N, H}, lp.w_hh.options());
  T* partial = nb > 1 ? partial_t.data_ptr<T>() : nullptr;
  // per block: dL/d(BN(c_t)) and tanh(BN(c_t)), (N, CHUNK) each
  std::vector<std::vector<T>> scratch(nb, std::vector<T>(2 * N * CHUNK));
  std::vector<T> zero_bias(lp.recompute_act && !data<T>(lp.bias) ? G : 0, T(0));
  const T* d_wh = data<T>(lp.d_wh.defined() ? lp.d_wh : lp.d_wx);
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
      gather(t0 % 2, lp.sizes[t0], p);
      return;
    }
    const int64_t n = lp.sizes[t];
    // rows beyond the sequences present at t + 1 keep dh as it came in (dL/dh_n)
    if (nb > 1 && t + 1 < t1) gather((t + 1) % 2, lp.sizes[t + 1], p);
    T* s = scratch[p].data();
    if (!lp.active.empty()) hold_rows<T>(lp, t, n, bl.j0[p], bl.j1[p]);
    if (gi) gi->run<T>(p, data<T>(lp.x) + t * N * lp.I, data<T>(lp.xhat_ih), n);
    backward_block<T>(lp, t0, t, n, bl.j0[p], bl.j1[p], s, s + N * CHUNK, zero_bias.data());
    gh.run<T>(p, d_wh + (t - t0) * N * G, nb > 1 ? partial + ((t % 2) * nb + p) * N * H : dh, n);
  });
  if (lp.inline_ih && lp.d_x.defined()) {
    // dx_t = dL/d(W_ih x_t) W_ih for the chunk's steps (d_wx holds them: rows beyond each
    // step's sequences are zero)
    const int64_t k = t1 - t0;
    at::Tensor dx = lp.d_x.narrow(0, t0, k).view({k * N, lp.I});
    at::mm_out(dx, lp.d_wx.narrow(0, 0, k).view({k * N, G}), lp.w_ih);
  }
}

}  // namespace bnrnn_fast

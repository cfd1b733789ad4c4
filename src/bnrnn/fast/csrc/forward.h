// The forward of the compiled loops: steps [t0, t1) of one direction (bnrnn/fast/loops.py
// forward_loop does the same in PyTorch).
//
// Per step t, n = sizes[t] rows present (Loop's buffers; s = t when saving, else 0):
//   wh[s]  (N, G) = h_{t-1} W_hh^T, normalised in place to xhat_hh with BN(W_hh h)
//   wx[t - wx_base] (N, G) = W_ih x_t (given, or computed in the step: inline_ih, step_ih),
//                  normalised in place to xhat_ih, or to xhat_pre with BN of the whole
//                  pre-activation
//   gates[s] (N, G) = the gate activations (LSTM: sigmoid, sigmoid, tanh, sigmoid)
//   cell[s] (N, H) = c_t (without save: c_{t-1} in, c_t out); tanh_cell (N, H) scratch
//   out[row(t)] (N, H) = h_t, zero beyond the n present rows (with active: beyond the
//                  updated rows; the rows still in their leading padding read h0 and c0 as
//                  their state, Cooijmans §5.4)
// and the batch statistics of the steps before each BN's batch_steps into its mean and var
// rows.
//
// Threads: forward_impl splits each step's hidden units into blocks (gemm.h), each block
// computing its columns of the step's GEMMs and then forward_block for its units, one
// barrier per step; without batch statistics and without a backward, forward_rows instead
// splits the batch rows, each thread running every step for its rows with no barrier.
//
// forward_block takes one of four paths per CHUNK of units:
//   lstm_eval_units   LSTM, every BN an affine map (population statistics, no backward)
//   lstm_train_units  LSTM with BN of W_ih x and W_hh h (or none), in three passes per row
//   gate_units, then cell_units (LSTM) or a copy (RNN): the rest (BN of the pre-activation,
//                     the RNN), one pass per gate

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <cstring>

#include "gemm.h"
#include "kernels.h"
#include "loop.h"

namespace bnrnn_fast {

// Bytes of W_hh (and W_ih) up to which a forward without batch statistics splits the batch
// rows over threads instead of the hidden units (set_row_split_bytes).
inline int64_t g_row_split_bytes = 1 << 21;

inline int64_t set_row_split_bytes(int64_t bytes) {
  const int64_t old = g_row_split_bytes;
  if (bytes >= 0) g_row_split_bytes = bytes;
  return old;
}

// Step t's rows [r0, r0 + Nr) of the forward's buffers: every pointer starts at row r0, and
// the first n of the rows are present at t.
template <typename T> struct StepRows {
  int64_t t, n, Nr, r0, s;  // s: the index of step t in the saved buffers
  int64_t m;  // the first m of the rows are updated (n without active)
  int64_t init;  // rows [init, n) read the initial state (h0, c0) (Loop::initial_from)
  T* wx;
  T* wh;
  T* act;
  T* out;
};

template <typename T>
StepRows<T> step_rows(const Loop& lp, int64_t t, int64_t n_all, int64_t r0, int64_t r1) {
  const int64_t H = lp.H, G = lp.G, N = lp.N;
  const int64_t s = lp.save ? t : 0;
  StepRows<T> st;
  st.t = t, st.Nr = r1 - r0, st.r0 = r0, st.s = s;
  st.n = std::clamp<int64_t>(n_all - r0, 0, st.Nr);
  st.m = std::clamp<int64_t>(lp.updated(t) - r0, 0, st.n);
  st.init = std::clamp<int64_t>(lp.initial_from(t) - r0, 0, st.n);
  st.wx = data<T>(lp.wx) + (lp.inline_ih || lp.step_ih ? 0 : t - lp.wx_base) * N * G + r0 * G;
  st.wh = data<T>(lp.wh) + (lp.hh.on ? s : 0) * N * G + r0 * G;
  st.act = data<T>(lp.gates) + (lp.kind == LSTM && !lp.recompute_act ? s : 0) * N * G + r0 * G;
  st.out = data<T>(lp.out) + lp.row(t) * N * H + r0 * H;
  return st;
}

// The per-feature affine map (A, B, C) of gate column col's pre-activation
// wh * A + wx * B + C when every BN has given statistics (Cooijmans eq. 6, Laurent eq.
// 17-18 with population rows), for w columns.
template <typename T>
void affine_gate(const Loop& lp, int64_t t, int64_t col, int64_t w, T* A, T* B, T* C) {
  const T* bias = data<T>(lp.bias);
  for (int64_t j = 0; j < w; ++j) A[j] = T(1), B[j] = T(1), C[j] = bias ? bias[col + j] : T(0);
  if (lp.hh.on) fold_bn(lp.hh, t, col, w, data<T>(lp.gamma_hh) + col, A, C);
  if (lp.ih.on) fold_bn(lp.ih, t, col, w, data<T>(lp.gamma_ih) + col, B, C);
  if (lp.pre.on) {  // one scale for both terms
    fold_bn(lp.pre, t, col, w, data<T>(lp.gamma_pre) + col, A, C);
    std::copy(A, A + w, B);
  }
}

// BN(c) (Cooijmans eq. 8) with given statistics as c * A + C for units [ja, ja + w)
// (A 1, C 0 without it).
template <typename T>
void affine_cell(const Loop& lp, int64_t t, int64_t ja, int64_t w, T* A, T* C) {
  for (int64_t j = 0; j < w; ++j) A[j] = T(1), C[j] = T(0);
  if (!lp.c.on) return;
  std::copy(data<T>(lp.beta_c) + ja, data<T>(lp.beta_c) + ja + w, C);
  fold_bn(lp.c, t, ja, w, data<T>(lp.gamma_c) + ja, A, C);
}

// Evaluation of an LSTM: every BN is an affine map per feature, so each row is one call of
// lstm_affine_row; cell holds one step (c_{t-1} in, c_t out), nothing is kept.
template <typename T>
void lstm_eval_units(const Loop& lp, const StepRows<T>& st, int64_t ja, int64_t w) {
  const int64_t H = lp.H, G = lp.G;
  alignas(64) T co[18 * CHUNK];  // 14 arrays of coefficients, then lstm_affine_row's 4
  for (int64_t k = 0; k < 4; ++k) {
    const int64_t col = k * H + ja;
    if (lp.inline_ih) project(lp, st.t, st.n, col, w, st.wx + col, st.r0);
    affine_gate(lp, st.t, col, w, co + k * CHUNK, co + (4 + k) * CHUNK, co + (8 + k) * CHUNK);
  }
  affine_cell(lp, st.t, ja, w, co + 12 * CHUNK, co + 13 * CHUNK);
  T* c = data<T>(lp.cell) + st.r0 * H;
  for (int64_t r = 0; r < st.n; ++r)
    lstm_affine_row<T>(w, H, st.wh + r * G + ja, st.wx + r * G + ja, co, c + r * H + ja,
                       st.out + r * H + ja, co + 14 * CHUNK);
}

// An LSTM with BN of W_ih x and W_hh h or none (training, or batch statistics without a
// backward): per row, the four gates' pre-activations (bn_gate_row), the cell
// (lstm_cell_row), then h (lstm_out_row).
template <typename T>
void lstm_train_units(const Loop& lp, const StepRows<T>& st, int64_t ja, int64_t w) {
  const int64_t H = lp.H, G = lp.G, N = lp.N, t = st.t, n = st.n;
  T co[28 * CHUNK];  // per gate: the statistics of BN(W_hh h) and BN(W_ih x), the bias
  for (int64_t k = 0; k < 4; ++k) {
    const int64_t col = k * H + ja;
    if (lp.inline_ih) project(lp, t, n, col, w, st.wx + col, st.r0);
    T* q = co + 7 * k * CHUNK;
    stats_or_identity(lp.hh, t, st.wh + col, G, n, col, w, data<T>(lp.gamma_hh), q);
    stats_or_identity(lp.ih, t, st.wx + col, G, n, col, w, data<T>(lp.gamma_ih), q + 3 * CHUNK);
    const T* bias = data<T>(lp.bias);
    for (int64_t j = 0; j < w; ++j) q[6 * CHUNK + j] = bias ? bias[col + j] : T(0);
  }
  T* c = data<T>(lp.cell) + st.s * N * H + st.r0 * H;
  const bool inplace = !lp.save;  // one-step cell: c_{t-1} in, c_t out
  const T* c_prev = inplace ? nullptr
                    : t == 0  ? data<T>(lp.c0) + st.r0 * H
                              : data<T>(lp.cell) + (t - 1) * N * H + st.r0 * H;
  const T* c_init = data<T>(lp.c0) + st.r0 * H;  // rows [st.init, n): c0 (Cooijmans §5.4)
  for (int64_t r = 0; r < n; ++r) {
    T* a = st.act + r * G + ja;
    for (int64_t k = 0; k < 4; ++k) {
      const int64_t o = r * G + k * H + ja;
      if (lp.inline_ih || lp.step_ih) {  // wx is one step: xhat_ih is recomputed later
        bn_gate_row<T, false>(w, st.wh + o, st.wx + o, co + 7 * k * CHUNK, st.act + o);
      } else {
        bn_gate_row<T, true>(w, st.wh + o, st.wx + o, co + 7 * k * CHUNK, st.act + o);
      }
    }
    if (inplace) {
      lstm_cell_row<T, true>(w, H, a, nullptr, c + r * H + ja);
    } else {
      const T* cp = (r >= st.init ? c_init : c_prev) + r * H + ja;
      lstm_cell_row<T, false>(w, H, a, cp, c + r * H + ja);
    }
  }
  T* q = co;  // BN(c) as mean, rstd, gamma, beta
  stats_or_identity(lp.c, t, c + ja, H, n, ja, w, data<T>(lp.gamma_c), q);
  if (lp.c.on) {
    std::copy(data<T>(lp.beta_c) + ja, data<T>(lp.beta_c) + ja + w, q + 3 * CHUNK);
  } else {
    std::fill(q + 3 * CHUNK, q + 3 * CHUNK + w, T(0));
  }
  for (int64_t r = 0; r < n; ++r)
    lstm_out_row<T>(w, c + r * H + ja, st.act + r * G + 3 * H + ja, q, q + CHUNK, q + 2 * CHUNK,
                    q + 3 * CHUNK, st.out + r * H + ja);
}

// Every gate's activation into act, one gate at a time: with given statistics (affine) as
// one pass per row (affine_act_row), else normalising wh and wx (batch statistics stored),
// the pre-activation, and for BN of the pre-activation (Laurent eq. 17) xhat_pre kept in wx.
template <typename T>
void gate_units(const Loop& lp, const StepRows<T>& st, int64_t ja, int64_t w, bool affine) {
  const int64_t H = lp.H, G = lp.G, t = st.t, n = st.n;
  const T* bias = data<T>(lp.bias);
  const T* g_ih = data<T>(lp.gamma_ih);
  const T* g_hh = data<T>(lp.gamma_hh);
  const T* g_pre = data<T>(lp.gamma_pre);
  T* const wx = st.wx;
  T* const wh = st.wh;
  T* const act = st.act;
  for (int64_t k = 0; k < G / H; ++k) {
    const int64_t col = k * H + ja;
    const bool is_tanh = (lp.kind == LSTM && k == 2) || lp.kind == RNN_TANH;
    if (lp.inline_ih) project(lp, t, n, col, w, wx + col, st.r0);
    if (affine) {
      T A[CHUNK], B[CHUNK], C[CHUNK];
      affine_gate(lp, t, col, w, A, B, C);
      auto row = lp.kind == RNN_RELU ? affine_act_row<T, 2>
                 : is_tanh            ? affine_act_row<T, 1>
                                      : affine_act_row<T, 0>;
      for (int64_t r = 0; r < n; ++r)
        row(act + r * G + col, wx + r * G + col, wh + r * G + col, A, B, C, w);
      continue;
    }
    if (lp.hh.on) normalise(wh + col, G, n, w, lp.hh, t, col);
    if (lp.ih.on) normalise(wx + col, G, n, w, lp.ih, t, col);
    // pre-activation into act
    for (int64_t r = 0; r < n; ++r) {
      const T* a = wx + r * G + col;
      const T* b = wh + r * G + col;
      T* o = act + r * G + col;
      if (lp.ih.on && lp.hh.on) {
        for (int64_t j = 0; j < w; ++j) o[j] = a[j] * g_ih[col + j] + b[j] * g_hh[col + j];
      } else if (lp.ih.on) {
        for (int64_t j = 0; j < w; ++j) o[j] = a[j] * g_ih[col + j] + b[j];
      } else {
        for (int64_t j = 0; j < w; ++j) o[j] = a[j] + b[j];
      }
    }
    if (lp.pre.on) {  // Laurent eq. 17: xhat of the whole pre-activation, kept in wx
      for (int64_t r = 0; r < n; ++r) {
        T* o = act + r * G + col;
        T* a = wx + r * G + col;
        for (int64_t j = 0; j < w; ++j) a[j] = o[j];
      }
      normalise(wx + col, G, n, w, lp.pre, t, col);
      for (int64_t r = 0; r < n; ++r) {
        T* o = act + r * G + col;
        const T* a = wx + r * G + col;
        for (int64_t j = 0; j < w; ++j) o[j] = a[j] * g_pre[col + j];
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      T* o = act + r * G + col;
      if (bias) {
        for (int64_t j = 0; j < w; ++j) o[j] += bias[col + j];
      }
      if (lp.kind == RNN_RELU) {
        for (int64_t j = 0; j < w; ++j) o[j] = o[j] > T(0) ? o[j] : T(0);
      } else if (is_tanh) {
        tanh_row(o, w);
      } else {
        sigmoid_row(o, w);
      }
    }
  }
}

// An LSTM's c_t = f c_{t-1} + i g and h_t = o tanh(BN(c_t)) from the gate activations,
// BN(c) (Cooijmans eq. 8) with given statistics (affine_c) or batch statistics.
template <typename T>
void cell_units(const Loop& lp, const StepRows<T>& st, int64_t ja, int64_t w, bool affine_c) {
  const int64_t H = lp.H, G = lp.G, N = lp.N, t = st.t, n = st.n, r0 = st.r0;
  T* c = data<T>(lp.cell) + st.s * N * H + r0 * H;
  const T* c_prev = (t == 0 || !lp.save) ? (lp.save ? data<T>(lp.c0) + r0 * H : c)
                                         : data<T>(lp.cell) + (t - 1) * N * H + r0 * H;
  // rows [init, n) read c0 (Cooijmans §5.4; without save forward_block put it in c)
  const T* c_init = lp.save ? data<T>(lp.c0) + r0 * H : c;
  T* tc = data<T>(lp.tanh_cell) + r0 * H;  // one step: the backward recomputes it
  T Ac[CHUNK], Cc[CHUNK];  // BN(c) as an affine map (given statistics), else the identity
  if (affine_c) {
    affine_cell(lp, t, ja, w, Ac, Cc);
  } else {
    for (int64_t j = 0; j < w; ++j) Ac[j] = T(1), Cc[j] = T(0);
  }
  for (int64_t r = 0; r < n; ++r) {
    const T* a = st.act + r * G + ja;
    const T* cp = (r >= st.init ? c_init : c_prev) + r * H + ja;
    T* cr = c + r * H + ja;
    T* tr = tc + r * H + ja;
    for (int64_t j = 0; j < w; ++j) {
      T v = a[H + j] * cp[j] + a[j] * a[2 * H + j];
      cr[j] = v;
      tr[j] = v * Ac[j] + Cc[j];
    }
  }
  if (lp.c.on && !affine_c) {  // BN(c_t; gamma_c, beta_c) with batch statistics
    normalise(tc + ja, H, n, w, lp.c, t, ja);
    const T* g_c = data<T>(lp.gamma_c) + ja;
    const T* b_c = data<T>(lp.beta_c) + ja;
    for (int64_t r = 0; r < n; ++r) {
      T* tr = tc + r * H + ja;
      for (int64_t j = 0; j < w; ++j) tr[j] = tr[j] * g_c[j] + b_c[j];
    }
  }
  for (int64_t r = 0; r < n; ++r)
    tanh_mul_row(tc + r * H + ja, st.out + r * H + ja, st.act + r * G + 3 * H + ja, w);
}

// One step for hidden units [j0, j1) and batch rows [r0, r1) (all of them unless the rows
// are split, see forward_rows); n_all rows of the batch are present at step t.
template <typename T>
void forward_block(const Loop& lp, int64_t t, int64_t n_all, int64_t j0, int64_t j1, int64_t r0,
                   int64_t r1) {
  const StepRows<T> st = step_rows<T>(lp, t, n_all, r0, r1);
  // Population statistics and nothing kept for a backward: every BN is an affine map per
  // feature, so the pre-activation is one pass a = wh * A + wx * B + C.
  const bool affine = !lp.save && !lp.pre.batch_at(t) && !lp.hh.batch_at(t) && !lp.ih.batch_at(t);
  const bool affine_c = !lp.save && !lp.c.batch_at(t);
  if (!lp.active.empty() && !lp.save && lp.kind == LSTM) {
    // Cooijmans §5.4: a row still in its leading padding reads c0 as c_{t-1}; the one-step
    // cell holds the c_t it computed (and did not keep) at step t - 1
    const int64_t H = lp.H;
    for (int64_t r = st.init; r < st.n; ++r)
      std::copy(data<T>(lp.c0) + (r0 + r) * H + j0, data<T>(lp.c0) + (r0 + r) * H + j1,
                data<T>(lp.cell) + (r0 + r) * H + j0);
  }
  for (int64_t ja = j0; ja < j1; ja += CHUNK) {
    const int64_t w = std::min(CHUNK, j1 - ja);
    if (affine && affine_c && lp.kind == LSTM) {
      lstm_eval_units(lp, st, ja, w);
    } else if (lp.kind == LSTM && !lp.pre.on) {
      lstm_train_units(lp, st, ja, w);
    } else {
      gate_units(lp, st, ja, w, affine);
      if (lp.kind == LSTM) {
        cell_units(lp, st, ja, w, affine_c);
      } else {  // h = the activation
        for (int64_t r = 0; r < st.n; ++r)
          std::memcpy(st.out + r * lp.H + ja, st.act + r * lp.G + ja, w * sizeof(T));
      }
    }
    // rows beyond those present, and rows still in their leading padding (computed for the
    // statistics, Cooijmans §5.4): output zero
    for (int64_t r = st.m; r < st.Nr; ++r) std::memset(st.out + r * lp.H + ja, 0, w * sizeof(T));
  }
}

// Without batch statistics and without a backward, the rows of the batch are independent
// for the whole sequence: each thread runs all steps for its own rows, with no barrier
// between steps, reading all of W_hh (small enough to stay in its L2). Returns false (and
// does nothing) where that does not apply.
template <typename T>
bool forward_rows(const Loop& lp) {
  const int64_t N = lp.N, H = lp.H, G = lp.G;
  const int64_t K = H + (lp.step_ih ? lp.I : 0);
  const int64_t nth = std::min<int64_t>(n_blocks(N * G * K), N);
  if (lp.save || nth < 2 || at::in_parallel_region() ||
      K * G * (int64_t)sizeof(T) > g_row_split_bytes)
    return false;
  for (int64_t t = lp.t0; t < lp.t1; ++t)
    if (lp.ih.batch_at(t) || lp.hh.batch_at(t) || lp.pre.batch_at(t) || lp.c.batch_at(t))
      return false;
  Blocks bl(H, 1);
  BlockGemm gh(lp.w_hh_t, H, G / H, bl, (N + nth - 1) / nth);
  c10::optional<BlockGemm> gi;
  if (lp.step_ih) gi.emplace(lp.w_ih_t, H, G / H, bl, (N + nth - 1) / nth);
  for_rows(N, nth, [&](int64_t, int64_t r0, int64_t r1) {
    for (int64_t t = lp.t0; t < lp.t1 && r1 > r0; ++t) {
      const int64_t m = std::clamp<int64_t>(lp.sizes[t] - r0, 0, r1 - r0);
      const T* h_prev = t == 0 ? data<T>(lp.h0) : data<T>(lp.out) + lp.row(t - 1) * N * H;
      T* wh = data<T>(lp.wh);  // one step (nothing is saved here)
      // rows [k, m) read h0 (still in their leading padding, Cooijmans §5.4)
      const int64_t k = std::clamp<int64_t>(lp.initial_from(t) - r0, 0, m);
      gh.run<T>(0, h_prev + r0 * H, wh + r0 * G, k);
      gh.run<T>(0, data<T>(lp.h0) + (r0 + k) * H, wh + (r0 + k) * G, m - k);
      if (gi)
        gi->run<T>(0, data<T>(lp.x) + (lp.row(t) * N + r0) * lp.I, data<T>(lp.wx) + r0 * G, m);
      forward_block<T>(lp, t, lp.sizes[t], 0, H, r0, r1);
    }
  });
  return true;
}

template <typename T>
void forward_impl(const Loop& lp) {
  if (forward_rows<T>(lp)) return;
  const int64_t N = lp.N, H = lp.H, G = lp.G;
  Blocks bl(H, n_blocks(N * G * (H + (lp.step_ih ? lp.I : 0))));
  BlockGemm gh(lp.w_hh_t, H, G / H, bl, N);
  c10::optional<BlockGemm> gi;
  if (lp.step_ih) gi.emplace(lp.w_ih_t, H, G / H, bl, N);
  for_steps(bl, lp.t1 - lp.t0, [&](int64_t i, int64_t p) {
    const int64_t t = lp.t0 + i;
    const int64_t n = lp.sizes[t];
    const int64_t s = lp.save ? t : 0;
    const T* h_prev = t == 0 ? data<T>(lp.h0) : data<T>(lp.out) + lp.row(t - 1) * N * H;
    T* wh = data<T>(lp.wh) + (lp.hh.on ? s : 0) * N * G;
    // rows [k, n) read h0 (still in their leading padding, Cooijmans §5.4)
    const int64_t k = std::min(lp.initial_from(t), n);
    gh.run<T>(p, h_prev, wh, k);
    gh.run<T>(p, data<T>(lp.h0) + k * H, wh + k * G, n - k);
    if (gi) gi->run<T>(p, data<T>(lp.x) + lp.row(t) * N * lp.I, data<T>(lp.wx), n);
    forward_block<T>(lp, t, n, bl.j0[p], bl.j1[p], 0, N);
  });
}

}  // namespace bnrnn_fast

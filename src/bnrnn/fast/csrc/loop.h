// The arguments of one call of the compiled loops, and the BN column helpers the forward
// and the backward share.
//
// `Loop` holds what the operators bnrnn_fast::forward_loop and bnrnn_fast::backward_loop
// (ops.cpp) receive, read by name from their schemas; the tensor names are those of the
// Python loops' buffers (bnrnn/fast/buffers.py), which document them. Shapes: T steps (the
// call runs steps [t0, t1)), N sequences sorted by decreasing length (the sizes[t] first
// rows are present at step t), H hidden units, G = gates * H (LSTM 4 gates, RNN 1), I input
// features, F = G for the BNs of W_ih x, W_hh h and the pre-activation, H for BN(c).
//
// A BN's statistics (`Norm`): mean and biased variance rows (T, F), or (1, F) for
// sequence-wise statistics (Laurent eq. 20-21, computed before the loop); steps
// [0, batch_steps) have batch statistics, which the loops compute and store, the other
// steps read the rows the caller filled (population statistics).
//
// A padded batch read flipped in time (`active`, reverse="padded", Cooijmans §5.4: the
// padding comes first) has all N rows present at every step (sizes[t] = N: they all enter
// the statistics), but step t updates the rows [0, active[t]) only: the rows
// [active[t], N) are in their leading padding, computed with zero input from their initial
// state (h0, c0), which they keep, and output zero (updated, initial_from).

#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

#include "kernels.h"

namespace bnrnn_fast {

struct Norm {  // one BN's statistics for the steps of a call
  bool on = false;  // this BN exists
  void* mean = nullptr;  // (rows, F) means
  void* var = nullptr;  // (rows, F) biased variances
  int64_t F = 0;
  double eps = 1e-5;
  bool seq = false;  // one row for all steps (sequence-wise statistics of W_ih x)
  int64_t batch_steps = 0;  // steps [0, batch_steps) have batch statistics
  template <typename T> T* mean_at(int64_t t) const {
    return static_cast<T*>(mean) + (seq ? 0 : t) * F;
  }
  template <typename T> T* var_at(int64_t t) const {
    return static_cast<T*>(var) + (seq ? 0 : t) * F;
  }
  // batch statistics at step t, computed by the loops
  bool batch_at(int64_t t) const { return on && !seq && t < batch_steps; }
};

struct Loop {
  Kind kind = LSTM;
  int64_t T = 0, N = 0, H = 0, G = 0, I = 0;
  std::vector<int64_t> sizes;  // (T,) sequences present at each step
  std::vector<int64_t> active;  // (T,) rows updated at each step, increasing; empty: sizes
  int64_t t0 = 0, t1 = 0;  // the steps of this call
  Norm ih, hh, pre, c;  // BN of W_ih x, W_hh h, the pre-activation, c_t
  bool save = false;  // keep per step what the backward reads
  // W_ih x_t computed inside the step from x (T, N, I) and W_ih^T (I, G) (small I)
  bool inline_ih = false;
  // W_ih x_t computed at each step by the blocks (BlockGemm) into a one-step wx
  bool step_ih = false;
  // Without a backward, for a batch with no padding: step t reads x and writes h at time
  // T - 1 - t (the reverse direction without flipping its input and output). Statistics
  // stay indexed by step.
  bool reverse = false;
  // LSTM with BN of W_ih x and W_hh h (Cooijmans eq. 6) or of the pre-activation (Laurent
  // eq. 17): gates is a one-step scratch and the backward recomputes the gate activations
  // from xhat_hh (wh) and xhat_ih, or from xhat_pre (wx), which it has anyway
  bool recompute_act = false;
  // norm="layer" (layer.h): ih, hh, c are layer normalisations, statistics (T, N) per row
  bool layer = false;
  int64_t wx_base = 0;  // the forward's wx holds steps [wx_base, ...)
  // the forward's buffers and parameters (undefined: absent)
  at::Tensor wx, wh, gates, cell, tanh_cell, out, h0, c0, w_hh_t, bias;
  at::Tensor gamma_ih, gamma_hh, gamma_pre, gamma_c, beta_c, x, w_ih_t;
  // the backward's
  at::Tensor w_hh, w_ih, d_out, d_h, d_c, d_wx, d_wh, xhat_ih, d_x;
  at::Tensor grad_bias, grad_gamma_ih, grad_gamma_hh, grad_gamma_pre, grad_gamma_c, grad_beta_c;
  at::Tensor grad_w_ih_t;
  // with active: dL/dh0, dL/dc0 (N, H) of the rows in their leading padding, accumulated (at
  // each step the backward moves d_h and d_c of the rows not updated there into these)
  at::Tensor hold_h, hold_c;
  // the time index of step t in x and out
  int64_t row(int64_t t) const { return reverse ? T - 1 - t : t; }
  // step t updates the state of the rows [0, updated(t)) (Cooijmans §5.4: not from padding)
  int64_t updated(int64_t t) const { return active.empty() ? sizes[t] : active[t]; }
  // the first row whose state before step t is still the initial one (h0, c0): it has read
  // only padding so far; N when none
  int64_t initial_from(int64_t t) const {
    return t == 0 ? 0 : active.empty() ? N : active[t - 1];
  }
};

// The data of a tensor, or nullptr if it is undefined (absent).
template <typename T> T* data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// A BN with given statistics (population rows) as an affine map per feature, for w columns
// from col: scale = gamma / sqrt(var + eps); shift -= scale * mean.
template <typename T>
inline void fold_bn(const Norm& nm, int64_t t, int64_t col, int64_t w, const T* __restrict__ gamma,
                    T* __restrict__ scale, T* __restrict__ shift) {
  const T* m = nm.mean_at<T>(t) + col;
  const T* v = nm.var_at<T>(t) + col;
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
  T* mean = nm.mean_at<T>(t) + col;
  T* var = nm.var_at<T>(t) + col;
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
inline void stats_or_identity(const Norm& nm, int64_t t, const T* z, int64_t ld, int64_t n,
                              int64_t col, int64_t w, const T* gamma, T* q) {
  if (!nm.on) {
    for (int64_t j = 0; j < w; ++j) q[j] = T(0), q[CHUNK + j] = T(1), q[2 * CHUNK + j] = T(1);
    return;
  }
  T* mean = nm.mean_at<T>(t) + col;
  T* var = nm.var_at<T>(t) + col;
  if (nm.batch_at(t)) col_stats(z, ld, n, w, mean, var);
  for (int64_t j = 0; j < w; ++j) {
    q[j] = mean[j];
    q[CHUNK + j] = T(1) / std::sqrt(var[j] + T(nm.eps));
    q[2 * CHUNK + j] = gamma[col + j];
  }
}

// out (n rows, w columns, row stride G) = x_t @ W_ih^T for the columns [col, col + w), from
// row r0 of x_t (the inline input projection: I is small).
template <typename T>
void project(const Loop& lp, int64_t t, int64_t n, int64_t col, int64_t w, T* __restrict__ out,
             int64_t r0 = 0) {
  const int64_t G = lp.G, I = lp.I;
  const T* X = data<T>(lp.x) + (lp.row(t) * lp.N + r0) * I;
  const T* WT = data<T>(lp.w_ih_t) + col;
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

}  // namespace bnrnn_fast

// Element-wise kernels of the compiled loops: the math of one row of a step, for w hidden
// units (w <= CHUNK) at a time, over contiguous memory that gcc vectorises. No tensors, no
// threads: pointers and lengths only. Gates are laid out as torch orders them, (i, f, g, o)
// at offsets 0, H, 2H, 3H of a row of G = 4H; an RNN row has one gate.
//
// Forward (forward.h):
//   sigmoid_row, tanh_row (o: w)                          o <- act(o)
//   tanh_mul_row (tc, h, o: w)                            tc <- tanh(tc); h <- o * tc
//   affine_act_row<ACT> (o, a, b, A, B, C: w)             o <- act(b A + a B + C)
//   lstm_affine_row (wh, wx: G row; co: 14 CHUNK coefficients; c, h: w; tmp: 4 CHUNK)
//       an LSTM row in evaluation, every BN an affine map per feature
//   bn_gate_row<STORE_WX> (wh, wx: w; q: 7 CHUNK statistics; a: w)
//       a gate's pre-activation from normalised wh and wx (training, or batch statistics)
//   lstm_cell_row<INPLACE> (act: G row; cp, c: w)       gates activated, c_t = f c_{t-1} + i g
//   lstm_out_row (c, o, mu, rs, g, b, h: w)              h = o tanh(BN(c))
// Backward (backward.h):
//   lstm_gate_grads<BN_C> (a: G row, ...: w)             the four pre-activations' gradients
//   lstm_act_row<TWO> (xi, xh, gi, gh, b: G row; a: G row) the gate activations, recomputed
//
// float uses vectorisable approximations (Cephes expf / tanhf, ~2 ulp); double the C
// library (double is for tests, not speed). Built with -fno-trapping-math so that both
// sides of a select may be evaluated (vectorised).

#pragma once

#include <cmath>
#include <cstdint>

namespace bnrnn_fast {

enum Kind { LSTM = 0, RNN_TANH = 1, RNN_RELU = 2 };
constexpr int64_t CHUNK = 256;  // hidden units per inner block (stack arrays)


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
// c and h: the row kernels vectorise each pass, where one fused pass per unit with five
// activations in its body did not vectorise as well.
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

}  // namespace bnrnn_fast

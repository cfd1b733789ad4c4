// The compiled loops as PyTorch operators (namespace bnrnn_fast), with typed schemas: every
// tensor and option has a name, options are keyword-only, and the kernels read their
// arguments by those names (Named), so that a missing, misnamed or mistyped argument fails
// at the call. The Python side (bnrnn/fast/compiled.py) passes keywords only.
//
//   forward_loop(<buffers and parameters>, *, <options>) -> ()    forward.h
//   backward_loop(<buffers and parameters>, *, <options>) -> ()   backward.h
//   cached_empty(n, dtype), set_cache_limit, empty_cache, cache_info   cache.h
//   set_gemm(name), set_block_macs(macs)                             gemm.h
//   set_row_split_bytes(bytes)                                       forward.h
//
// The buffers' shapes and meaning are those of the Python loops' buffers
// (bnrnn/fast/buffers.py), under the same names. BN statistics come as mean_<key>,
// var_<key>, eps_<key> and batch_steps_<key> for each placement key: ih (W_ih x), hh
// (W_hh h), pre (the pre-activation), c (the cell); an absent BN has no mean.
//
// One translation unit: the headers hold the implementation and are compiled here once,
// so that the kernels inline into the loops as before the split.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "backward.h"
#include "cache.h"
#include "forward.h"
#include "gemm.h"
#include "kernels.h"
#include "layer.h"
#include "loop.h"

namespace bnrnn_fast {
namespace {

// The arguments of a boxed call, looked up by their names in the operator's schema.
class Named {
 public:
  Named(const c10::OperatorHandle& op, const torch::jit::Stack& stack)
      : schema_(op.schema()),
        args_(stack.data() + stack.size() - schema_.arguments().size()) {}

  const c10::IValue& operator[](const char* name) const {
    const auto i = schema_.argumentIndexWithName(name);
    TORCH_CHECK(i.has_value(), schema_.name(), " has no argument ", name);
    return args_[*i];
  }
  // A contiguous CPU tensor, or undefined for None.
  at::Tensor tensor(const char* name) const {
    at::Tensor t = strided(name);
    TORCH_CHECK(!t.defined() || t.is_contiguous(), schema_.name(), ": ", name,
                " must be contiguous");
    return t;
  }
  // A CPU tensor, any strides, or undefined for None.
  at::Tensor strided(const char* name) const {
    const c10::IValue& v = (*this)[name];
    if (v.isNone()) return at::Tensor();
    at::Tensor t = v.toTensor();
    TORCH_CHECK(t.device().is_cpu(), schema_.name(), ": ", name, " must be on the CPU");
    return t;
  }
  int64_t integer(const char* name) const { return (*this)[name].toInt(); }
  double real(const char* name) const { return (*this)[name].toDouble(); }
  bool flag(const char* name) const { return (*this)[name].toBool(); }

 private:
  const c10::FunctionSchema& schema_;
  const c10::IValue* args_;
};

Kind kind_of(const std::string& kind) {
  TORCH_CHECK(kind == "lstm" || kind == "rnn_tanh" || kind == "rnn_relu",
              "kind must be lstm, rnn_tanh or rnn_relu, got ", kind);
  return kind == "lstm" ? LSTM : kind == "rnn_tanh" ? RNN_TANH : RNN_RELU;
}

// BN <key>'s statistics: mean_<key> and var_<key> (absent: no BN), eps_<key>,
// batch_steps_<key>.
Norm norm_of(const Named& a, const std::string& key, int64_t F, bool seq) {
  Norm nm;
  const at::Tensor mean = a.tensor(("mean_" + key).c_str());
  nm.eps = a.real(("eps_" + key).c_str());
  nm.batch_steps = a.integer(("batch_steps_" + key).c_str());
  if (!mean.defined()) return nm;
  const at::Tensor var = a.tensor(("var_" + key).c_str());
  TORCH_CHECK(var.defined(), "mean_", key, " without var_", key);
  nm.on = true;
  nm.mean = mean.data_ptr();
  nm.var = var.data_ptr();
  nm.F = F;
  nm.seq = seq;
  return nm;
}

// What the forward and the backward share: the sizes, the options, the parameters, the
// statistics.
Loop common(const Named& a) {
  Loop lp;
  lp.kind = kind_of(a["kind"].toStringRef());
  lp.sizes = a["batch_sizes"].toIntVector();
  lp.T = (int64_t)lp.sizes.size();
  lp.active = a["active"].toIntVector();
  TORCH_CHECK(lp.active.empty() || (int64_t)lp.active.size() == lp.T, "active: ",
              lp.active.size(), " steps, expected ", lp.T);
  lp.t0 = a.integer("t0");
  lp.t1 = a.integer("t1");
  TORCH_CHECK(0 <= lp.t0 && lp.t0 <= lp.t1 && lp.t1 <= lp.T, "steps [", lp.t0, ", ", lp.t1,
              ") outside [0, ", lp.T, ")");
  lp.out = a.tensor("out");
  lp.N = lp.out.size(1);
  lp.H = lp.out.size(2);
  lp.h0 = a.tensor("h0");
  lp.c0 = a.tensor("c0");
  lp.bias = a.tensor("bias");
  lp.gamma_ih = a.tensor("gamma_ih");
  lp.gamma_hh = a.tensor("gamma_hh");
  lp.gamma_pre = a.tensor("gamma_pre");
  lp.gamma_c = a.tensor("gamma_c");
  lp.beta_c = a.tensor("beta_c");
  lp.x = a.tensor("x");
  lp.w_ih_t = a.strided("w_ih_t");
  if (lp.x.defined()) lp.I = lp.x.size(2);
  lp.inline_ih = a.flag("inline_ih");
  lp.step_ih = a.flag("step_ih");
  lp.recompute_act = a.flag("recompute_act");
  lp.layer = a.flag("layer");
  return lp;
}

void set_norms(Loop& lp, const Named& a) {
  lp.ih = norm_of(a, "ih", lp.G, a.flag("sequence_ih"));
  lp.hh = norm_of(a, "hh", lp.G, false);
  lp.pre = norm_of(a, "pre", lp.G, false);
  lp.c = norm_of(a, "c", lp.H, false);
  TORCH_CHECK(!lp.recompute_act ||
                  (lp.kind == LSTM && ((lp.ih.on && lp.hh.on) || lp.pre.on)),
              "recomputed gates: an LSTM with BN of both terms or of the pre-activation only");
}

void forward_loop(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const Named a(op, *stack);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the loops are not differentiated
  Loop lp = common(a);
  lp.wx = a.tensor("wx");
  lp.G = lp.wx.size(2);
  lp.wh = a.tensor("wh");
  lp.gates = a.tensor("gates");
  lp.cell = a.tensor("cell");
  lp.tanh_cell = a.tensor("tanh_cell");
  lp.w_hh_t = a.strided("w_hh_t");  // a view of W_hh: BlockGemm copies its columns
  lp.save = a.flag("save");
  lp.reverse = a.flag("reverse");
  lp.wx_base = a.integer("wx_base");
  set_norms(lp, a);
  TORCH_CHECK(lp.I > 0 || !(lp.inline_ih || lp.step_ih), "W_ih x_t in the step needs x");
  TORCH_CHECK(!lp.reverse || (!lp.save && (lp.inline_ih || lp.step_ih)),
              "reversed time: steps without a backward, W_ih x_t computed in the step");
  TORCH_CHECK(!lp.layer || (lp.ih.on && lp.hh.on && lp.c.on == (lp.kind == LSTM) &&
                            !lp.pre.on && !(lp.save && (lp.step_ih || lp.reverse)) &&
                            !lp.recompute_act),
              "layer normalisation: LN of W_ih x, W_hh h and (LSTM) c; W_ih x given, "
              "and forward time, with a backward");
  TORCH_CHECK(lp.active.empty() || !(lp.layer || lp.reverse),
              "active rows: not with layer normalisation nor reversed time");
  AT_DISPATCH_FLOATING_TYPES(lp.out.scalar_type(), "bnrnn_fast::forward_loop", [&] {
    if (lp.layer) {
      layer_forward_impl<scalar_t>(lp);
    } else {
      forward_impl<scalar_t>(lp);
    }
  });
  torch::jit::drop(*stack, op.schema().arguments().size());
}

void backward_loop(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const Named a(op, *stack);
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // the loops are not differentiated
  Loop lp = common(a);
  lp.wx = a.tensor("wx");
  lp.wh = a.tensor("wh");
  lp.cell = a.tensor("cell");
  lp.w_hh = a.tensor("w_hh");
  lp.G = lp.w_hh.size(0);
  lp.w_ih = a.tensor("w_ih");
  // the saved gate activations, or a one-step scratch where they are recomputed
  lp.gates = a.tensor(lp.recompute_act ? "recomputed_gates" : "gates");
  lp.d_out = a.tensor("d_out");
  lp.d_h = a.tensor("d_h");
  lp.d_c = a.tensor("d_c");
  lp.d_wx = a.tensor("d_wx");
  lp.d_wh = a.tensor("d_wh");
  lp.xhat_ih = a.tensor("xhat_ih");
  lp.d_x = a.tensor("d_x");
  lp.grad_bias = a.tensor("grad_bias");
  lp.grad_gamma_ih = a.tensor("grad_gamma_ih");
  lp.grad_gamma_hh = a.tensor("grad_gamma_hh");
  lp.grad_gamma_pre = a.tensor("grad_gamma_pre");
  lp.grad_gamma_c = a.tensor("grad_gamma_c");
  lp.grad_beta_c = a.tensor("grad_beta_c");
  lp.grad_w_ih_t = a.tensor("grad_w_ih_t");
  lp.hold_h = a.tensor("hold_h");
  lp.hold_c = a.tensor("hold_c");
  set_norms(lp, a);
  TORCH_CHECK(lp.active.empty() || (!lp.layer && lp.hold_h.defined() &&
                                    (lp.kind != LSTM || lp.hold_c.defined())),
              "active rows: hold_h (and hold_c for the LSTM), not with layer normalisation");
  TORCH_CHECK(lp.I > 0 || !(lp.inline_ih || (lp.step_ih && lp.ih.on)),
              "W_ih x_t in the step needs x");
  TORCH_CHECK(!lp.layer || (lp.ih.on && lp.hh.on && lp.c.on == (lp.kind == LSTM) &&
                            lp.d_wh.defined() && !lp.recompute_act),
              "layer normalisation: LN of W_ih x, W_hh h and (LSTM) c, separate d_wh");
  AT_DISPATCH_FLOATING_TYPES(lp.out.scalar_type(), "bnrnn_fast::backward_loop", [&] {
    if (lp.layer) {
      layer_backward_impl<scalar_t>(lp);
    } else {
      backward_impl<scalar_t>(lp);
    }
  });
  torch::jit::drop(*stack, op.schema().arguments().size());
}

// Schemas. (a!) marks a tensor the loops write (alias analysis); none is returned.
constexpr const char* FORWARD_LOOP =
    "forward_loop("
    "Tensor(a!) wx, Tensor(b!) wh, Tensor(c!) gates, Tensor(d!) out, Tensor h0, "
    "Tensor w_hh_t, Tensor(e!)? cell, Tensor(f!)? tanh_cell, Tensor? c0, Tensor? bias, "
    "Tensor? gamma_ih, Tensor? gamma_hh, Tensor? gamma_pre, Tensor? gamma_c, Tensor? beta_c, "
    "Tensor(g!)? mean_ih, Tensor(h!)? var_ih, Tensor(i!)? mean_hh, Tensor(j!)? var_hh, "
    "Tensor(k!)? mean_pre, Tensor(l!)? var_pre, Tensor(m!)? mean_c, Tensor(n!)? var_c, "
    "Tensor? x, Tensor? w_ih_t, "
    "*, str kind, int[] batch_sizes, int t0, int t1, "
    "float eps_ih, float eps_hh, float eps_pre, float eps_c, "
    "int batch_steps_ih, int batch_steps_hh, int batch_steps_pre, int batch_steps_c, "
    "bool sequence_ih, bool save, int wx_base, bool inline_ih, bool step_ih, bool reverse, "
    "bool recompute_act, bool layer=False, int[] active=[]) -> ()";

constexpr const char* BACKWARD_LOOP =
    "backward_loop("
    "Tensor? wx, Tensor? wh, Tensor? gates, Tensor(a!)? recomputed_gates, Tensor out, "
    "Tensor h0, Tensor w_hh, Tensor? cell, Tensor? c0, Tensor? bias, "
    "Tensor? gamma_ih, Tensor? gamma_hh, Tensor? gamma_pre, Tensor? gamma_c, Tensor? beta_c, "
    "Tensor? mean_ih, Tensor? var_ih, Tensor? mean_hh, Tensor? var_hh, "
    "Tensor? mean_pre, Tensor? var_pre, Tensor? mean_c, Tensor? var_c, "
    "Tensor? x, Tensor? w_ih_t, Tensor? w_ih, "
    "Tensor d_out, Tensor(b!) d_h, Tensor(c!)? d_c, Tensor(d!) d_wx, Tensor(e!)? d_wh, "
    "Tensor(f!)? xhat_ih, Tensor(g!)? d_x, "
    "Tensor(h!) grad_bias, Tensor(i!)? grad_gamma_ih, Tensor(j!)? grad_gamma_hh, "
    "Tensor(k!)? grad_gamma_pre, Tensor(l!)? grad_gamma_c, Tensor(m!)? grad_beta_c, "
    "Tensor(n!)? grad_w_ih_t, Tensor(o!)? hold_h, Tensor(p!)? hold_c, "
    "*, str kind, int[] batch_sizes, int t0, int t1, "
    "float eps_ih, float eps_hh, float eps_pre, float eps_c, "
    "int batch_steps_ih, int batch_steps_hh, int batch_steps_pre, int batch_steps_c, "
    "bool sequence_ih, bool inline_ih, bool step_ih, bool recompute_act, "
    "bool layer=False, int[] active=[]) -> ()";

}  // namespace
}  // namespace bnrnn_fast

TORCH_LIBRARY(bnrnn_fast, m) {
  using namespace bnrnn_fast;
  m.def(FORWARD_LOOP);
  m.impl("forward_loop", torch::dispatch(c10::DispatchKey::CPU,
                                         torch::CppFunction::makeFromBoxedFunction<&forward_loop>()));
  m.def(BACKWARD_LOOP);
  m.impl("backward_loop",
         torch::dispatch(c10::DispatchKey::CPU,
                         torch::CppFunction::makeFromBoxedFunction<&backward_loop>()));
  m.def("cached_empty(int n, ScalarType dtype) -> Tensor", &cached_empty);
  m.def("set_cache_limit(int bytes) -> int", &set_cache_limit);
  m.def("empty_cache() -> ()", &empty_cache);
  m.def("cache_info() -> int[]", &cache_info);
  m.def("set_gemm(str name) -> bool", [](std::string name) { return set_gemm(name); });
  m.def("set_block_macs(int macs) -> int", &set_block_macs);
  m.def("set_row_split_bytes(int bytes) -> int", &set_row_split_bytes);
}

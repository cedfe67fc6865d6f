// The only torch boundary of rwp_fast._C. It registers the ops as torch.ops.rwp_fast.<name>,
// checks every argument with TORCH_CHECK, dispatches on dtype and calls the launchers of
// rwp_kernels.h on the current CUDA stream.
//
// This is the only file that includes torch headers. Each .cu file compiles in 5-6 s; this one takes
// 28 s on the 2-core CI machine. It includes the per-operator ATen headers (ATen/ops/empty.h, …) and
// c10/cuda, not torch/extension.h: an empty file that includes torch/extension.h alone takes 49 s.
// It also avoids ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER headers that a
// bare CUDA toolkit may lack; the CI toolkit has none of them. at::cuda::getCurrentCUDAStream comes
// from c10/cuda/CUDAStream.h, since c10's Macros.h re-exports c10::cuda into at::cuda.
//
// The Python module. `import rwp_fast._C` needs a PyInit__C symbol. The ops themselves are
// registered by the TORCH_LIBRARY static initializers, which run when the .so is loaded. So
// PyInit__C returns an empty module, written against the plain CPython API. This is the pattern of
// pytorch/extension-cpp. PYBIND11_MODULE(_C, m) {} would do the same, but it needs
// torch/extension.h, with pybind11 and torch/python.h: 49 s for no use.
//
// Mutating ops (pgd_step, pgd_step_, pgd_random_init, accumulate_sq_norm_, perturb_axpy_) declare the
// tensor they write as Tensor(a!). pgd_step, pgd_step_, pgd_random_init and perturb_axpy_ return (); the Python
// wrappers in rwp_fast/ops/cuda_ops.py return the written tensor. torch.compile's
// auto-functionalization handles mutable custom ops that return nothing. It does not handle ones
// that return an alias of an input.
#include <Python.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include "rwp_kernels.h"

extern "C" {
// `import rwp_fast._C` loads this .so, and loading it runs the TORCH_LIBRARY registrations below.
// It then imports rwp_fast.ops.fake_impls, the ops' fake (meta) implementations, so that loading
// _C alone is enough for FakeTensor tracing (torch.compile, torch.export): without it, code that
// imported rwp_fast._C but not rwp_fast.ops.cuda_ops hit "no fake impl" inside torch.compile.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "rwp-fast CUDA kernels; the ops live in torch.ops.rwp_fast",
      -1,       // no per-interpreter state
      nullptr,  // no methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  PyObject* fakes = PyImport_ImportModule("rwp_fast.ops.fake_impls");
  if (fakes == nullptr) {
    Py_DECREF(module);
    return nullptr;
  }
  Py_DECREF(fakes);
  return module;
}
}

namespace {

using at::Tensor;

// at::Half / at::BFloat16 -> the CUDA types of the launchers. The two types in each pair are the
// same 2 bytes.
template <typename S> struct CudaType { using type = S; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
static_assert(sizeof(at::Half) == sizeof(__half), "at::Half and __half differ in size");
static_assert(sizeof(at::BFloat16) == sizeof(__nv_bfloat16), "at::BFloat16 and __nv_bfloat16 differ");

template <typename S>
const typename CudaType<S>::type* cptr(const Tensor& t) {
  return reinterpret_cast<const typename CudaType<S>::type*>(t.data_ptr<S>());
}
template <typename S>
typename CudaType<S>::type* mptr(const Tensor& t) {
  return reinterpret_cast<typename CudaType<S>::type*>(t.data_ptr<S>());
}

// ---- argument checks: each message names the op, the argument and what was expected.

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const Tensor& t, const Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

void check_contiguous(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous, got strides ", t.strides(),
              " for shape ", t.sizes());
}

// fp32, fp16 and bf16 only. float64 is rejected so that this backend accepts what the Triton
// kernels and the ops layer accept; the three backends are interchangeable.
void check_float_dtype(const Tensor& t, const char* op, const char* name) {
  const auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kHalf || d == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", d);
}

void check_dtype(const Tensor& t, at::ScalarType want, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ",
              t.scalar_type());
}

void check_same_dtype(const Tensor& t, const Tensor& ref, const char* op, const char* name,
                      const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_shape(const Tensor& t, const Tensor& ref, const char* op, const char* name,
                      const char* ref_name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, " must have the same shape as ", ref_name,
              ", got ", t.sizes(), " and ", ref.sizes());
}

void check_shape(const Tensor& t, at::IntArrayRef want, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

// A tensor that sits next to `ref`: on ref's device, contiguous, with dtype `dtype`.
void check_aux(const Tensor& t, const Tensor& ref, const char* ref_name, at::ScalarType dtype,
               const char* op, const char* name) {
  check_cuda(t, op, name);
  check_same_device(t, ref, op, name, ref_name);
  check_dtype(t, dtype, op, name);
  check_contiguous(t, op, name);
}

// The main floating tensor of an op: on CUDA, of a float dtype, contiguous.
void check_main(const Tensor& t, const char* op, const char* name) {
  check_cuda(t, op, name);
  check_float_dtype(t, op, name);
  check_contiguous(t, op, name);
}

// A floating tensor that must match `ref` in device, dtype and shape.
void check_like(const Tensor& t, const Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  check_cuda(t, op, name);
  check_same_device(t, ref, op, name, ref_name);
  check_same_dtype(t, ref, op, name, ref_name);
  check_same_shape(t, ref, op, name, ref_name);
  check_contiguous(t, op, name);
}

bool parse_norm(c10::string_view norm, const char* op) {
  TORCH_CHECK(norm == "linf" || norm == "l2", op, ": norm must be 'linf' or 'l2', got '",
              std::string(norm.data(), norm.size()), "'");
  return norm == "l2";
}

// One block per row for L2, so the batch is gridDim.x.
void check_rows(int64_t batch, const char* op) {
  TORCH_CHECK(batch <= INT32_MAX, op, ": batch must be < 2^31 (one CUDA block per example), got ",
              batch);
}

// Calls f(scalar_t{}) with scalar_t = float, at::Half or at::BFloat16 for `dtype`. It uses
// AT_DISPATCH_FLOATING_TYPES_AND2, which also generates a float64 case. check_float_dtype has
// already rejected float64, so that case is compiled out with `if constexpr`, and the .cu files
// need no float64 instantiations. The dispatch name must be a compile-time constant, hence the
// fixed "rwp_fast".
template <typename F>
void dispatch_float(at::ScalarType dtype, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "rwp_fast", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) f(scalar_t{});
  });
}

// The caller holds a CUDAGuard for the tensors' device, so this is that device's current stream.
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// ------------------------------------------------------------------------------------------------
// pgd_step / pgd_random_init
// ------------------------------------------------------------------------------------------------

void pgd_step_into(const Tensor& x_adv, const Tensor& grad, const Tensor& x_nat, double alpha,
                   double eps, c10::string_view norm, const Tensor& out, const char* op) {
  check_main(x_adv, op, "x_adv");
  check_like(grad, x_adv, op, "grad", "x_adv");
  check_like(x_nat, x_adv, op, "x_nat", "x_adv");
  check_like(out, x_adv, op, "out", "x_adv");
  const bool l2 = parse_norm(norm, op);
  TORCH_CHECK(!l2 || x_adv.dim() >= 1, op, ": x_adv must have a batch dimension for norm='l2'");
  const int64_t numel = x_adv.numel();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x_adv.device());
  const cudaStream_t stream = current_stream();
  // The reference does the arithmetic in fp32: torch casts the Python floats α and ε to float.
  const float a = static_cast<float>(alpha), e = static_cast<float>(eps);
  dispatch_float(x_adv.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (l2) {
      const int64_t batch = x_adv.size(0);
      check_rows(batch, op);
      C10_CUDA_CHECK(rwp::pgd_step_l2(cptr<scalar_t>(x_adv), cptr<scalar_t>(grad),
                                      cptr<scalar_t>(x_nat), mptr<scalar_t>(out), batch,
                                      numel / batch, a, e, stream));
    } else {
      C10_CUDA_CHECK(rwp::pgd_step_linf(cptr<scalar_t>(x_adv), cptr<scalar_t>(grad),
                                        cptr<scalar_t>(x_nat), mptr<scalar_t>(out), numel, a, e,
                                        stream));
    }
  });
}

// Out of place: the schema marks only `out` as written, so `out` must not be x_adv (torch.compile's
// functionalization would not see x_adv change). The in-place step is its own op, pgd_step_.
void pgd_step(const Tensor& x_adv, const Tensor& grad, const Tensor& x_nat, double alpha,
              double eps, c10::string_view norm, const Tensor& out) {
  TORCH_CHECK(x_adv.numel() == 0 || out.data_ptr() != x_adv.data_ptr(),
              "pgd_step: out must not be x_adv (the schema marks only out as written); use "
              "pgd_step_ for the in-place step");
  pgd_step_into(x_adv, grad, x_nat, alpha, eps, norm, out, "pgd_step");
}

// In place: x_adv <- the next iterate. Schema: Tensor(a!) x_adv.
void pgd_step_(const Tensor& x_adv, const Tensor& grad, const Tensor& x_nat, double alpha,
               double eps, c10::string_view norm) {
  pgd_step_into(x_adv, grad, x_nat, alpha, eps, norm, x_adv, "pgd_step_");
}

void pgd_random_init(const Tensor& x_nat, const Tensor& noise, double eps, c10::string_view norm,
                     const std::optional<Tensor>& radius, const Tensor& out) {
  constexpr const char* op = "pgd_random_init";
  check_main(x_nat, op, "x_nat");
  check_cuda(noise, op, "noise");
  check_same_device(noise, x_nat, op, "noise", "x_nat");
  TORCH_CHECK(noise.scalar_type() == x_nat.scalar_type() || noise.scalar_type() == at::kFloat, op,
              ": noise must be float32 or the dtype of x_nat (", x_nat.scalar_type(), "), got ",
              noise.scalar_type());
  check_same_shape(noise, x_nat, op, "noise", "x_nat");
  check_contiguous(noise, op, "noise");
  check_like(out, x_nat, op, "out", "x_nat");
  const bool l2 = parse_norm(norm, op);
  const float e = static_cast<float>(eps);
  const int64_t numel = x_nat.numel();
  const float* radius_ptr = nullptr;
  if (l2) {
    TORCH_CHECK(radius.has_value(), op,
                ": radius is required for norm='l2', a (B,) float32 tensor of U(0, 1) draws");
    TORCH_CHECK(x_nat.dim() >= 1, op, ": x_nat must have a batch dimension for norm='l2'");
    check_aux(*radius, x_nat, "x_nat", at::kFloat, op, "radius");
    check_shape(*radius, {x_nat.size(0)}, op, "radius");
    check_rows(x_nat.size(0), op);
    radius_ptr = radius->data_ptr<float>();
  }
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(x_nat.device());
  const cudaStream_t stream = current_stream();
  const bool f32_noise = noise.scalar_type() == at::kFloat;
  dispatch_float(x_nat.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = typename CudaType<scalar_t>::type;
    const int64_t batch = l2 ? x_nat.size(0) : 0;
    // The launch result goes through a variable: C10_CUDA_CHECK is a macro, and the comma in
    // <T, float> would split its argument.
    cudaError_t err;
    if (f32_noise) {
      const float* nz = noise.data_ptr<float>();
      err = l2 ? rwp::pgd_random_init_l2<T, float>(cptr<scalar_t>(x_nat), nz, radius_ptr,
                                                   mptr<scalar_t>(out), batch, numel / batch, e,
                                                   stream)
               : rwp::pgd_random_init_linf<T, float>(cptr<scalar_t>(x_nat), nz,
                                                     mptr<scalar_t>(out), numel, e, stream);
    } else {
      const T* nz = cptr<scalar_t>(noise);
      err = l2 ? rwp::pgd_random_init_l2<T, T>(cptr<scalar_t>(x_nat), nz, radius_ptr,
                                               mptr<scalar_t>(out), batch, numel / batch, e,
                                               stream)
               : rwp::pgd_random_init_linf<T, T>(cptr<scalar_t>(x_nat), nz, mptr<scalar_t>(out),
                                                 numel, e, stream);
    }
    C10_CUDA_CHECK(err);
  });
}

// ------------------------------------------------------------------------------------------------
// lsc_loss
// ------------------------------------------------------------------------------------------------

void check_logits(const Tensor& logits, const char* op, const char* name) {
  check_main(logits, op, name);
  TORCH_CHECK(logits.dim() == 2, op, ": ", name, " must be 2-D (B, C), got shape ",
              logits.sizes());
  // B >= 1 as in the Triton host functions: count and masked_mean are written by the kernels.
  TORCH_CHECK(logits.size(0) >= 1 && logits.size(1) >= 1, op, ": ", name,
              " must be (B, C) with B, C >= 1, got shape ", logits.sizes());
}

void check_target(const Tensor& target, const Tensor& logits, const char* op) {
  check_aux(target, logits, "logits", at::kLong, op, "target");
  check_shape(target, {logits.size(0)}, op, "target");
}

void check_range(double p, double q, const char* op) {
  TORCH_CHECK(p <= q, op, ": the LSC range [p, q) needs p <= q, got p=", p, ", q=", q);
}

void check_grad_out(const Tensor& grad_out, const Tensor& ref, const char* op) {
  check_aux(grad_out, ref, "logits", at::kFloat, op, "grad_out");
  TORCH_CHECK(grad_out.numel() == 1, op, ": grad_out must have one element, got shape ",
              grad_out.sizes());
}

// The row vectors saved by the forward: (B,) of the given dtype.
void check_row_vector(const Tensor& t, const Tensor& logits, at::ScalarType dtype, const char* op,
                      const char* name) {
  check_aux(t, logits, "logits", dtype, op, name);
  check_shape(t, {logits.size(0)}, op, name);
}

// The four outputs that both forwards share; the kernels write every element, so none is zeroed.
struct LscOutputs {
  Tensor loss, mask, count, masked_mean;
};

LscOutputs make_lsc_outputs(const Tensor& logits) {
  const int64_t batch = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  return {at::empty({batch}, f32), at::empty({batch}, logits.options().dtype(at::kBool)),
          at::empty({1}, logits.options().dtype(at::kLong)), at::empty({1}, f32)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lsc_loss_fwd(const Tensor& logits,
                                                                const Tensor& target, double p,
                                                                double q) {
  constexpr const char* op = "lsc_loss_fwd";
  check_logits(logits, op, "logits");
  check_target(target, logits, op);
  check_range(p, q, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  LscOutputs o = make_lsc_outputs(logits);
  Tensor lse = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  const int64_t batch = logits.size(0), classes = logits.size(1);
  if (batch > 0) {
    const cudaStream_t stream = current_stream();
    // The reference compares the fp32 loss with p and q rounded to fp32, as torch casts a Python
    // scalar to the tensor's dtype.
    dispatch_float(logits.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      C10_CUDA_CHECK(rwp::lsc_loss_fwd(
          cptr<scalar_t>(logits), target.data_ptr<int64_t>(), batch, classes,
          static_cast<float>(p), static_cast<float>(q), o.loss.data_ptr<float>(),
          o.mask.data_ptr<bool>(), o.count.data_ptr<int64_t>(), o.masked_mean.data_ptr<float>(),
          lse.data_ptr<float>(), stream));
    });
  }
  return {o.loss, o.mask, o.count, o.masked_mean, lse};
}

Tensor lsc_loss_bwd(const Tensor& grad_out, const Tensor& logits, const Tensor& target,
                    const Tensor& lse, const Tensor& mask) {
  constexpr const char* op = "lsc_loss_bwd";
  check_logits(logits, op, "logits");
  check_grad_out(grad_out, logits, op);
  check_target(target, logits, op);
  check_row_vector(lse, logits, at::kFloat, op, "lse");
  check_row_vector(mask, logits, at::kBool, op, "mask");
  const c10::cuda::CUDAGuard guard(logits.device());
  Tensor dlogits = at::empty_like(logits);
  const int64_t batch = logits.size(0), classes = logits.size(1);
  if (batch > 0) {
    const cudaStream_t stream = current_stream();
    dispatch_float(logits.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      C10_CUDA_CHECK(rwp::lsc_loss_bwd(grad_out.data_ptr<float>(), cptr<scalar_t>(logits),
                                       target.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                       mask.data_ptr<bool>(), batch, classes,
                                       mptr<scalar_t>(dlogits), stream));
    });
  }
  return dlogits;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lsc_loss_trades_fwd(
    const Tensor& logits_nat, const Tensor& logits_adv, const Tensor& target, double beta,
    double p, double q) {
  constexpr const char* op = "lsc_loss_trades_fwd";
  check_logits(logits_nat, op, "logits_nat");
  check_like(logits_adv, logits_nat, op, "logits_adv", "logits_nat");
  check_target(target, logits_nat, op);
  check_range(p, q, op);
  const c10::cuda::CUDAGuard guard(logits_nat.device());
  LscOutputs o = make_lsc_outputs(logits_nat);
  const int64_t batch = logits_nat.size(0), classes = logits_nat.size(1);
  const auto f32 = logits_nat.options().dtype(at::kFloat);
  Tensor lse_nat = at::empty({batch}, f32), lse_adv = at::empty({batch}, f32),
         kl = at::empty({batch}, f32);
  if (batch > 0) {
    const cudaStream_t stream = current_stream();
    dispatch_float(logits_nat.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      C10_CUDA_CHECK(rwp::lsc_loss_trades_fwd(
          cptr<scalar_t>(logits_nat), cptr<scalar_t>(logits_adv), target.data_ptr<int64_t>(),
          batch, classes, static_cast<float>(beta), static_cast<float>(p),
          static_cast<float>(q), o.loss.data_ptr<float>(), o.mask.data_ptr<bool>(),
          o.count.data_ptr<int64_t>(), o.masked_mean.data_ptr<float>(),
          lse_nat.data_ptr<float>(), lse_adv.data_ptr<float>(), kl.data_ptr<float>(), stream));
    });
  }
  return {o.loss, o.mask, o.count, o.masked_mean, lse_nat, lse_adv, kl};
}

std::tuple<Tensor, Tensor> lsc_loss_trades_bwd(const Tensor& grad_out, const Tensor& logits_nat,
                                               const Tensor& logits_adv, const Tensor& target,
                                               const Tensor& lse_nat, const Tensor& lse_adv,
                                               const Tensor& kl, const Tensor& mask, double beta) {
  constexpr const char* op = "lsc_loss_trades_bwd";
  check_logits(logits_nat, op, "logits_nat");
  check_like(logits_adv, logits_nat, op, "logits_adv", "logits_nat");
  check_grad_out(grad_out, logits_nat, op);
  check_target(target, logits_nat, op);
  check_row_vector(lse_nat, logits_nat, at::kFloat, op, "lse_nat");
  check_row_vector(lse_adv, logits_nat, at::kFloat, op, "lse_adv");
  check_row_vector(kl, logits_nat, at::kFloat, op, "kl");
  check_row_vector(mask, logits_nat, at::kBool, op, "mask");
  const c10::cuda::CUDAGuard guard(logits_nat.device());
  Tensor d_nat = at::empty_like(logits_nat), d_adv = at::empty_like(logits_adv);
  const int64_t batch = logits_nat.size(0), classes = logits_nat.size(1);
  if (batch > 0) {
    const cudaStream_t stream = current_stream();
    dispatch_float(logits_nat.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      C10_CUDA_CHECK(rwp::lsc_loss_trades_bwd(
          grad_out.data_ptr<float>(), cptr<scalar_t>(logits_nat), cptr<scalar_t>(logits_adv),
          target.data_ptr<int64_t>(), lse_nat.data_ptr<float>(), lse_adv.data_ptr<float>(),
          kl.data_ptr<float>(), mask.data_ptr<bool>(), batch, classes, static_cast<float>(beta),
          mptr<scalar_t>(d_nat), mptr<scalar_t>(d_adv), stream));
    });
  }
  return {d_nat, d_adv};
}

// ------------------------------------------------------------------------------------------------
// weight_perturb
// ------------------------------------------------------------------------------------------------

// Checks the chunk table against the flat buffer x and returns its device view. The table's
// contents (the offsets, starts and segment ids) are trusted: they live on the device, and reading
// them here would synchronize. The kernels clamp every chunk to [0, numel), so a bad table gives
// wrong numbers, never an out-of-bounds access.
rwp::SegmentTableView table_view(const Tensor& x, const char* x_name, const Tensor& offsets,
                                 const Tensor& chunk_seg, const Tensor& chunk_start,
                                 const Tensor& seg_chunk_start, int64_t chunk, const char* op) {
  TORCH_CHECK(x.dim() == 1, op, ": ", x_name, " must be a 1-D (N,) flat buffer, got shape ",
              x.sizes());
  check_aux(offsets, x, x_name, at::kLong, op, "table.offsets");
  check_aux(chunk_seg, x, x_name, at::kInt, op, "table.chunk_seg");
  check_aux(chunk_start, x, x_name, at::kLong, op, "table.chunk_start");
  check_aux(seg_chunk_start, x, x_name, at::kInt, op, "table.seg_chunk_start");
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": table.offsets must be 1-D (L+1,), got shape ", offsets.sizes());
  const int64_t num_segments = offsets.size(0) - 1;
  check_shape(seg_chunk_start, {num_segments + 1}, op, "table.seg_chunk_start");
  TORCH_CHECK(chunk_seg.dim() == 1, op, ": table.chunk_seg must be 1-D (M,), got shape ",
              chunk_seg.sizes());
  check_shape(chunk_start, chunk_seg.sizes(), op, "table.chunk_start");
  TORCH_CHECK(chunk > 0, op, ": table.chunk must be positive, got ", chunk);
  const int64_t num_chunks = chunk_seg.size(0);
  TORCH_CHECK(num_chunks <= INT32_MAX, op,
              ": the table has more than 2^31-1 chunks (one CUDA block each), got ", num_chunks,
              "; use a larger chunk");
  return rwp::SegmentTableView{offsets.data_ptr<int64_t>(),
                               chunk_seg.data_ptr<int32_t>(),
                               chunk_start.data_ptr<int64_t>(),
                               seg_chunk_start.data_ptr<int32_t>(),
                               num_segments,
                               num_chunks,
                               x.numel(),
                               chunk};
}

void check_segment_vector(const Tensor& t, const Tensor& x, const char* x_name,
                          int64_t num_segments, const char* op, const char* name) {
  check_aux(t, x, x_name, at::kFloat, op, name);
  check_shape(t, {num_segments}, op, name);
}

Tensor segment_sq_norm(const Tensor& x, const Tensor& offsets, const Tensor& chunk_seg,
                       const Tensor& chunk_start, const Tensor& seg_chunk_start, int64_t chunk) {
  constexpr const char* op = "segment_sq_norm";
  check_main(x, op, "x");
  const rwp::SegmentTableView t =
      table_view(x, "x", offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = at::empty({t.num_segments}, f32);
  Tensor partial = at::empty({t.num_chunks}, f32);  // the caching allocator makes this cheap
  if (t.num_segments > 0) {
    const cudaStream_t stream = current_stream();
    dispatch_float(x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      C10_CUDA_CHECK(rwp::segment_sq_norm(cptr<scalar_t>(x), t, partial.data_ptr<float>(),
                                          out.data_ptr<float>(), stream));
    });
  }
  return out;
}

Tensor accumulate_sq_norm_(const Tensor& a, const Tensor& g, const std::optional<Tensor>& beta,
                           const Tensor& offsets, const Tensor& chunk_seg,
                           const Tensor& chunk_start, const Tensor& seg_chunk_start,
                           int64_t chunk) {
  constexpr const char* op = "accumulate_sq_norm_";
  check_main(a, op, "a");
  check_like(g, a, op, "g", "a");
  const rwp::SegmentTableView t =
      table_view(a, "a", offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, op);
  const float* beta_ptr = nullptr;
  if (beta.has_value()) {
    check_segment_vector(*beta, a, "a", t.num_segments, op, "beta");
    beta_ptr = beta->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(a.device());
  const auto f32 = a.options().dtype(at::kFloat);
  Tensor out = at::empty({t.num_segments}, f32);
  Tensor partial = at::empty({t.num_chunks}, f32);
  if (t.num_segments > 0) {
    const cudaStream_t stream = current_stream();
    dispatch_float(a.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      C10_CUDA_CHECK(rwp::accumulate_sq_norm(mptr<scalar_t>(a), cptr<scalar_t>(g), beta_ptr, t,
                                             partial.data_ptr<float>(), out.data_ptr<float>(),
                                             stream));
    });
  }
  return out;
}

void perturb_axpy_(const Tensor& w, const Tensor& a, const Tensor& scale, const Tensor& offsets,
                   const Tensor& chunk_seg, const Tensor& chunk_start,
                   const Tensor& seg_chunk_start, int64_t chunk, int64_t sign) {
  constexpr const char* op = "perturb_axpy_";
  check_main(w, op, "w");
  check_like(a, w, op, "a", "w");
  TORCH_CHECK(sign == 1 || sign == -1, op, ": sign must be +1 or -1, got ", sign);
  const rwp::SegmentTableView t =
      table_view(w, "w", offsets, chunk_seg, chunk_start, seg_chunk_start, chunk, op);
  check_segment_vector(scale, w, "w", t.num_segments, op, "scale");
  if (t.num_chunks == 0) return;
  const c10::cuda::CUDAGuard guard(w.device());
  const cudaStream_t stream = current_stream();
  dispatch_float(w.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    C10_CUDA_CHECK(rwp::perturb_axpy(mptr<scalar_t>(w), cptr<scalar_t>(a),
                                     scale.data_ptr<float>(), t, static_cast<int>(sign), stream));
  });
}

}  // namespace

// The schemas are the contract that rwp_fast/ops/cuda_ops.py and its register_fake functions
// follow. Tensor(a!) marks the tensor an op writes in place.
TORCH_LIBRARY(rwp_fast, m) {
  // Where the fake impls live (torch checks that register_fake is called from this module).
  m.set_python_module("rwp_fast.ops.fake_impls");
  m.def("pgd_step(Tensor x_adv, Tensor grad, Tensor x_nat, float alpha, float eps, str norm, "
        "Tensor(a!) out) -> ()");
  m.def("pgd_step_(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, float alpha, float eps, str norm) "
        "-> ()");
  m.def("pgd_random_init(Tensor x_nat, Tensor noise, float eps, str norm, Tensor? radius, "
        "Tensor(a!) out) -> ()");
  m.def("lsc_loss_fwd(Tensor logits, Tensor target, float p, float q) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lsc_loss_bwd(Tensor grad_out, Tensor logits, Tensor target, Tensor lse, Tensor mask) "
        "-> Tensor");
  m.def("lsc_loss_trades_fwd(Tensor logits_nat, Tensor logits_adv, Tensor target, float beta, "
        "float p, float q) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lsc_loss_trades_bwd(Tensor grad_out, Tensor logits_nat, Tensor logits_adv, "
        "Tensor target, Tensor lse_nat, Tensor lse_adv, Tensor kl, Tensor mask, float beta) "
        "-> (Tensor, Tensor)");
  m.def("segment_sq_norm(Tensor x, Tensor offsets, Tensor chunk_seg, Tensor chunk_start, "
        "Tensor seg_chunk_start, int chunk) -> Tensor");
  m.def("accumulate_sq_norm_(Tensor(a!) a, Tensor g, Tensor? beta, Tensor offsets, "
        "Tensor chunk_seg, Tensor chunk_start, Tensor seg_chunk_start, int chunk) -> Tensor");
  m.def("perturb_axpy_(Tensor(a!) w, Tensor a, Tensor scale, Tensor offsets, Tensor chunk_seg, "
        "Tensor chunk_start, Tensor seg_chunk_start, int chunk, int sign) -> ()");
}

#define RWP_IMPL_ALL(m)                                         \
  m.impl("pgd_step", &pgd_step);                                \
  m.impl("pgd_step_", &pgd_step_);                              \
  m.impl("pgd_random_init", &pgd_random_init);                  \
  m.impl("lsc_loss_fwd", &lsc_loss_fwd);                        \
  m.impl("lsc_loss_bwd", &lsc_loss_bwd);                        \
  m.impl("lsc_loss_trades_fwd", &lsc_loss_trades_fwd);          \
  m.impl("lsc_loss_trades_bwd", &lsc_loss_trades_bwd);          \
  m.impl("segment_sq_norm", &segment_sq_norm);                  \
  m.impl("accumulate_sq_norm_", &accumulate_sq_norm_);          \
  m.impl("perturb_axpy_", &perturb_axpy_);

TORCH_LIBRARY_IMPL(rwp_fast, CUDA, m) { RWP_IMPL_ALL(m) }

// The same functions are also registered for CPU. They never compute anything there: the first
// check fails with "<op>: <arg> must be a CUDA tensor, got device cpu". Without this registration a
// CPU call fails with the dispatcher's generic "Could not run 'rwp_fast::…' with arguments from the
// 'CPU' backend", which names no argument. It also lets the CPU-only CI test the device messages.
TORCH_LIBRARY_IMPL(rwp_fast, CPU, m) { RWP_IMPL_ALL(m) }

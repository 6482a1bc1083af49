// Torch side of the `cuda` backend: validates, allocates, calls the launchers of
// kernels/ddspo_loss.cu on the current stream, and registers `ddspo_fast::cuda_fwd` /
// `cuda_bwd` for the CUDA dispatch key. Built only in CUDA builds (setup.py adds
// csrc/cuda_*.cpp with -DDDSPO_WITH_CUDA), so the marker op `ddspo_fast::cuda_built`
// defined here exists exactly when the CUDA kernels do; `ddspo_fast::cuda_archs` says
// which GPU code the kernels were built as (ddspo_fast/loss/cuda_arch.py reads it).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <string>
#include <tuple>

#include "../kernels/ddspo_loss.cuh"

namespace {

ddspo_dtype to_ddspo(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DDSPO_F32;
    case at::kHalf: return DDSPO_F16;
    case at::kBFloat16: return DDSPO_BF16;
    default:
      TORCH_CHECK(false, "ddspo_fast cuda backend: dtype ", t,
                  " is not supported (float32, float16, bfloat16)");
  }
  return DDSPO_F32;  // unreachable
}

void check_rows(const char* name, const at::Tensor& t, int64_t rows, int64_t n,
                const at::Tensor& model) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == n, name, ": expected shape (",
              rows, ", ", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == model.scalar_type(), name, ": expected dtype ",
              model.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == model.device(), name, ": expected device ", model.device(),
              ", got ", t.device());
  TORCH_CHECK(n <= 1 || t.stride(1) == 1, name, ": the last dim must have stride 1");
}

int64_t check_model(const at::Tensor& model) {
  TORCH_CHECK(model.is_cuda(), "model: the cuda backend takes CUDA tensors, got ",
              model.device());
  TORCH_CHECK(model.dim() == 2 && model.size(0) > 0 && model.size(0) % 2 == 0,
              "model: expected (2B, N) with B >= 1, got ", model.sizes());
  TORCH_CHECK(model.size(1) > 0, "model: rows must not be empty");
  TORCH_CHECK(model.size(1) <= 1 || model.stride(1) == 1,
              "model: the last dim must have stride 1");
  to_ddspo(model.scalar_type());
  return model.size(0) / 2;
}

// SM count per device, queried once: the plan sizes the forward grid by it.
int sm_count(int device) {
  static std::array<int, 64> cache{};
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0 || device >= static_cast<int>(cache.size())) return 132;
  if (cache[device] == 0) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
    cache[device] = v > 0 ? v : 1;
  }
  return cache[device];
}

// The launchers return argument errors themselves and leave launch errors pending, for
// the idiomatic C10_CUDA_KERNEL_LAUNCH_CHECK right after them.
void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "ddspo_fast ", what, ": invalid launch arguments (",
              cudaGetErrorString(err), ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> cuda_fwd(
    const at::Tensor& model, const at::Tensor& target_w, const at::Tensor& target_l,
    const c10::optional<at::Tensor>& ref_w, const c10::optional<at::Tensor>& ref_l,
    const c10::optional<at::Tensor>& weights, double beta,
    const c10::optional<at::Tensor>& ref_mse_in) {
  const int64_t b = check_model(model);
  const int64_t n = model.size(1);
  check_rows("target_w", target_w, b, n, model);
  check_rows("target_l", target_l, b, n, model);
  const bool has_rw = ref_w.has_value() && ref_w->defined();
  const bool has_rl = ref_l.has_value() && ref_l->defined();
  // The reference as rows, or as its row errors (a reference cache): one of the two.
  at::Tensor given;
  if (ref_mse_in.has_value() && ref_mse_in->defined()) {
    TORCH_CHECK(!has_rw && !has_rl, "ref_mse: give either the reference rows (ref_w, ref_l) "
                "or ref_mse, not both");
    TORCH_CHECK(ref_mse_in->dim() == 1 && ref_mse_in->size(0) == 2 * b,
                "ref_mse: expected shape (", 2 * b, "), got ", ref_mse_in->sizes());
    TORCH_CHECK(ref_mse_in->device() == model.device(), "ref_mse: expected device ",
                model.device(), ", got ", ref_mse_in->device());
    TORCH_CHECK(at::isFloatingType(ref_mse_in->scalar_type()),
                "ref_mse: expected a floating dtype, got ", ref_mse_in->scalar_type());
    given = ref_mse_in->to(at::kFloat).contiguous();  // (2B,) floats: a no-op when fp32
  } else {
    TORCH_CHECK(has_rl, "ref_l: required unless ref_mse is given");
    check_rows("ref_l", *ref_l, b, n, model);
  }
  if (has_rw) check_rows("ref_w", *ref_w, b, n, model);
  at::Tensor w;
  if (weights.has_value() && weights->defined()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == b, "weights: expected shape (", b,
                ",), got ", weights->sizes());
    TORCH_CHECK(weights->device() == model.device(), "weights: expected device ",
                model.device(), ", got ", weights->device());
    w = weights->to(at::kFloat).contiguous();  // (B,) floats: a no-op in the usual case
  }

  const c10::cuda::CUDAGuard guard(model.device());
  const ddspo_dtype dt = to_ddspo(model.scalar_type());
  const int sms = sm_count(model.get_device());
  const ddspo_fwd_plan plan = ddspo_fwd_make_plan(b, n, dt, sms, 0);

  const auto f32 = model.options().dtype(at::kFloat);
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(ddspo_fwd_workspace_floats(b, plan.n_chunks))}, f32);
  at::Tensor loss = at::empty({}, f32);
  at::Tensor model_mse = at::empty({2 * b}, f32);
  at::Tensor ref_mse = at::empty({2 * b}, f32);
  at::Tensor margin = at::empty({b}, f32);
  at::Tensor grad_scale = at::empty({2 * b}, f32);

  ddspo_fwd_args a{};
  a.model = model.data_ptr();
  a.target_w = target_w.data_ptr();
  a.target_l = target_l.data_ptr();
  a.ref_w = has_rw ? ref_w->data_ptr() : nullptr;
  a.ref_l = has_rl ? ref_l->data_ptr() : nullptr;
  a.ref_mse_in = given.defined() ? given.data_ptr<float>() : nullptr;
  a.weights = w.defined() ? w.data_ptr<float>() : nullptr;
  a.B = b;
  a.N = n;
  a.s_model = model.stride(0);
  a.s_target_w = target_w.stride(0);
  a.s_target_l = target_l.stride(0);
  a.s_ref_w = has_rw ? ref_w->stride(0) : 0;
  a.s_ref_l = has_rl ? ref_l->stride(0) : 0;
  a.beta = static_cast<float>(beta);
  a.workspace = workspace.data_ptr<float>();
  a.loss = loss.data_ptr<float>();
  a.model_mse = model_mse.data_ptr<float>();
  a.ref_mse = ref_mse.data_ptr<float>();
  a.margin = margin.data_ptr<float>();
  a.grad_scale = grad_scale.data_ptr<float>();
  check_launch(ddspo_fwd_launch(&a, &plan, dt, c10::cuda::getCurrentCUDAStream().stream()),
               "forward");
  return {loss, model_mse, ref_mse, margin, grad_scale};
}

at::Tensor cuda_bwd(const at::Tensor& grad_loss, const at::Tensor& model,
                    const at::Tensor& target_w, const at::Tensor& target_l,
                    const at::Tensor& grad_scale) {
  const int64_t b = check_model(model);
  const int64_t n = model.size(1);
  check_rows("target_w", target_w, b, n, model);
  check_rows("target_l", target_l, b, n, model);
  TORCH_CHECK(grad_loss.numel() == 1 && grad_loss.device() == model.device(),
              "grad_loss: expected a 0-dim tensor on ", model.device());
  TORCH_CHECK(grad_scale.numel() == 2 * b && grad_scale.device() == model.device(),
              "grad_scale: expected (", 2 * b, ",) on ", model.device());
  // Both are tiny; .to/.contiguous are no-ops for the fp32 tensors the forward made.
  const at::Tensor gl = grad_loss.to(at::kFloat).contiguous();
  const at::Tensor gs = grad_scale.to(at::kFloat).contiguous();

  const c10::cuda::CUDAGuard guard(model.device());
  at::Tensor out = at::empty({2 * b, n}, model.options());
  ddspo_bwd_args a{};
  a.grad_loss = gl.data_ptr<float>();
  a.model = model.data_ptr();
  a.target_w = target_w.data_ptr();
  a.target_l = target_l.data_ptr();
  a.grad_scale = gs.data_ptr<float>();
  a.grad_model = out.data_ptr();
  a.B = b;
  a.N = n;
  a.s_model = model.stride(0);
  a.s_target_w = target_w.stride(0);
  a.s_target_l = target_l.stride(0);
  check_launch(ddspo_bwd_launch(&a, to_ddspo(model.scalar_type()),
                                c10::cuda::getCurrentCUDAStream().stream()),
               "backward");
  return out;
}

bool cuda_built() { return true; }

// setup.py passes the GPU code it asks nvcc for as bare tokens, e.g.
// -DDDSPO_CUDA_ARCHS=sm_80,sm_90,compute_90 (no quotes or semicolons to survive the
// shell); stringized here. Empty when unknown (a build that did not pass it).
#define DDSPO_STR_(...) #__VA_ARGS__
#define DDSPO_STR(...) DDSPO_STR_(__VA_ARGS__)
#ifdef DDSPO_CUDA_ARCHS
constexpr const char* kCudaArchs = DDSPO_STR(DDSPO_CUDA_ARCHS);
#else
constexpr const char* kCudaArchs = "";
#endif

std::string cuda_archs() { return kCudaArchs; }

}  // namespace

// The marker ops: no tensor arguments, so they are registered as catch-all kernels (m.def
// with a function), callable on any machine that loaded a CUDA build.
TORCH_LIBRARY_FRAGMENT(ddspo_fast, m) {
  m.def("cuda_built() -> bool", &cuda_built);
  m.def("cuda_archs() -> str", &cuda_archs);
}

TORCH_LIBRARY_IMPL(ddspo_fast, CUDA, m) {
  m.impl("cuda_fwd", &cuda_fwd);
  m.impl("cuda_bwd", &cuda_bwd);
}

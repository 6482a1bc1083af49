// CPU kernels for ddspo_fast::cpu_fwd / ddspo_fast::cpu_bwd (docs/internals.md section 1).
//
// The forward is one pass over model, target and reference rows; the backward one pass
// over model and target writing the gradient. Work is split into (row, chunk) tasks of a
// fixed size, so the partial sums and hence the result do not depend on the thread count.
// Squares are summed in fp32 lanes over short blocks, then widened to double: as accurate
// as PyTorch's cascade sum, at the speed of an fp32 loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One build runs on any x86-64; the loader picks the widest SIMD the CPU has.
#define DDSPO_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DDSPO_CLONES
#endif

namespace ddspo_fast {
namespace {

using at::Tensor;

// ------------------------------------------------------------------ element access
// Plain loads and stores that the compiler can vectorize (c10's converting operators
// are opaque calls in a loop, these are shifts and native conversions).
template <typename T> struct Elem;

template <> struct Elem<float> {
  using acc = float;
  static inline float load(const float* p, int64_t i) { return p[i]; }
  static inline void store(float* p, int64_t i, float v) { p[i] = v; }
};

template <> struct Elem<double> {
  using acc = double;
  static inline double load(const double* p, int64_t i) { return p[i]; }
  static inline void store(double* p, int64_t i, double v) { p[i] = v; }
};

template <> struct Elem<c10::BFloat16> {
  using acc = float;
  static inline float load(const c10::BFloat16* p, int64_t i) {
    uint32_t u = uint32_t(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
  static inline void store(c10::BFloat16* p, int64_t i, float v) {
    uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    // Round to nearest even, as torch's float->bfloat16 conversion does; keep NaN a NaN.
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    reinterpret_cast<uint16_t*>(p)[i] = std::isnan(v) ? uint16_t(0x7FC0) : uint16_t(rounded);
  }
};

template <> struct Elem<c10::Half> {
  using acc = float;
#if defined(__FLT16_MAX__)
  static inline float load(const c10::Half* p, int64_t i) {
    return static_cast<float>(reinterpret_cast<const _Float16*>(p)[i]);
  }
  static inline void store(c10::Half* p, int64_t i, float v) {
    reinterpret_cast<_Float16*>(p)[i] = static_cast<_Float16>(v);
  }
#else
  static inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
  static inline void store(c10::Half* p, int64_t i, float v) { p[i] = c10::Half(v); }
#endif
};

constexpr int64_t kLanes = 16;   // independent accumulators: one AVX-512 fp32 register
constexpr int64_t kBlock = 512;  // elements per lane group summed in fp32 before widening
constexpr int64_t kChunk = 16384;  // elements of one row per parallel task

// Sum over one chunk of (m - t)^2 and, when r is given, (r - t)^2.
template <typename T, bool kRef>
DDSPO_CLONES void sq_err_sums(const T* m, const T* t, const T* r, int64_t n, double* sum_m,
                              double* sum_r) {
  using E = Elem<T>;
  using A = typename E::acc;
  double dm = 0.0, dr = 0.0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    A am[kLanes] = {}, ar[kLanes] = {};
    for (int64_t k = 0; k < kBlock; k += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const A tv = E::load(t, i + k + l);
        const A d = E::load(m, i + k + l) - tv;
        am[l] += d * d;
        if (kRef) {
          const A e = E::load(r, i + k + l) - tv;
          ar[l] += e * e;
        }
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) {
      dm += am[l];
      if (kRef) dr += ar[l];
    }
  }
  for (; i < n; ++i) {
    const double tv = E::load(t, i);
    const double d = double(E::load(m, i)) - tv;
    dm += d * d;
    if (kRef) {
      const double e = double(E::load(r, i)) - tv;
      dr += e * e;
    }
  }
  *sum_m = dm;
  if (kRef) *sum_r = dr;
}

// out = scale * (m - t), in T.
template <typename T>
DDSPO_CLONES void scaled_diff(const T* m, const T* t, T* out, int64_t n,
                              typename Elem<T>::acc scale) {
  using E = Elem<T>;
  for (int64_t i = 0; i < n; ++i) E::store(out, i, scale * (E::load(m, i) - E::load(t, i)));
}

inline double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }
inline double sigmoid(double x) {
  if (x >= 0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

// ------------------------------------------------------------------ checks
void check_rows(const Tensor& x, const char* name, int64_t rows, int64_t n, const Tensor& model) {
  TORCH_CHECK(x.device().is_cpu(), name, ": expected a CPU tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows && x.size(1) == n, name, ": expected shape (",
              rows, ", ", n, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == model.scalar_type(), name, ": expected dtype ",
              model.scalar_type(), ", got ", x.scalar_type());
  TORCH_CHECK(x.stride(1) == 1 || n <= 1, name, ": the last dim must have stride 1");
}

struct RowPtrs {
  int64_t b, n;
  const void *model, *tw, *tl, *rw, *rl;
  int64_t s_model, s_tw, s_tl, s_rw, s_rl;  // row strides, in elements
};

int64_t grain_for(int64_t chunk_len) {
  // At least ~32K elements per thread, so tiny inputs run inline without thread wake-ups.
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(chunk_len, 1));
}

// ------------------------------------------------------------------ ops
// The reference's per-row errors given instead of its rows (a reference cache): as
// doubles, checked like the rows are.
Tensor given_ref_mse(const c10::optional<Tensor>& ref_mse, bool has_rows, int64_t rows) {
  if (!(ref_mse.has_value() && ref_mse->defined())) {
    TORCH_CHECK(has_rows, "ref_l: required unless ref_mse is given");
    return Tensor();
  }
  TORCH_CHECK(!has_rows, "ref_mse: give either the reference rows (ref_w, ref_l) or ref_mse, "
              "not both");
  TORCH_CHECK(ref_mse->device().is_cpu(), "ref_mse: expected a CPU tensor, got one on ",
              ref_mse->device());
  TORCH_CHECK(ref_mse->dim() == 1 && ref_mse->size(0) == rows, "ref_mse: expected shape (",
              rows, "), got ", ref_mse->sizes());
  TORCH_CHECK(at::isFloatingType(ref_mse->scalar_type()), "ref_mse: expected a floating "
              "dtype, got ", ref_mse->scalar_type());
  return ref_mse->to(at::kDouble).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cpu_fwd(
    const Tensor& model, const Tensor& target_w, const Tensor& target_l,
    const c10::optional<Tensor>& ref_w, const c10::optional<Tensor>& ref_l_opt,
    const c10::optional<Tensor>& weights, double beta, const c10::optional<Tensor>& ref_mse_in) {
  TORCH_CHECK(model.dim() == 2 && model.size(0) % 2 == 0 && model.size(0) > 0,
              "model: expected shape (2B, N) with B >= 1, got ", model.sizes());
  const int64_t b = model.size(0) / 2, n = model.size(1), rows = 2 * b;
  check_rows(model, "model", rows, n, model);
  check_rows(target_w, "target_w", b, n, model);
  check_rows(target_l, "target_l", b, n, model);
  const bool has_rw = ref_w.has_value() && ref_w->defined();
  const bool has_rl = ref_l_opt.has_value() && ref_l_opt->defined();
  const Tensor given = given_ref_mse(ref_mse_in, has_rw || has_rl, rows);
  TORCH_CHECK(given.defined() || has_rl, "ref_l: required when ref_w is given");
  const Tensor ref_l = has_rl ? *ref_l_opt : Tensor();
  if (has_rl) check_rows(ref_l, "ref_l", b, n, model);
  if (has_rw) check_rows(*ref_w, "ref_w", b, n, model);
  const bool has_w = weights.has_value() && weights->defined();
  Tensor w;
  if (has_w) {
    w = weights->to(at::kFloat).contiguous();
    TORCH_CHECK(w.dim() == 1 && w.size(0) == b, "weights: expected shape (", b, "), got ",
                w.sizes());
  }

  const int64_t chunk = std::min<int64_t>(std::max<int64_t>(n, 1), kChunk);
  const int64_t nchunks = std::max<int64_t>(1, (n + chunk - 1) / chunk);
  std::vector<double> part_m(rows * nchunks, 0.0), part_r(rows * nchunks, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model.scalar_type(), "ddspo_cpu_fwd",
                                  [&] {
    const scalar_t* mp = model.const_data_ptr<scalar_t>();
    const scalar_t* twp = target_w.const_data_ptr<scalar_t>();
    const scalar_t* tlp = target_l.const_data_ptr<scalar_t>();
    const scalar_t* rwp = has_rw ? ref_w->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* rlp = has_rl ? ref_l.const_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows * nchunks, grain_for(chunk), [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t j = task / nchunks, e0 = (task % nchunks) * chunk;
        const int64_t len = std::min(chunk, n - e0);
        if (len <= 0) continue;
        const bool win = j < b;
        const int64_t i = win ? j : j - b;
        const scalar_t* m = mp + j * model.stride(0) + e0;
        const scalar_t* t = (win ? twp + i * target_w.stride(0) : tlp + i * target_l.stride(0)) + e0;
        const scalar_t* r = win ? (has_rw ? rwp + i * ref_w->stride(0) + e0 : nullptr)
                                : (has_rl ? rlp + i * ref_l.stride(0) + e0 : nullptr);
        if (r)
          sq_err_sums<scalar_t, true>(m, t, r, len, &part_m[task], &part_r[task]);
        else
          sq_err_sums<scalar_t, false>(m, t, nullptr, len, &part_m[task], nullptr);
      }
    });
  });

  auto f32 = model.options().dtype(at::kFloat);
  Tensor loss = at::empty({}, f32), model_mse = at::empty({rows}, f32),
         ref_mse = at::empty({rows}, f32), margin = at::empty({b}, f32);
  // fp64 inputs keep an fp64 gradient scale, so their gradient stays fp64-accurate.
  const bool f64 = model.scalar_type() == at::kDouble;
  Tensor grad_scale = at::empty({rows}, model.options().dtype(f64 ? at::kDouble : at::kFloat));
  std::vector<double> mm(rows), rm(rows);
  const double inv_n = n > 0 ? 1.0 / double(n) : 0.0;
  for (int64_t j = 0; j < rows; ++j) {
    double sm = 0.0, sr = 0.0;
    for (int64_t c = 0; c < nchunks; ++c) {
      sm += part_m[j * nchunks + c];
      sr += part_r[j * nchunks + c];
    }
    mm[j] = sm * inv_n;
    rm[j] = sr * inv_n;
    if (given.defined()) {
      // Given errors are fp32 (as this kernel's own are returned): m enters the margin at
      // that precision too, so a policy row equal to its reference row gives exactly 0.
      rm[j] = given.const_data_ptr<double>()[j];
      if (!f64) mm[j] = double(float(mm[j]));
    }
    model_mse.data_ptr<float>()[j] = float(mm[j]);
    ref_mse.data_ptr<float>()[j] = float(rm[j]);
  }
  const float* wp = has_w ? w.const_data_ptr<float>() : nullptr;
  double total = 0.0;
  for (int64_t i = 0; i < b; ++i) {
    const double z = -0.5 * beta * ((mm[i] - mm[b + i]) - (rm[i] - rm[b + i]));
    const double wi = wp ? double(wp[i]) : 1.0;
    total += wi * softplus(-z);
    const double g = wi / double(b) * sigmoid(-z) * beta * inv_n;
    margin.data_ptr<float>()[i] = float(z);
    if (f64) {
      grad_scale.data_ptr<double>()[i] = g;
      grad_scale.data_ptr<double>()[b + i] = -g;
    } else {
      grad_scale.data_ptr<float>()[i] = float(g);
      grad_scale.data_ptr<float>()[b + i] = float(-g);
    }
  }
  loss.fill_(total / double(b));
  return {loss, model_mse, ref_mse, margin, grad_scale};
}

Tensor cpu_bwd(const Tensor& grad_loss, const Tensor& model, const Tensor& target_w,
               const Tensor& target_l, const Tensor& grad_scale) {
  TORCH_CHECK(model.dim() == 2 && model.size(0) % 2 == 0, "model: expected shape (2B, N), got ",
              model.sizes());
  const int64_t b = model.size(0) / 2, n = model.size(1), rows = 2 * b;
  check_rows(model, "model", rows, n, model);
  check_rows(target_w, "target_w", b, n, model);
  check_rows(target_l, "target_l", b, n, model);
  TORCH_CHECK(grad_scale.numel() == rows, "grad_scale: expected ", rows, " values, got ",
              grad_scale.numel());
  const double g = grad_loss.item<double>();
  Tensor gs = grad_scale.to(at::kDouble).contiguous();
  Tensor out = at::empty({rows, n}, model.options());
  if (n == 0 || rows == 0) return out;
  const int64_t chunk = std::min<int64_t>(n, kChunk);
  const int64_t nchunks = (n + chunk - 1) / chunk;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, model.scalar_type(), "ddspo_cpu_bwd",
                                  [&] {
    using A = typename Elem<scalar_t>::acc;
    const scalar_t* mp = model.const_data_ptr<scalar_t>();
    const scalar_t* twp = target_w.const_data_ptr<scalar_t>();
    const scalar_t* tlp = target_l.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const double* gsp = gs.const_data_ptr<double>();
    at::parallel_for(0, rows * nchunks, grain_for(chunk), [&](int64_t t0, int64_t t1) {
      for (int64_t task = t0; task < t1; ++task) {
        const int64_t j = task / nchunks, e0 = (task % nchunks) * chunk;
        const int64_t len = std::min(chunk, n - e0);
        const bool win = j < b;
        const int64_t i = win ? j : j - b;
        const scalar_t* t = (win ? twp + i * target_w.stride(0) : tlp + i * target_l.stride(0)) + e0;
        scaled_diff<scalar_t>(mp + j * model.stride(0) + e0, t, op + j * n + e0, len,
                              A(g * gsp[j]));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddspo_fast, CPU, m) {
  m.impl("cpu_fwd", &cpu_fwd);
  m.impl("cpu_bwd", &cpu_bwd);
}

}  // namespace ddspo_fast

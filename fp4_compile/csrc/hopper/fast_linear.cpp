// The eager fast path of fp4::linear on Hopper: a CUDA-key kernel in C++ that replays, for a call
// whose key (backend, device, dtype, bias, M, K, N, Np, Kp) it has seen, the launches that the
// Python implementation chose for that key: the quantization kernel (block values or codes) and
// the small-M or wgmma GEMM, through their C entry points.
//
// Why: an eager call through the Python path costs about 100-150 us of host time on the H100 hosts
// (checks, dispatch decisions, two ctypes launches; benchmarks/NOTES.md v10, v19), which bounds eager
// prefill and decode without CUDA graphs. The decisions stay in Python (fp4_compile/ops/fast_linear.py
// records each key's plan after its first call); this file only executes plans.
//
// fp4::linear_group runs its members through the same replay eagerly (the grouped launch is for graphs).
//
// Any call it cannot replay exactly (an unseen key, a stream being captured, strided or misaligned
// rows, other dtypes or devices) goes to fp4::_linear_python, the Python implementation, which
// validates, raises the package's errors and may record a plan.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// The C entry points (nvfp4_quant.cu, nvfp4_small_m.cu, nvfp4_wgmma.cu); their addresses come
// with each plan.
using QuantFn = int (*)(const void* x, int64_t ldx, int x_dtype, void* q, int64_t ldq, void* s, int64_t lds,
                        void* v, int64_t ldv, int v_fp16, const float* gs, int M, int K, int mode,
                        int ctas_per_sm, int pdl, cudaStream_t stream);
using SmallMFn = int (*)(const void* x, int64_t ldx, const void* xs, int64_t ldxs, const void* w, int64_t ldw,
                         const void* ws, int64_t ldws, void* out, int64_t ldo, const void* bias, const float* alpha,
                         int M, int N, int K, int Kp, int x_fp16, int out_fp32, int rows_per_warp, int stages,
                         int warps, int pdl, cudaStream_t stream);
using WgmmaFn = int (*)(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* ws, int64_t ldws,
                        void* out, int64_t ldo, float* fixup, int* tickets, const void* bias, const float* alpha,
                        int M, int N, int Np, int K, int Kp, int x_fp16, int out_fp32, int bn, int wm, int splits,
                        int tail_tiles, int tail_splits, int pdl, cudaStream_t stream);

// Plan layout: the field order of fast_linear.Plan in Python (set_plan takes them as a list).
constexpr int64_t kQuantNone = 0, kQuantValues = 2, kQuantCodes = 3;  // cuda_quant's mode numbers
constexpr int64_t kGemmSmallM = 0, kGemmWgmma = 1;
constexpr int64_t kCodeChunk = 32;  // activation codes cover K rounded up to 32 (weight_layout.CHUNK)
constexpr int64_t kMaxPlans = 1 << 16;

struct Plan {
  int64_t quant_fn, quant_mode, quant_ctas_per_sm;
  int64_t gemm_fn, gemm_kind;
  int64_t p0, p1, p2, p3, p4;  // small-M: rows per warp, stages, warps; wgmma: bn, wm, splits, tail, tail splits
  int64_t fixup_floats, tickets, pdl;
};
constexpr size_t kPlanFields = sizeof(Plan) / sizeof(int64_t);

struct Key {
  std::string backend;
  int64_t device, dtype, bias, m, k, n, np, kp;
  bool operator==(const Key& o) const {
    return device == o.device && dtype == o.dtype && bias == o.bias && m == o.m && k == o.k && n == o.n &&
           np == o.np && kp == o.kp && backend == o.backend;
  }
};

struct KeyHash {
  size_t operator()(const Key& key) const {
    size_t h = std::hash<std::string>()(key.backend);
    for (int64_t v : {key.device, key.dtype, key.bias, key.m, key.k, key.n, key.np, key.kp}) {
      h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    }
    return h;
  }
};

std::mutex g_mutex;
std::unordered_map<Key, Plan, KeyHash> g_plans;
std::atomic<int64_t> g_replayed{0};  // calls this path ran (tests check that it did)
// Self-resetting split-K tickets (split_tickets.py's policy, in a buffer of this path's own: the
// Python path's launches take theirs from its buffer, so that the two never share a region).
constexpr int64_t kTicketEntries = 1 << 16;
std::unordered_map<int64_t, at::Tensor> g_tickets;
std::unordered_map<int64_t, int64_t> g_ticket_next;

int64_t dtype_code(at::ScalarType t) {
  return t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : -1;  // cuda_quant.DTYPE_CODES
}

bool unit_stride_rows(const at::Tensor& t, int64_t row_bytes_multiple) {
  return t.dim() == 2 && t.stride(1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(0) == 1 || (t.stride(0) * t.element_size()) % row_bytes_multiple == 0);
}

bool on(const at::Tensor& t, const c10::Device& device) { return t.device() == device; }

int* take_tickets(const c10::Device& device, int64_t count) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_tickets.find(device.index());
  if (it == g_tickets.end()) {
    it = g_tickets.emplace(device.index(), at::zeros({kTicketEntries}, at::dtype(at::kInt).device(device))).first;
  }
  int64_t& next = g_ticket_next[device.index()];
  if (next + count > kTicketEntries) next = 0;
  int* region = it->second.data_ptr<int>() + next;
  next += count;
  return region;
}

// The plan for this call, or none where it must take the Python path.
std::optional<Plan> find_plan(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                      const at::Tensor& gs, const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                      int64_t n, c10::string_view backend) {
  const c10::Device device = x.device();
  const int64_t dtype = dtype_code(x.scalar_type());
  if (dtype < 0 || x.dim() != 2 || weight.dim() != 2 || weight_scale.dim() != 2) return std::nullopt;
  if (weight.scalar_type() != at::kByte ||
      (weight_scale.scalar_type() != at::kFloat8_e4m3fn && weight_scale.scalar_type() != at::kByte) ||
      gs.scalar_type() != at::kFloat || gs.numel() != 1 || alpha.scalar_type() != at::kFloat || alpha.numel() != 1) {
    return std::nullopt;
  }
  if (!on(weight, device) || !on(weight_scale, device) || !on(gs, device) || !on(alpha, device)) return std::nullopt;
  if (bias.has_value() && (bias->scalar_type() != x.scalar_type() || !on(*bias, device) || bias->dim() != 1 ||
                           bias->size(0) != n || !bias->is_contiguous())) {
    return std::nullopt;
  }
  // The kernels read 16-byte vectors of x's rows and the weight's (TMA for the wgmma kernel).
  if (!unit_stride_rows(x, 16) || !unit_stride_rows(weight, 16) || weight_scale.stride(1) != 1) return std::nullopt;
  const Key key{std::string(backend), device.index(), dtype, bias.has_value() ? 1 : 0, x.size(0), x.size(1), n,
                weight.size(0), weight.size(1) * 2};
  if (weight_scale.size(0) != key.np || weight_scale.size(1) * 16 < key.kp) return std::nullopt;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_plans.find(key);
  if (it == g_plans.end()) return std::nullopt;
  return it->second;
}

void check_launch(int err, const char* what, const at::Tensor& x, int64_t n) {
  TORCH_CHECK(err == 0, "fp4::linear fast path: ", what, " failed: CUDA error ", err, " (", cudaGetErrorString(
      static_cast<cudaError_t>(err)), ") at M=", x.size(0), ", N=", n, ", K=", x.size(1));
}

using LinearSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                   const at::Tensor&, const std::optional<at::Tensor>&, c10::SymInt, c10::string_view);

at::Tensor linear_python(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                         const at::Tensor& gs, const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                         c10::SymInt out_features, c10::string_view backend) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fp4::_linear_python", "").typed<LinearSignature>();
  return op.call(x, weight, weight_scale, gs, alpha, bias, std::move(out_features), backend);
}

at::Tensor linear_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                       const at::Tensor& gs, const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                       c10::SymInt out_features, c10::string_view backend) {
  const int64_t n = out_features.expect_int();
  const std::optional<Plan> plan = find_plan(x, weight, weight_scale, gs, alpha, bias, n, backend);
  if (!plan) return linear_python(x, weight, weight_scale, gs, alpha, bias, std::move(out_features), backend);
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  // Captured calls take the Python path: it picks the kernels that are fastest inside a graph.
  if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
    return linear_python(x, weight, weight_scale, gs, alpha, bias, std::move(out_features), backend);
  }
  const int64_t m = x.size(0), k = x.size(1), np = weight.size(0), kp = weight.size(1) * 2;
  const int fp16 = x.scalar_type() == at::kHalf;
  const int pdl = static_cast<int>(plan->pdl);
  const int quant_pdl = pdl ? 2 : 0;  // the GEMM after the quantization waits for it: it may launch at once
  // The GEMM's activation operand: x itself (W4A16), its block values or its codes (W4A4).
  at::Tensor a = x, a_scale;
  if (plan->quant_mode == kQuantValues) {
    a = at::empty({m, k}, x.options());
    check_launch(reinterpret_cast<QuantFn>(plan->quant_fn)(
                     x.data_ptr(), x.stride(0), static_cast<int>(dtype_code(x.scalar_type())), a.data_ptr(),
                     a.stride(0), a.data_ptr(), a.stride(0), a.data_ptr(), a.stride(0), fp16,
                     gs.data_ptr<float>(), m, k, kQuantValues, plan->quant_ctas_per_sm, quant_pdl, stream),
                 "the quantization kernel", x, n);
  } else if (plan->quant_mode == kQuantCodes) {
    const int64_t kc = (k + kCodeChunk - 1) / kCodeChunk * kCodeChunk;
    a = at::empty({m, kc / 2}, x.options().dtype(at::kByte));
    a_scale = at::empty({m, kc / 16}, x.options().dtype(at::kByte));
    check_launch(reinterpret_cast<QuantFn>(plan->quant_fn)(
                     x.data_ptr(), x.stride(0), static_cast<int>(dtype_code(x.scalar_type())), a.data_ptr(),
                     a.stride(0), a_scale.data_ptr(), a_scale.stride(0), a.data_ptr(), a.stride(0), 0,
                     gs.data_ptr<float>(), m, k, kQuantCodes, plan->quant_ctas_per_sm, quant_pdl, stream),
                 "the quantization kernel", x, n);
  }
  at::Tensor out = at::empty({m, n}, x.options());
  const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  if (plan->gemm_kind == kGemmSmallM) {
    check_launch(reinterpret_cast<SmallMFn>(plan->gemm_fn)(
                     a.data_ptr(), a.stride(0), a_scale.defined() ? a_scale.data_ptr() : nullptr,
                     a_scale.defined() ? a_scale.stride(0) : 0, weight.data_ptr(), weight.stride(0),
                     weight_scale.data_ptr(), weight_scale.stride(0), out.data_ptr(), out.stride(0), bias_ptr,
                     alpha.data_ptr<float>(), m, n, k, kp, fp16, 0, plan->p0, plan->p1, plan->p2, pdl, stream),
                 "the small-M GEMM", x, n);
  } else {
    at::Tensor fixup;
    int* tickets = nullptr;
    if (plan->fixup_floats > 0) {
      fixup = at::empty({plan->fixup_floats}, x.options().dtype(at::kFloat));
      tickets = take_tickets(x.device(), plan->tickets);
    }
    check_launch(reinterpret_cast<WgmmaFn>(plan->gemm_fn)(
                     a.data_ptr(), a.stride(0), weight.data_ptr(), weight.stride(0), weight_scale.data_ptr(),
                     weight_scale.stride(0), out.data_ptr(), out.stride(0),
                     fixup.defined() ? fixup.data_ptr<float>() : nullptr, tickets, bias_ptr, alpha.data_ptr<float>(),
                     m, n, np, k, kp, fp16, 0, plan->p0, plan->p1, plan->p2, plan->p3, plan->p4, pdl, stream),
                 "the wgmma GEMM", x, n);
  }
  g_replayed.fetch_add(1, std::memory_order_relaxed);
  return out;
}

// fp4::linear_group (several linears of one activation, grouped by the compile pass at decode sizes):
// eagerly, each member as fp4::linear, so that each replays its plan here (one grouped launch saves GPU
// time, which only pays where the host is not the bound); a captured call takes the Python
// implementation, which launches the group at once.
using LinearGroupSignature = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                                     at::TensorList, at::TensorList,
                                                     const c10::List<std::optional<at::Tensor>>&,
                                                     c10::SymIntArrayRef, c10::string_view);

std::vector<at::Tensor> linear_group_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList weight_scales,
                                          at::TensorList gss, at::TensorList alphas,
                                          const c10::List<std::optional<at::Tensor>>& biases,
                                          c10::SymIntArrayRef out_features, c10::string_view backend) {
  const size_t count = weights.size();
  bool capturing = true;
  if (x.is_cuda()) {
    const c10::cuda::OptionalCUDAGuard guard(x.device());
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    capturing = cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(x.device().index()).stream(), &capture) !=
                    cudaSuccess || capture != cudaStreamCaptureStatusNone;
  }
  if (capturing || weight_scales.size() != count || gss.size() != count || alphas.size() != count ||
      biases.size() != count || out_features.size() != count) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fp4::_linear_group_python", "")
                               .typed<LinearGroupSignature>();
    return op.call(x, weights, weight_scales, gss, alphas, biases, out_features, backend);
  }
  std::vector<at::Tensor> outs;
  outs.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    outs.push_back(linear_cuda(x, weights[i], weight_scales[i], gss[i], alphas[i], biases.get(i), out_features[i],
                               backend));
  }
  return outs;
}

// fp4::linear_group's Autograd kernel for CUDA tensors: below autograd at once; an input that needs a
// gradient is refused as the Python kernel refuses it (library.py).
std::vector<at::Tensor> linear_group_autograd(c10::DispatchKeySet keys, const at::Tensor& x, at::TensorList weights,
                                              at::TensorList weight_scales, at::TensorList gss, at::TensorList alphas,
                                              const c10::List<std::optional<at::Tensor>>& biases,
                                              c10::SymIntArrayRef out_features, c10::string_view backend) {
  if (at::GradMode::is_enabled()) {
    bool needs_grad = x.requires_grad();
    for (const at::TensorList list : {weights, weight_scales, gss, alphas}) {
      for (const at::Tensor& t : list) needs_grad = needs_grad || t.requires_grad();
    }
    for (size_t i = 0; i < biases.size(); ++i) {
      const std::optional<at::Tensor> bias = biases.get(i);
      needs_grad = needs_grad || (bias.has_value() && bias->requires_grad());
    }
    TORCH_CHECK(!needs_grad, "fp4::linear_group has no backward: the NVFP4 layers are for inference (run them under "
                "torch.no_grad() or torch.inference_mode())");
  }
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fp4::linear_group", "").typed<LinearGroupSignature>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.redispatch(keys & c10::after_autograd_keyset, x, weights, weight_scales, gss, alphas, biases,
                       out_features, backend);
}

// fp4::linear's Autograd kernel for CUDA tensors, in place of the Python one (library.py) that would
// cost an eager call a Python hop: below autograd at once unless an input needs a gradient; then
// fp4::_linear_python with its Python Autograd kernel, whose outputs get a backward that raises.
at::Tensor linear_autograd(c10::DispatchKeySet keys, const at::Tensor& x, const at::Tensor& weight,
                           const at::Tensor& weight_scale, const at::Tensor& gs, const at::Tensor& alpha,
                           const std::optional<at::Tensor>& bias, c10::SymInt out_features, c10::string_view backend) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (x.requires_grad() || weight.requires_grad() || weight_scale.requires_grad() ||
                           gs.requires_grad() || alpha.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (needs_grad) return linear_python(x, weight, weight_scale, gs, alpha, bias, std::move(out_features), backend);
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fp4::linear", "").typed<LinearSignature>();
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.redispatch(keys & c10::after_autograd_keyset, x, weight, weight_scale, gs, alpha, bias,
                       std::move(out_features), backend);
}

// Records the plan of a key (fast_linear.remember); the first plan of a key stays.
void set_plan(c10::string_view backend, int64_t device, int64_t dtype, int64_t bias, int64_t m, int64_t k, int64_t n,
              int64_t np, int64_t kp, at::IntArrayRef fields) {
  TORCH_CHECK(fields.size() == kPlanFields, "set_plan takes ", kPlanFields, " plan fields, got ", fields.size());
  Plan plan;
  std::copy(fields.begin(), fields.end(), reinterpret_cast<int64_t*>(&plan));
  TORCH_CHECK(plan.gemm_fn != 0 && (plan.gemm_kind == kGemmSmallM || plan.gemm_kind == kGemmWgmma) &&
                  (plan.quant_mode == kQuantNone || plan.quant_fn != 0) &&
                  (plan.quant_mode == kQuantNone || plan.quant_mode == kQuantValues ||
                   plan.quant_mode == kQuantCodes) &&
                  (plan.fixup_floats == 0 || (plan.tickets > 0 && plan.tickets <= kTicketEntries)),
              "set_plan: an inconsistent plan");
  std::lock_guard<std::mutex> lock(g_mutex);
  if (static_cast<int64_t>(g_plans.size()) < kMaxPlans) {
    g_plans.emplace(Key{std::string(backend), device, dtype, bias, m, k, n, np, kp}, plan);
  }
}

int64_t plan_count() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int64_t>(g_plans.size());
}

void clear_plans() {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_plans.clear();
}

int64_t replayed_calls() { return g_replayed.load(std::memory_order_relaxed); }

}  // namespace

TORCH_LIBRARY(fp4_fast, m) {
  m.def("set_plan(str backend, int device, int dtype, int bias, int m, int k, int n, int np, int kp, int[] plan) -> ()",
        &set_plan);
  m.def("plan_count() -> int", &plan_count);
  m.def("clear_plans() -> ()", &clear_plans);
  m.def("replayed_calls() -> int", &replayed_calls);
}

TORCH_LIBRARY_IMPL(fp4, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("linear_group", &linear_group_cuda);
}

TORCH_LIBRARY_IMPL(fp4, AutogradCUDA, m) {
  m.impl("linear", &linear_autograd);
  m.impl("linear_group", &linear_group_autograd);
}

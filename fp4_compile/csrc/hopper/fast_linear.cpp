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
// The other ops of a compiled layer take the same shortcut past Python: fp4::linear_group and
// fp4::linear_silu_mul replay how the Python path ran their key (one launch of the small-M kernel's group
// entry, gated for linear_silu_mul, or each member as fp4::linear, then silu_mul.cu's kernel),
// fp4::rms_norm_quantize launches the norm kernel of nvfp4_quant.cu; and every op's Autograd kernel for
// CUDA tensors is C++.
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

using GroupFn = int (*)(int count, const int64_t* members, int M, int K, int Kp, int x_fp16, int out_fp32, int gated,
                        int warps, int pdl, cudaStream_t stream);

// The pointwise kernels of a layer's other fp4 ops (nvfp4_quant.cu, silu_mul.cu), per device (set_kernels).
using NormFn = int (*)(const void* x, int64_t ldx, const void* residual, int64_t ldr, const void* w, void* sum,
                       int64_t ldsum, void* v, int64_t ldv, int dtype, const float* gs, float eps, int M, int K,
                       int unit_offset, int pdl, cudaStream_t stream);
using SiluMulFn = int (*)(const void* gate, int64_t ldg, const void* up, int64_t ldu, void* out, int64_t ldo,
                          int dtype, int M, int N, int pdl, cudaStream_t stream);
struct Kernels {
  int64_t norm_fn = 0, silu_mul_fn = 0;  // 0: not available (the Python path runs the op)
  int64_t pdl = 0;
  int64_t trigger_max_m = 0;  // the norm lets the kernel after it launch early up to this M
  int64_t norm_max_k = 0;
};

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
std::unordered_map<int64_t, Kernels> g_kernels;  // by device index

// How the Python path ran an fp4::linear_group or fp4::linear_silu_mul call (fast_linear.remember_group; the field
// order of fast_linear.GroupPlan): its members as their own linears (then silu_mul), or one launch of the small-M
// kernel's group entry (gated for linear_silu_mul) on the activations quantized once (or taken as they are).
constexpr int64_t kGroupMembers = 0, kGroupLaunch = 1;
constexpr int64_t kMaxGroup = 4;  // members of one launch (nvfp4_small_m.cu)
struct GroupPlan {
  int64_t kind, quant_fn, quant_mode, quant_ctas_per_sm, group_fn, warps, pdl;
};
constexpr size_t kGroupPlanFields = sizeof(GroupPlan) / sizeof(int64_t);

struct GroupKey {
  std::string backend;
  std::vector<int64_t> fields;  // device, dtype, gated, M, K, one global-scale tensor; per member N, Np, Kp, bias
  bool operator==(const GroupKey& o) const { return fields == o.fields && backend == o.backend; }
};

struct GroupKeyHash {
  size_t operator()(const GroupKey& key) const {
    size_t h = std::hash<std::string>()(key.backend);
    for (int64_t v : key.fields) h ^= std::hash<int64_t>()(v) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
    return h;
  }
};
std::unordered_map<GroupKey, GroupPlan, GroupKeyHash> g_group_plans;

int64_t dtype_code(at::ScalarType t) {
  return t == at::kHalf ? 1 : t == at::kBFloat16 ? 2 : -1;  // cuda_quant.DTYPE_CODES
}

bool unit_stride_rows(const at::Tensor& t, int64_t row_bytes_multiple) {
  return t.dim() == 2 && t.stride(1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
         (t.size(0) == 1 || (t.stride(0) * t.element_size()) % row_bytes_multiple == 0);
}

bool on(const at::Tensor& t, const c10::Device& device) { return t.device() == device; }

// Is the current stream of `device` being captured into a CUDA graph (or can't we tell)?
bool capturing(const c10::Device& device) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()).stream(), &capture) != cudaSuccess ||
         capture != cudaStreamCaptureStatusNone;
}

// The pointwise kernels of `device` (none where set_kernels has not named them).
Kernels kernels_of(const c10::Device& device) {
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = g_kernels.find(device.index());
  return it == g_kernels.end() ? Kernels{} : it->second;
}

int* take_tickets(const c10::Device& device, int64_t count) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_tickets.find(device.index());
  if (it == g_tickets.end()) {
    it = g_tickets.emplace(device.index(), at::zeros({kTicketEntries}, at::dtype(at::kInt).device(device))).first;
    // zeroed on this stream; calls on other streams take regions of it too (never during capture: replays
    // are eager)
    c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
  }
  int64_t& next = g_ticket_next[device.index()];
  if (next + count > kTicketEntries) next = 0;
  int* region = it->second.data_ptr<int>() + next;
  next += count;
  return region;
}

// Are a linear's weight-side operands as the kernels take them (and the Python launchers pass them): the
// Hopper-layout weight, uint8 with unit-stride 16-byte aligned rows (the kernels read 16-byte vectors, the
// wgmma kernel through TMA); its e4m3 scales [Np, >= Kp/16] with unit-stride rows; alpha one float32; a
// contiguous [n] bias in x's dtype; all on x's device.
bool weight_operands_ok(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                        const at::Tensor& alpha, const std::optional<at::Tensor>& bias, int64_t n) {
  const c10::Device device = x.device();
  if (weight.dim() != 2 || weight_scale.dim() != 2 || weight.scalar_type() != at::kByte ||
      (weight_scale.scalar_type() != at::kFloat8_e4m3fn && weight_scale.scalar_type() != at::kByte) ||
      alpha.scalar_type() != at::kFloat || alpha.numel() != 1) {
    return false;
  }
  if (!on(weight, device) || !on(weight_scale, device) || !on(alpha, device)) return false;
  if (bias.has_value() && (bias->scalar_type() != x.scalar_type() || !on(*bias, device) || bias->dim() != 1 ||
                           bias->size(0) != n || !bias->is_contiguous())) {
    return false;
  }
  return unit_stride_rows(weight, 16) && weight_scale.stride(1) == 1 && weight_scale.size(0) == weight.size(0) &&
         weight_scale.size(1) * 16 >= weight.size(1) * 2;
}

// The activations' global scale as the quantization kernel reads it: one float32 on x's device.
bool global_scale_ok(const at::Tensor& x, const at::Tensor& gs) {
  return gs.scalar_type() == at::kFloat && gs.numel() == 1 && on(gs, x.device());
}

// The plan for this call, or none where it must take the Python path.
std::optional<Plan> find_plan(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                      const at::Tensor& gs, const at::Tensor& alpha, const std::optional<at::Tensor>& bias,
                      int64_t n, c10::string_view backend) {
  const int64_t dtype = dtype_code(x.scalar_type());
  if (dtype < 0 || x.dim() != 2 || !unit_stride_rows(x, 16) || !global_scale_ok(x, gs) ||
      !weight_operands_ok(x, weight, weight_scale, alpha, bias, n)) {
    return std::nullopt;
  }
  const Key key{std::string(backend), x.device().index(), dtype, bias.has_value() ? 1 : 0, x.size(0), x.size(1), n,
                weight.size(0), weight.size(1) * 2};
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_plans.find(key);
  if (it == g_plans.end()) return std::nullopt;
  return it->second;
}

// The fast path's error where a kernel launch returned a cudaError_t (0: none); `shape` is streamed after "at ".
template <typename... Shape>
void check_kernel(int err, const char* op, const char* what, const Shape&... shape) {
  TORCH_CHECK(err == 0, op, " fast path: ", what, " failed: CUDA error ", err, " (",
              cudaGetErrorString(static_cast<cudaError_t>(err)), ") at ", shape...);
}

void check_launch(int err, const char* what, const at::Tensor& x, int64_t n) {
  check_kernel(err, "fp4::linear", what, "M=", x.size(0), ", N=", n, ", K=", x.size(1));
}

// The GEMM's activation operand: x itself (W4A16, quant_mode none), its block values or its codes with their
// scales (W4A4), quantized with global scale gs by the kernel at quant_fn.
std::pair<at::Tensor, at::Tensor> gemm_activations(const at::Tensor& x, const at::Tensor& gs, int64_t quant_mode,
                                                   int64_t quant_fn, int64_t ctas_per_sm, int pdl, cudaStream_t stream,
                                                   int64_t n) {
  const int64_t m = x.size(0), k = x.size(1);
  const int quant_pdl = pdl ? 2 : 0;  // the GEMM after the quantization waits for it: it may launch at once
  const int dtype = static_cast<int>(dtype_code(x.scalar_type()));
  if (quant_mode == kQuantValues) {
    at::Tensor a = at::empty({m, k}, x.options());
    check_launch(reinterpret_cast<QuantFn>(quant_fn)(
                     x.data_ptr(), x.stride(0), dtype, a.data_ptr(), a.stride(0), a.data_ptr(), a.stride(0),
                     a.data_ptr(), a.stride(0), x.scalar_type() == at::kHalf, gs.data_ptr<float>(), m, k,
                     kQuantValues, ctas_per_sm, quant_pdl, stream),
                 "the quantization kernel", x, n);
    return {a, at::Tensor()};
  }
  if (quant_mode == kQuantCodes) {
    const int64_t kc = (k + kCodeChunk - 1) / kCodeChunk * kCodeChunk;
    at::Tensor a = at::empty({m, kc / 2}, x.options().dtype(at::kByte));
    at::Tensor a_scale = at::empty({m, kc / 16}, x.options().dtype(at::kByte));
    check_launch(reinterpret_cast<QuantFn>(quant_fn)(
                     x.data_ptr(), x.stride(0), dtype, a.data_ptr(), a.stride(0), a_scale.data_ptr(),
                     a_scale.stride(0), a.data_ptr(), a.stride(0), 0, gs.data_ptr<float>(), m, k, kQuantCodes,
                     ctas_per_sm, quant_pdl, stream),
                 "the quantization kernel", x, n);
    return {a, a_scale};
  }
  return {x, at::Tensor()};
}

// The small-M GEMM's pdl: 2 (its first weight loads before its wait) right after our quantization kernel,
// which lets it launch only once every kernel before has completed (cuda_small_m.dependent_launch_mode).
int small_m_pdl(int pdl, int64_t quant_mode) { return pdl && quant_mode != kQuantNone ? 2 : pdl; }

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
  // Captured calls take the Python path: it picks the kernels that are fastest inside a graph.
  if (capturing(x.device())) {
    return linear_python(x, weight, weight_scale, gs, alpha, bias, std::move(out_features), backend);
  }
  const int64_t m = x.size(0), k = x.size(1), np = weight.size(0), kp = weight.size(1) * 2;
  const int fp16 = x.scalar_type() == at::kHalf;
  const int pdl = static_cast<int>(plan->pdl);
  auto [a, a_scale] =
      gemm_activations(x, gs, plan->quant_mode, plan->quant_fn, plan->quant_ctas_per_sm, pdl, stream, n);
  at::Tensor out = at::empty({m, n}, x.options());
  const void* bias_ptr = bias.has_value() ? bias->data_ptr() : nullptr;
  if (plan->gemm_kind == kGemmSmallM) {
    check_launch(reinterpret_cast<SmallMFn>(plan->gemm_fn)(
                     a.data_ptr(), a.stride(0), a_scale.defined() ? a_scale.data_ptr() : nullptr,
                     a_scale.defined() ? a_scale.stride(0) : 0, weight.data_ptr(), weight.stride(0),
                     weight_scale.data_ptr(), weight_scale.stride(0), out.data_ptr(), out.stride(0), bias_ptr,
                     alpha.data_ptr<float>(), m, n, k, kp, fp16, 0, plan->p0, plan->p1, plan->p2,
                     small_m_pdl(pdl, plan->quant_mode), stream),
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

// fp4::linear_group (several linears of one activation, grouped by the compile pass at decode sizes) and
// fp4::linear_silu_mul (gate and up, then SiLU*mul): replayed as the Python path ran the key's first eager
// call (its GroupPlan): one launch of the small-M kernel's group entry, or each member as fp4::linear (then
// silu_mul.cu's kernel). A key without a plan, a captured call (graphs take the grouped launch wherever the
// backend groups) or operands the launch cannot take go to the Python implementation.
using LinearGroupSignature = std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                                     at::TensorList, at::TensorList,
                                                     const c10::List<std::optional<at::Tensor>>&,
                                                     c10::SymIntArrayRef, c10::string_view);
using LinearSiluMulSignature = at::Tensor(const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
                                          at::TensorList, const c10::List<std::optional<at::Tensor>>&, c10::SymInt,
                                          c10::string_view);

// The members' argument lists, as the group ops take them.
struct Members {
  at::TensorList weights, weight_scales, gss, alphas;
  const c10::List<std::optional<at::Tensor>>& biases;
  std::vector<int64_t> ns;
  size_t count() const { return weights.size(); }
};

// The key of a group call, or none where the fast path does not take it (only the shapes: the plan's
// launch checks the operands).
std::optional<GroupKey> group_key(const at::Tensor& x, const Members& g, int64_t gated, c10::string_view backend) {
  const size_t count = g.count();
  const int64_t dtype = dtype_code(x.scalar_type());
  if (dtype < 0 || x.dim() != 2 || !x.is_cuda() || count < 1 || count > kMaxGroup || g.weight_scales.size() != count ||
      g.gss.size() != count || g.alphas.size() != count || g.biases.size() != count || g.ns.size() != count) {
    return std::nullopt;
  }
  bool one_gs = true;
  for (const at::Tensor& gs : g.gss) one_gs = one_gs && gs.is_same(g.gss[0]);
  GroupKey key{std::string(backend), {x.device().index(), dtype, gated, x.size(0), x.size(1), one_gs ? 1 : 0}};
  for (size_t i = 0; i < count; ++i) {
    if (g.weights[i].dim() != 2) return std::nullopt;
    key.fields.insert(key.fields.end(), {g.ns[i], g.weights[i].size(0), g.weights[i].size(1) * 2,
                                         g.biases.get(i).has_value() ? 1 : 0});
  }
  return key;
}

std::optional<GroupPlan> find_group_plan(const std::optional<GroupKey>& key) {
  if (!key) return std::nullopt;
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto it = g_group_plans.find(*key);
  if (it == g_group_plans.end()) return std::nullopt;
  return it->second;
}

// One launch of the group entry (plan kind kGroupLaunch): the activations quantized once with the first
// member's global scale (the plan was recorded only where all members share it), then every member's GEMM;
// gated: the gate's output only. None where an operand is not as the Python launcher would pass it.
std::optional<std::vector<at::Tensor>> launch_group(const at::Tensor& x, const Members& g, bool gated,
                                                    const GroupPlan& plan) {
  const c10::Device device = x.device();
  const size_t count = g.count();
  if (!unit_stride_rows(x, 16) || (plan.quant_mode != kQuantNone && !global_scale_ok(x, g.gss[0]))) {
    return std::nullopt;
  }
  for (size_t i = 0; i < count; ++i) {
    if (!weight_operands_ok(x, g.weights[i], g.weight_scales[i], g.alphas[i], g.biases.get(i), g.ns[i])) {
      return std::nullopt;
    }
  }
  const c10::cuda::OptionalCUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int64_t m = x.size(0), k = x.size(1), kp = g.weights[0].size(1) * 2;
  const int pdl = static_cast<int>(plan.pdl);
  auto [a, a_scale] = gemm_activations(x, g.gss[0], plan.quant_mode, plan.quant_fn, plan.quant_ctas_per_sm, pdl,
                                       stream, g.ns[0]);
  std::vector<at::Tensor> outs;
  int64_t table[13 * kMaxGroup];  // per member: the row of fp4c_nvfp4_small_m_gemm_group's table
  for (size_t i = 0; i < count; ++i) {
    if (!gated || i == 0) outs.push_back(at::empty({m, g.ns[i]}, x.options()));
    const at::Tensor& out = outs.back();
    const std::optional<at::Tensor> bias = g.biases.get(i);
    const int64_t row[13] = {reinterpret_cast<int64_t>(a.data_ptr()), a.stride(0),
                             reinterpret_cast<int64_t>(g.weights[i].data_ptr()), g.weights[i].stride(0),
                             reinterpret_cast<int64_t>(g.weight_scales[i].data_ptr()), g.weight_scales[i].stride(0),
                             reinterpret_cast<int64_t>(out.data_ptr()), out.stride(0),
                             bias.has_value() ? reinterpret_cast<int64_t>(bias->data_ptr()) : 0,
                             reinterpret_cast<int64_t>(g.alphas[i].data_ptr()), g.ns[i],
                             a_scale.defined() ? reinterpret_cast<int64_t>(a_scale.data_ptr()) : 0,
                             a_scale.defined() ? a_scale.stride(0) : 0};
    std::copy(row, row + 13, table + 13 * i);
  }
  check_launch(reinterpret_cast<GroupFn>(plan.group_fn)(static_cast<int>(count), table, static_cast<int>(m),
                                                        static_cast<int>(k), static_cast<int>(kp),
                                                        x.scalar_type() == at::kHalf, 0, gated ? 1 : 0,
                                                        static_cast<int>(plan.warps), pdl, stream),
               "the grouped small-M GEMM", x, g.ns[0]);
  g_replayed.fetch_add(1, std::memory_order_relaxed);
  return outs;
}

std::vector<at::Tensor> linear_group_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList weight_scales,
                                          at::TensorList gss, at::TensorList alphas,
                                          const c10::List<std::optional<at::Tensor>>& biases,
                                          c10::SymIntArrayRef out_features, c10::string_view backend) {
  std::vector<int64_t> ns;
  for (const c10::SymInt& n : out_features) ns.push_back(n.expect_int());
  const Members g{weights, weight_scales, gss, alphas, biases, std::move(ns)};
  const std::optional<GroupPlan> plan =
      x.is_cuda() && !capturing(x.device()) ? find_group_plan(group_key(x, g, 0, backend)) : std::nullopt;
  if (plan && plan->kind == kGroupLaunch) {
    if (auto outs = launch_group(x, g, false, *plan)) return *outs;
  } else if (plan) {
    std::vector<at::Tensor> outs;
    for (size_t i = 0; i < g.count(); ++i) {
      outs.push_back(linear_cuda(x, weights[i], weight_scales[i], gss[i], alphas[i], biases.get(i), g.ns[i], backend));
    }
    return outs;
  }
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fp4::_linear_group_python", "").typed<LinearGroupSignature>();
  return op.call(x, weights, weight_scales, gss, alphas, biases, out_features, backend);
}

// fp4::rms_norm_quantize: the norm and quantization kernel of nvfp4_quant.cu, launched from here for
// contiguous 16-bit rows (Llama's norm or Gemma's) outside graph capture (the Python path's choice there
// too: ops/rms_norm_quant.py; graphs take its Triton kernel); any other call runs
// fp4::_rms_norm_quantize_python.
using RmsNormQuantizeSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                    const at::Tensor&, double, const at::Tensor&, bool);

bool aligned_contiguous(const at::Tensor& t) {
  return t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_quantize_cuda(const at::Tensor& x,
                                                          const std::optional<at::Tensor>& residual,
                                                          const at::Tensor& weight, double eps, const at::Tensor& gs,
                                                          bool unit_offset) {
  const c10::Device device = x.device();
  const Kernels kernels = kernels_of(device);
  const int64_t dtype = dtype_code(x.scalar_type());
  const int64_t k = x.dim() > 0 ? x.size(-1) : 0;
  const bool ours = kernels.norm_fn != 0 && dtype > 0 && k > 0 && k % 16 == 0 && k <= kernels.norm_max_k &&
                    aligned_contiguous(x) && weight.dim() == 1 && weight.size(0) == k &&
                    weight.scalar_type() == x.scalar_type() && on(weight, device) && aligned_contiguous(weight) &&
                    global_scale_ok(x, gs) &&
                    (!residual.has_value() ||
                     (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                      on(*residual, device) && aligned_contiguous(*residual))) &&
                    !capturing(device);
  if (!ours) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("fp4::_rms_norm_quantize_python", "")
                               .typed<RmsNormQuantizeSignature>();
    return op.call(x, residual, weight, eps, gs, unit_offset);
  }
  const c10::cuda::OptionalCUDAGuard guard(device);
  const int64_t m = x.numel() / k;
  at::Tensor values = at::empty(x.sizes(), x.options());
  at::Tensor sum = residual.has_value() ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  const int pdl = kernels.pdl ? (m <= kernels.trigger_max_m ? 2 : 1) : 0;
  const int err = reinterpret_cast<NormFn>(kernels.norm_fn)(
      x.data_ptr(), k, residual.has_value() ? residual->data_ptr() : nullptr, k, weight.data_ptr(),
      residual.has_value() ? sum.data_ptr() : nullptr, k, values.data_ptr(), k, static_cast<int>(dtype),
      gs.data_ptr<float>(), static_cast<float>(eps), static_cast<int>(m), static_cast<int>(k), unit_offset ? 1 : 0,
      pdl, c10::cuda::getCurrentCUDAStream(device.index()).stream());
  check_kernel(err, "fp4::rms_norm_quantize", "the norm kernel", "M=", m, ", K=", k);
  return {values, sum};
}

// fp4::linear_silu_mul: see fp4::linear_group above.
at::Tensor linear_silu_mul_cuda(const at::Tensor& x, at::TensorList weights, at::TensorList weight_scales,
                                at::TensorList gss, at::TensorList alphas,
                                const c10::List<std::optional<at::Tensor>>& biases, c10::SymInt out_features,
                                c10::string_view backend) {
  const int64_t n = out_features.expect_int();
  const Members g{weights, weight_scales, gss, alphas, biases, std::vector<int64_t>(weights.size(), n)};
  const std::optional<GroupPlan> plan = x.is_cuda() && weights.size() == 2 && !capturing(x.device())
                                            ? find_group_plan(group_key(x, g, 1, backend))
                                            : std::nullopt;
  const Kernels kernels = x.is_cuda() ? kernels_of(x.device()) : Kernels{};
  if (plan && plan->kind == kGroupLaunch) {
    if (auto outs = launch_group(x, g, true, *plan)) return (*outs)[0];
  } else if (plan && kernels.silu_mul_fn != 0) {
    const at::Tensor gate = linear_cuda(x, weights[0], weight_scales[0], gss[0], alphas[0], biases.get(0), n, backend);
    const at::Tensor up = linear_cuda(x, weights[1], weight_scales[1], gss[1], alphas[1], biases.get(1), n, backend);
    const c10::cuda::OptionalCUDAGuard guard(x.device());
    at::Tensor out = at::empty({x.size(0), n}, x.options());
    const int err = reinterpret_cast<SiluMulFn>(kernels.silu_mul_fn)(
        gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0), out.data_ptr(), out.stride(0),
        static_cast<int>(dtype_code(x.scalar_type())), static_cast<int>(x.size(0)), static_cast<int>(n),
        kernels.pdl ? 1 : 0, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    check_kernel(err, "fp4::linear_silu_mul", "the silu_mul kernel", "M=", x.size(0), ", N=", n);
    return out;
  }
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fp4::_linear_silu_mul_python", "")
                             .typed<LinearSiluMulSignature>();
  return op.call(x, weights, weight_scales, gss, alphas, biases, std::move(out_features), backend);
}

// Records how the Python path ran a group call (fast_linear.remember_group); the first plan of a key stays.
void set_group_plan(const at::Tensor& x, at::TensorList weights, at::TensorList weight_scales, at::TensorList gss,
                    at::TensorList alphas, const c10::List<std::optional<at::Tensor>>& biases,
                    at::IntArrayRef out_features, int64_t gated, c10::string_view backend, at::IntArrayRef fields) {
  TORCH_CHECK(fields.size() == kGroupPlanFields, "set_group_plan takes ", kGroupPlanFields, " plan fields, got ",
              fields.size());
  GroupPlan plan;
  std::copy(fields.begin(), fields.end(), reinterpret_cast<int64_t*>(&plan));
  const bool quantizes = plan.quant_mode == kQuantValues || plan.quant_mode == kQuantCodes;
  TORCH_CHECK((plan.kind == kGroupMembers ||
               (plan.kind == kGroupLaunch && plan.group_fn != 0 && plan.warps >= 1 && plan.warps <= 8 &&
                (plan.quant_mode == kQuantNone || (quantizes && plan.quant_fn != 0)))) &&
                  (gated == 0 || gated == 1),
              "set_group_plan: an inconsistent plan");
  const Members g{weights, weight_scales, gss, alphas, biases,
                  std::vector<int64_t>(out_features.begin(), out_features.end())};
  const std::optional<GroupKey> key = group_key(x, g, gated, backend);
  TORCH_CHECK(key.has_value(), "set_group_plan: not a call the fast path takes");
  std::lock_guard<std::mutex> lock(g_mutex);
  if (static_cast<int64_t>(g_group_plans.size()) < kMaxPlans) g_group_plans.emplace(*key, plan);
}

// Names the pointwise kernels of a device (fast_linear._name_kernels; 0: not available there).
void set_kernels(int64_t device, int64_t norm_fn, int64_t silu_mul_fn, int64_t pdl, int64_t trigger_max_m,
                 int64_t norm_max_k) {
  std::lock_guard<std::mutex> lock(g_mutex);
  g_kernels[device] = Kernels{norm_fn, silu_mul_fn, pdl, trigger_max_m, norm_max_k};
}

// The Autograd kernel of the fp4 ops for CUDA tensors, in place of the Python one (library.py), which
// costs every eager call a Python hop (about 20 us; a W4A4 prefill took 0.973x of bf16's time under
// inference_mode, which skips it, against 0.885x under no_grad: NOTES.md v24e): below autograd at once
// unless an input needs a gradient. Then, as the Python kernel does, an op with tensor-list arguments
// raises, and the others run fp4::_<name>_python, whose Python Autograd kernel gives the outputs a
// backward that raises.
bool needs_grad(const torch::jit::Stack& stack, size_t count) {
  for (size_t i = stack.size() - count; i < stack.size(); ++i) {
    const c10::IValue& v = stack[i];
    if (v.isTensor() && v.toTensor().requires_grad()) return true;
    if (v.isList()) {
      for (const c10::IValue& e : v.toListRef()) {
        if (e.isTensor() && e.toTensor().requires_grad()) return true;
      }
    }
  }
  return false;
}

void inference_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  if (at::GradMode::is_enabled() && needs_grad(*stack, schema.arguments().size())) {
    bool lists = false;
    for (const c10::Argument& a : schema.arguments()) lists = lists || a.type()->kind() == c10::TypeKind::ListType;
    for (const c10::Argument& a : schema.returns()) lists = lists || a.type()->kind() == c10::TypeKind::ListType;
    TORCH_CHECK(!lists, schema.name(), " has no backward: the NVFP4 layers are for inference (run them under "
                "torch.no_grad() or torch.inference_mode())");
    const std::string python = "fp4::_" + schema.name().substr(schema.name().find("::") + 2) + "_python";
    c10::Dispatcher::singleton().findSchemaOrThrow(python.c_str(), "").callBoxed(stack);
    return;
  }
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
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
  g_group_plans.clear();
}

int64_t replayed_calls() { return g_replayed.load(std::memory_order_relaxed); }

}  // namespace

TORCH_LIBRARY(fp4_fast, m) {
  m.def("set_plan(str backend, int device, int dtype, int bias, int m, int k, int n, int np, int kp, int[] plan) -> ()",
        &set_plan);
  m.def("plan_count() -> int", &plan_count);
  m.def("clear_plans() -> ()", &clear_plans);
  m.def("replayed_calls() -> int", &replayed_calls);
  m.def("set_kernels(int device, int norm_fn, int silu_mul_fn, int pdl, int trigger_max_m, int norm_max_k) -> ()",
        &set_kernels);
  m.def("set_group_plan(Tensor x, Tensor[] weights, Tensor[] weight_scales, Tensor[] input_global_scales, "
        "Tensor[] alphas, Tensor?[] biases, int[] out_features, int gated, str backend, int[] plan) -> ()",
        &set_group_plan);
}

TORCH_LIBRARY_IMPL(fp4, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("linear_group", &linear_group_cuda);
  m.impl("linear_silu_mul", &linear_silu_mul_cuda);
  m.impl("rms_norm_quantize", &rms_norm_quantize_cuda);
}

TORCH_LIBRARY_IMPL(fp4, AutogradCUDA, m) {
  for (const char* name : {"linear", "linear_group", "linear_silu_mul", "rms_norm_quantize"}) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&inference_autograd>());
  }
}

// D[M, N] = alpha * A[M, K] @ B[N, K]^T (+ bias[N]), row-major, through cuBLASLt with alpha read
// from DEVICE memory at execution time (CUBLASLT_POINTER_MODE_DEVICE), so a captured CUDA graph
// sees new alpha values, and the bias added in cuBLASLt's epilogue (CUBLASLT_EPILOGUE_BIAS): fp32
// accumulation and fp32 alpha/bias arithmetic, D rounded once to its type.
//
// Built by nvcc into a plain shared library called through ctypes (fp4_compile/ops/cublaslt.py):
// no torch headers and no cuBLAS headers. libcublasLt is dlopen'ed at run time (normally the copy
// torch has already loaded) and the few functions, types and enum values used are declared below.
// There is no device code here.
//
// The enum values and struct layouts below were checked against cublasLt.h / cublas_api.h of
// cuBLAS 13.10.0.20 (pip wheel nvidia-cublas 13.10.0.20, nvidia/cu13/include) and library_types.h
// of the CUDA 13.0 toolkit. They have not changed since cuBLASLt 11 (also what libcublasLt.so.12
// expects); the cudaDataType values are static_assert'ed against the toolkit's library_types.h.

#include <cuda_runtime.h>  // cudaStream_t (nvcc includes it anyway); library_types.h comes with it
#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

// ---- the cuBLASLt API subset (see the header comment for the version checked) ----------------
typedef int cublasStatus_t;  // CUBLAS_STATUS_SUCCESS = 0
typedef struct cublasLtContext* cublasLtHandle_t;
typedef void* cublasLtMatmulDesc_t;        // opaque pointers (cublasLtMatmulDescOpaque_t*, ...)
typedef void* cublasLtMatrixLayout_t;
typedef void* cublasLtMatmulPreference_t;
typedef struct {
  uint64_t data[8];
} cublasLtMatmulAlgo_t;
typedef struct {
  cublasLtMatmulAlgo_t algo;
  size_t workspaceSize;
  cublasStatus_t state;
  float wavesCount;
  int reserved[4];
} cublasLtMatmulHeuristicResult_t;
static_assert(sizeof(cublasLtMatmulAlgo_t) == 64, "cublasLtMatmulAlgo_t is 8 x uint64");
static_assert(sizeof(cublasLtMatmulHeuristicResult_t) == 96, "cublasLtMatmulHeuristicResult_t layout");

constexpr cublasStatus_t kStatusSuccess = 0;        // CUBLAS_STATUS_SUCCESS
constexpr cublasStatus_t kStatusNotInitialized = 1; // CUBLAS_STATUS_NOT_INITIALIZED
constexpr cublasStatus_t kStatusInvalidValue = 7;   // CUBLAS_STATUS_INVALID_VALUE
constexpr cublasStatus_t kStatusNotSupported = 15;  // CUBLAS_STATUS_NOT_SUPPORTED

// cudaDataType_t (library_types.h)
constexpr int kR32F = 0;    // CUDA_R_32F
constexpr int kR16F = 2;    // CUDA_R_16F
constexpr int kR16BF = 14;  // CUDA_R_16BF
#if defined(__has_include)
#if __has_include(<library_types.h>)
static_assert(kR32F == CUDA_R_32F && kR16F == CUDA_R_16F && kR16BF == CUDA_R_16BF, "cudaDataType_t values");
#endif
#endif
constexpr int kCompute32F = 68;  // cublasComputeType_t CUBLAS_COMPUTE_32F (cublas_api.h)
constexpr int32_t kOpN = 0;      // cublasOperation_t CUBLAS_OP_N
constexpr int32_t kOpT = 1;      // cublasOperation_t CUBLAS_OP_T

// cublasLtMatmulDescAttributes_t
constexpr int kDescPointerMode = 2;   // CUBLASLT_MATMUL_DESC_POINTER_MODE (int32_t)
constexpr int kDescTransA = 3;        // CUBLASLT_MATMUL_DESC_TRANSA (int32_t)
constexpr int kDescTransB = 4;        // CUBLASLT_MATMUL_DESC_TRANSB (int32_t)
constexpr int kDescEpilogue = 7;      // CUBLASLT_MATMUL_DESC_EPILOGUE (uint32_t)
constexpr int kDescBiasPointer = 8;   // CUBLASLT_MATMUL_DESC_BIAS_POINTER (const void*)
constexpr int kDescBiasDataType = 26; // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE (int32_t cudaDataType)
constexpr int32_t kPointerModeDevice = 1;  // CUBLASLT_POINTER_MODE_DEVICE (= CUBLAS_POINTER_MODE_DEVICE)
constexpr uint32_t kEpilogueDefault = 1;   // CUBLASLT_EPILOGUE_DEFAULT
constexpr uint32_t kEpilogueBias = 4;      // CUBLASLT_EPILOGUE_BIAS

// cublasLtMatmulPreferenceAttributes_t
constexpr int kPrefMaxWorkspaceBytes = 1;  // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES (uint64_t)
constexpr int kPrefReductionSchemeMask = 3;  // CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK (uint32_t)
constexpr uint32_t kReductionComputeType = 2;  // CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE (NONE = 0 always passes)
constexpr int kPrefMinAlignA = 5;          // CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES (uint32_t)
constexpr int kPrefMinAlignB = 6;          // ..._B_BYTES
constexpr int kPrefMinAlignC = 7;          // ..._C_BYTES
constexpr int kPrefMinAlignD = 8;          // ..._D_BYTES

typedef cublasStatus_t (*CreateFn)(cublasLtHandle_t*);
typedef size_t (*GetVersionFn)(void);
typedef const char* (*GetStatusStringFn)(cublasStatus_t);
typedef cublasStatus_t (*DescCreateFn)(cublasLtMatmulDesc_t*, int /*cublasComputeType_t*/, int /*cudaDataType_t*/);
typedef cublasStatus_t (*DescDestroyFn)(cublasLtMatmulDesc_t);
typedef cublasStatus_t (*DescSetFn)(cublasLtMatmulDesc_t, int, const void*, size_t);
typedef cublasStatus_t (*LayoutCreateFn)(cublasLtMatrixLayout_t*, int /*cudaDataType*/, uint64_t, uint64_t, int64_t);
typedef cublasStatus_t (*LayoutDestroyFn)(cublasLtMatrixLayout_t);
typedef cublasStatus_t (*PrefCreateFn)(cublasLtMatmulPreference_t*);
typedef cublasStatus_t (*PrefDestroyFn)(cublasLtMatmulPreference_t);
typedef cublasStatus_t (*PrefSetFn)(cublasLtMatmulPreference_t, int, const void*, size_t);
typedef cublasStatus_t (*HeuristicFn)(cublasLtHandle_t, cublasLtMatmulDesc_t, cublasLtMatrixLayout_t,
                                      cublasLtMatrixLayout_t, cublasLtMatrixLayout_t, cublasLtMatrixLayout_t,
                                      cublasLtMatmulPreference_t, int, cublasLtMatmulHeuristicResult_t*, int*);
typedef cublasStatus_t (*MatmulFn)(cublasLtHandle_t, cublasLtMatmulDesc_t, const void* alpha, const void* A,
                                   cublasLtMatrixLayout_t, const void* B, cublasLtMatrixLayout_t, const void* beta,
                                   const void* C, cublasLtMatrixLayout_t, void* D, cublasLtMatrixLayout_t,
                                   const cublasLtMatmulAlgo_t*, void* workspace, size_t workspaceSize,
                                   cudaStream_t stream);

struct Api {
  void* lib = nullptr;
  std::string path;
  CreateFn create = nullptr;
  GetVersionFn get_version = nullptr;
  GetStatusStringFn status_string = nullptr;  // optional
  DescCreateFn desc_create = nullptr;
  DescDestroyFn desc_destroy = nullptr;
  DescSetFn desc_set = nullptr;
  LayoutCreateFn layout_create = nullptr;
  LayoutDestroyFn layout_destroy = nullptr;
  PrefCreateFn pref_create = nullptr;
  PrefDestroyFn pref_destroy = nullptr;
  PrefSetFn pref_set = nullptr;
  HeuristicFn heuristic = nullptr;
  MatmulFn matmul = nullptr;
};

// One cached plan: the descriptors and the heuristic's algorithm for one problem. Descriptors are
// only ever touched under g_mutex (the bias pointer is set per call), so threads can share them.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo;
};

struct Key {
  int device, ab_type, d_type, has_bias;
  int64_t m, n, k, lda, ldb, ldd;
  uint32_t align_a, align_b, align_d, align_bias;
  uint64_t workspace;
  bool operator==(const Key& o) const { return std::memcmp(this, &o, sizeof(Key)) == 0; }
};
struct KeyHash {
  size_t operator()(const Key& key) const {  // FNV-1a over the bytes (Key has no padding holes: zeroed anyway)
    const unsigned char* p = reinterpret_cast<const unsigned char*>(&key);
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(Key); ++i) h = (h ^ p[i]) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

constexpr size_t kMaxPlans = 4096;  // dynamic M makes a key per M; past this the cache is emptied
constexpr int kMaxDevices = 64;

std::mutex g_mutex;
Api g_api;
bool g_loaded = false;
std::string g_load_error;
cublasLtHandle_t g_handles[kMaxDevices] = {};
std::unordered_map<Key, Plan, KeyHash> g_plans;
thread_local std::string t_last_error;

const char* status_text(cublasStatus_t s) {
  if (g_api.status_string != nullptr) {
    const char* text = g_api.status_string(s);
    if (text != nullptr) return text;
  }
  return "";
}

cublasStatus_t fail(cublasStatus_t status, const std::string& what) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), " (cublasStatus %d", status);
  t_last_error = what + buf;
  const char* text = status_text(status);
  if (*text) t_last_error += std::string(": ") + text;
  t_last_error += ")";
  return status;
}

void* try_open(const char* name, int flags) { return dlopen(name, flags | RTLD_NOW | RTLD_LOCAL); }

template <typename Fn>
bool resolve(void* lib, const char* name, Fn* out, std::string* missing) {
  *out = reinterpret_cast<Fn>(dlsym(lib, name));
  if (*out == nullptr) {
    if (!missing->empty()) *missing += ", ";
    *missing += name;
    return false;
  }
  return true;
}

// Load libcublasLt: one already in the process (RTLD_NOLOAD; torch's), else `explicit_path`, else
// the usual sonames through the loader's search path. Called under g_mutex.
bool load_locked(const char* explicit_path) {
  if (g_loaded) return true;
  static const char* kNames[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
  void* lib = nullptr;
  std::string path;
  for (const char* name : kNames) {
    if ((lib = try_open(name, RTLD_NOLOAD)) != nullptr) {
      path = name;
      break;
    }
  }
  std::string errors;
  if (lib == nullptr && explicit_path != nullptr && *explicit_path) {
    if ((lib = try_open(explicit_path, 0)) != nullptr) {
      path = explicit_path;
    } else {
      const char* e = dlerror();
      errors += std::string(explicit_path) + ": " + (e ? e : "dlopen failed") + "; ";
    }
  }
  if (lib == nullptr) {
    for (const char* name : kNames) {
      if ((lib = try_open(name, 0)) != nullptr) {
        path = name;
        break;
      }
      const char* e = dlerror();
      errors += std::string(name) + ": " + (e ? e : "dlopen failed") + "; ";
    }
  }
  if (lib == nullptr) {
    g_load_error = "libcublasLt not found (" + errors + ")";
    return false;
  }
  Api api;
  api.lib = lib;
  api.path = path;
  std::string missing;
  bool ok = true;
  ok &= resolve(lib, "cublasLtCreate", &api.create, &missing);
  ok &= resolve(lib, "cublasLtGetVersion", &api.get_version, &missing);
  ok &= resolve(lib, "cublasLtMatmulDescCreate", &api.desc_create, &missing);
  ok &= resolve(lib, "cublasLtMatmulDescDestroy", &api.desc_destroy, &missing);
  ok &= resolve(lib, "cublasLtMatmulDescSetAttribute", &api.desc_set, &missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutCreate", &api.layout_create, &missing);
  ok &= resolve(lib, "cublasLtMatrixLayoutDestroy", &api.layout_destroy, &missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceCreate", &api.pref_create, &missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceDestroy", &api.pref_destroy, &missing);
  ok &= resolve(lib, "cublasLtMatmulPreferenceSetAttribute", &api.pref_set, &missing);
  ok &= resolve(lib, "cublasLtMatmulAlgoGetHeuristic", &api.heuristic, &missing);
  ok &= resolve(lib, "cublasLtMatmul", &api.matmul, &missing);
  api.status_string = reinterpret_cast<GetStatusStringFn>(dlsym(lib, "cublasLtGetStatusString"));
  if (!ok) {
    g_load_error = path + " lacks " + missing;
    dlclose(lib);
    return false;
  }
  if (api.get_version() < 110000) {
    g_load_error = path + " is cuBLASLt " + std::to_string(api.get_version()) + ", need >= 11.0";
    dlclose(lib);
    return false;
  }
  g_api = api;
  g_loaded = true;
  g_load_error.clear();
  return true;
}

uint32_t alignment(const void* p) {  // largest power of two <= 256 dividing the address
  uintptr_t a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && (a % align) != 0) align >>= 1;
  return align;
}

void destroy_plan(Plan& plan) {
  if (plan.a) g_api.layout_destroy(plan.a);
  if (plan.b) g_api.layout_destroy(plan.b);
  if (plan.d) g_api.layout_destroy(plan.d);
  if (plan.desc) g_api.desc_destroy(plan.desc);
  plan = Plan();
}

// Build the descriptors and ask the heuristic once. Called under g_mutex.
//
// Row-major to cuBLAS's column-major: a row-major X[r, c] with leading dimension ld is, byte for
// byte, the column-major X^T[c, r] with the same ld. So
//   our D[M, N] (ldd)  is column-major D^T [N, M], ld = ldd,
//   our A[M, K] (lda)  is column-major A^T [K, M], ld = lda,
//   our B[N, K] (ldb)  is column-major B^T [K, N], ld = ldb,
// and D = A @ B^T  <=>  D^T = B @ A^T = (B^T)^T @ (A^T). In cuBLASLt's terms:
//   cuBLAS "A" = our B's memory, layout K x N (ld = ldb), transa = T  -> op(A) = B      [N, K]
//   cuBLAS "B" = our A's memory, layout K x M (ld = lda), transb = N  -> op(B) = A^T    [K, M]
//   cuBLAS "C"/"D" = our D's memory, layout N x M (ld = ldd)            -> D^T         [N, M]
// (the "TN" case, cuBLASLt's best-supported layout). The bias vector runs along cuBLAS's rows of
// D, i.e. our N: bias[n] is added to every D[m, n], as wanted.
cublasStatus_t make_plan(const Key& key, cublasLtHandle_t handle, const void* bias, Plan* out) {
  Plan plan;
  cublasStatus_t s;
  if ((s = g_api.desc_create(&plan.desc, kCompute32F, kR32F)) != kStatusSuccess)
    return fail(s, "cublasLtMatmulDescCreate");
  const int32_t pointer_mode = kPointerModeDevice, transa = kOpT, transb = kOpN;
  const uint32_t epilogue = key.has_bias ? kEpilogueBias : kEpilogueDefault;
  const int32_t bias_type = key.d_type;  // the documented default: bias elements of D's type
  if ((s = g_api.desc_set(plan.desc, kDescPointerMode, &pointer_mode, sizeof(pointer_mode))) != kStatusSuccess ||
      (s = g_api.desc_set(plan.desc, kDescTransA, &transa, sizeof(transa))) != kStatusSuccess ||
      (s = g_api.desc_set(plan.desc, kDescTransB, &transb, sizeof(transb))) != kStatusSuccess ||
      (s = g_api.desc_set(plan.desc, kDescEpilogue, &epilogue, sizeof(epilogue))) != kStatusSuccess) {
    destroy_plan(plan);
    return fail(s, "cublasLtMatmulDescSetAttribute");
  }
  if (key.has_bias) {
    if ((s = g_api.desc_set(plan.desc, kDescBiasDataType, &bias_type, sizeof(bias_type))) != kStatusSuccess ||
        (s = g_api.desc_set(plan.desc, kDescBiasPointer, &bias, sizeof(bias))) != kStatusSuccess) {
      destroy_plan(plan);
      return fail(s, "cublasLtMatmulDescSetAttribute(bias)");
    }
  }
  if ((s = g_api.layout_create(&plan.a, key.ab_type, key.k, key.n, key.ldb)) != kStatusSuccess ||
      (s = g_api.layout_create(&plan.b, key.ab_type, key.k, key.m, key.lda)) != kStatusSuccess ||
      (s = g_api.layout_create(&plan.d, key.d_type, key.n, key.m, key.ldd)) != kStatusSuccess) {
    destroy_plan(plan);
    return fail(s, "cublasLtMatrixLayoutCreate");
  }
  cublasLtMatmulPreference_t pref = nullptr;
  if ((s = g_api.pref_create(&pref)) != kStatusSuccess) {
    destroy_plan(plan);
    return fail(s, "cublasLtMatmulPreferenceCreate");
  }
  const uint64_t workspace = key.workspace;
  // The preference's default alignment assumption is 256 bytes: tell it the real ones ("A" is our
  // B, "B" is our A, C = D).
  s = g_api.pref_set(pref, kPrefMaxWorkspaceBytes, &workspace, sizeof(workspace));
  // Split-K partial sums only in fp32 (COMPUTE_TYPE), never in D's type (INPLACE / OUTPUT_TYPE
  // would round bf16/fp16 partial sums: D must be rounded once; INPLACE is also not deterministic).
  const uint32_t reduction_mask = kReductionComputeType;
  if (s == kStatusSuccess) s = g_api.pref_set(pref, kPrefReductionSchemeMask, &reduction_mask, sizeof(uint32_t));
  if (s == kStatusSuccess) s = g_api.pref_set(pref, kPrefMinAlignA, &key.align_b, sizeof(uint32_t));
  if (s == kStatusSuccess) s = g_api.pref_set(pref, kPrefMinAlignB, &key.align_a, sizeof(uint32_t));
  if (s == kStatusSuccess) s = g_api.pref_set(pref, kPrefMinAlignC, &key.align_d, sizeof(uint32_t));
  if (s == kStatusSuccess) s = g_api.pref_set(pref, kPrefMinAlignD, &key.align_d, sizeof(uint32_t));
  if (s != kStatusSuccess) {
    g_api.pref_destroy(pref);
    destroy_plan(plan);
    return fail(s, "cublasLtMatmulPreferenceSetAttribute");
  }
  cublasLtMatmulHeuristicResult_t result;
  std::memset(&result, 0, sizeof(result));
  int found = 0;
  s = g_api.heuristic(handle, plan.desc, plan.a, plan.b, plan.d, plan.d, pref, 1, &result, &found);
  g_api.pref_destroy(pref);
  if (s != kStatusSuccess || found == 0) {
    destroy_plan(plan);
    char buf[256];
    std::snprintf(buf, sizeof(buf),
                  "cublasLtMatmulAlgoGetHeuristic found no algorithm for M=%lld N=%lld K=%lld lda=%lld ldb=%lld "
                  "ldd=%lld ab_type=%d d_type=%d bias=%d",
                  (long long)key.m, (long long)key.n, (long long)key.k, (long long)key.lda, (long long)key.ldb,
                  (long long)key.ldd, key.ab_type, key.d_type, key.has_bias);
    return fail(s != kStatusSuccess ? s : kStatusNotSupported, buf);
  }
  plan.algo = result.algo;
  *out = plan;
  return kStatusSuccess;
}

}  // namespace

extern "C" {

// Load libcublasLt (see load_locked; `path` may be NULL). Returns NULL on success, else a message
// (valid until the next call).
const char* fp4c_cublaslt_init(const char* path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (load_locked(path)) return nullptr;
  return g_load_error.c_str();
}

// cublasLtGetVersion() of the loaded library (e.g. 130100), 0 if not loaded.
size_t fp4c_cublaslt_version(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_loaded ? g_api.get_version() : 0;
}

// Which library was loaded (a soname or the explicit path), "" if none.
const char* fp4c_cublaslt_library(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_loaded ? g_api.path.c_str() : "";
}

// The message of this thread's last failed fp4c_cublaslt_gemm.
const char* fp4c_cublaslt_last_error(void) { return t_last_error.c_str(); }

// How many plans are cached (tests).
size_t fp4c_cublaslt_plan_count(void) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_plans.size();
}

// Row-major D[M, N] = alpha * A[M, K] @ B[N, K]^T (+ bias[N]) on `stream`, device `device` (the
// caller makes it current).
//   ab_type: cudaDataType of A and B, CUDA_R_16BF (14) or CUDA_R_16F (2);
//   d_type:  ab_type or CUDA_R_32F (0); bias (may be NULL) has d_type elements, N of them, contiguous;
//   lda/ldb/ldd: row strides in elements (>= K, K, N);
//   alpha: DEVICE pointer to one float; beta: DEVICE pointer to one float holding 0 (read by
//   cuBLASLt in device pointer mode; C = D is passed, so a non-zero beta would accumulate into D);
//   workspace: device memory of workspace_size bytes, not used by anything else on another stream
//   concurrently.
// The first call for a shape builds descriptors and queries the heuristic (host work only); later
// calls only set the bias pointer and enqueue the matmul, so they may be captured in a CUDA graph.
// Returns a cublasStatus_t (0 = ok); fp4c_cublaslt_last_error() says what failed.
int fp4c_cublaslt_gemm(int device, const void* a, int64_t lda, const void* b, int64_t ldb, void* d, int64_t ldd,
                       const void* bias, const float* alpha, const float* beta, int64_t m, int64_t n, int64_t k,
                       int ab_type, int d_type, void* workspace, uint64_t workspace_size, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_loaded) return fail(kStatusNotInitialized, "fp4c_cublaslt_init was not called (or failed)");
  if (device < 0 || device >= kMaxDevices) return fail(kStatusInvalidValue, "bad device index");
  if ((ab_type != kR16BF && ab_type != kR16F) || (d_type != ab_type && d_type != kR32F))
    return fail(kStatusInvalidValue, "unsupported types (A/B bf16 or fp16; D the same or fp32)");
  if (m <= 0 || n <= 0 || k <= 0 || lda < k || ldb < k || ldd < n || alpha == nullptr || beta == nullptr ||
      a == nullptr || b == nullptr || d == nullptr)
    return fail(kStatusInvalidValue, "bad arguments (sizes, leading dimensions or null pointers)");
  cublasStatus_t s;
  if (g_handles[device] == nullptr) {
    if ((s = g_api.create(&g_handles[device])) != kStatusSuccess) {
      g_handles[device] = nullptr;
      return fail(s, "cublasLtCreate");
    }
  }
  cublasLtHandle_t handle = g_handles[device];
  Key key;
  std::memset(&key, 0, sizeof(key));
  key.device = device;
  key.ab_type = ab_type;
  key.d_type = d_type;
  key.has_bias = bias != nullptr;
  key.m = m;
  key.n = n;
  key.k = k;
  key.lda = lda;
  key.ldb = ldb;
  key.ldd = ldd;
  key.align_a = alignment(a);
  key.align_b = alignment(b);
  key.align_d = alignment(d);
  key.align_bias = bias ? alignment(bias) : 0;
  key.workspace = workspace_size;
  auto it = g_plans.find(key);
  if (it == g_plans.end()) {
    Plan plan;
    if ((s = make_plan(key, handle, bias, &plan)) != kStatusSuccess) return s;
    if (g_plans.size() >= kMaxPlans) {
      for (auto& entry : g_plans) destroy_plan(entry.second);
      g_plans.clear();
    }
    it = g_plans.emplace(key, plan).first;
  }
  Plan& plan = it->second;
  if (bias != nullptr && (s = g_api.desc_set(plan.desc, kDescBiasPointer, &bias, sizeof(bias))) != kStatusSuccess)
    return fail(s, "cublasLtMatmulDescSetAttribute(bias pointer)");
  // cuBLAS "A" = our B, "B" = our A, C = D (beta = 0): see make_plan.
  s = g_api.matmul(handle, plan.desc, alpha, b, plan.a, a, plan.b, beta, d, plan.d, d, plan.d, &plan.algo, workspace,
                   workspace_size, stream);
  if (s != kStatusSuccess) return fail(s, "cublasLtMatmul");
  return kStatusSuccess;
}

}  // extern "C"

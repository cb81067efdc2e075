// vae_sample_trt: decode latents with a serialized TensorRT 10 engine (python -m export.tensorrt).
//
//   vae_sample_trt decoder.engine --latents z.npy --batch-size 64 --out x.npy [--grid x.pgm]
//   vae_sample_trt decoder.engine --n 1 --batch-size 1 --repeat 1000   # latency JSON
//
// The engine has one float32 input (z, batch dimension dynamic through optimization profile 0),
// optionally an int32/int64 input (y, labels of a conditional model) and a float32 output.
// TensorRT 10 API: IRuntime::deserializeCudaEngine, named I/O tensors, setInputShape,
// setTensorAddress and enqueueV3 on one CUDA stream; every boolean TensorRT returns is checked.
// Random latents come from std::mt19937_64 (NOT torch's stream): pass --latents for parity.
//
// NOTE: written against the TensorRT 10 API by careful reading and never compiled against a real
// TensorRT where it was written (TensorRT cannot be installed there); CMake builds it only where
// it finds NvInfer.h and libnvinfer.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <random>

#include "cli.h"
#include "image_grid.h"
#include "npy.h"

namespace {

using Clock = std::chrono::steady_clock;
using vae::cli::Options;
using vae::cli::UsageError;

struct RunError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw RunError(std::string("CUDA ") + what + " failed: " + cudaGetErrorString(status));
}

class Logger : public nvinfer1::ILogger {
 public:
  void log(Severity severity, char const* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "vae_sample_trt: TensorRT: " << msg << "\n";
  }
};

Logger& logger() {
  static Logger instance;  // outlives every runtime that holds a reference to it
  return instance;
}

struct DeviceBuffer {
  void* ptr = nullptr;
  explicit DeviceBuffer(int64_t bytes) {
    cuda_check(cudaMalloc(&ptr, static_cast<size_t>(std::max<int64_t>(bytes, 1))), "cudaMalloc");
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

struct Tensor {
  std::string name;
  nvinfer1::DataType type;
  std::vector<int64_t> dims;  // engine shape, -1 where dynamic
};

int64_t elem_size(nvinfer1::DataType t) {
  switch (t) {
    case nvinfer1::DataType::kFLOAT: return 4;
    case nvinfer1::DataType::kINT32: return 4;
    case nvinfer1::DataType::kINT64: return 8;
    default:
      throw RunError("unsupported engine I/O dtype " + std::to_string(static_cast<int>(t)) +
                     " (expected float32 latents/outputs and int32/int64 labels)");
  }
}

int64_t prod(const std::vector<int64_t>& v, size_t from = 0) {
  int64_t n = 1;
  for (size_t i = from; i < v.size(); ++i) n *= v[i];
  return n;
}

std::vector<int64_t> dims_of(const nvinfer1::Dims& d) {
  return std::vector<int64_t>(d.d, d.d + std::max<int32_t>(d.nbDims, 0));
}

// Deserialized engine, its context and its named I/O tensors. Members are destroyed in reverse
// order: context, then engine, then runtime.
struct Engine {
  std::unique_ptr<nvinfer1::IRuntime> runtime;
  std::unique_ptr<nvinfer1::ICudaEngine> engine;
  std::unique_ptr<nvinfer1::IExecutionContext> context;
  Tensor z, out;
  std::optional<Tensor> y;
  int64_t min_batch = 1, max_batch = 1;

  int64_t latent_numel() const { return prod(z.dims, 1); }
};

void find_tensors(Engine& e) {
  for (int32_t i = 0; i < e.engine->getNbIOTensors(); ++i) {
    const char* name = e.engine->getIOTensorName(i);
    Tensor t{name, e.engine->getTensorDataType(name), dims_of(e.engine->getTensorShape(name))};
    const bool input = e.engine->getTensorIOMode(name) == nvinfer1::TensorIOMode::kINPUT;
    if (!input && e.out.name.empty()) e.out = t;
    else if (input && t.type == nvinfer1::DataType::kFLOAT && e.z.name.empty()) e.z = t;
    else if (input && !e.y) e.y = t;
    else if (input) throw RunError("unexpected extra input '" + t.name + "' in the engine");
  }
  if (e.z.name.empty() || e.out.name.empty() || e.z.dims.empty())
    throw RunError("the engine needs a float32 input z of shape (B, ...) and an output");
  if (e.out.type != nvinfer1::DataType::kFLOAT)
    throw RunError("output '" + e.out.name + "' is not float32; rebuild the engine with fp32 I/O");
  if (e.y) elem_size(e.y->type);  // rejects non-integer label inputs
  const char* z = e.z.name.c_str();
  e.min_batch = e.engine->getProfileShape(z, 0, nvinfer1::OptProfileSelector::kMIN).d[0];
  e.max_batch = e.engine->getProfileShape(z, 0, nvinfer1::OptProfileSelector::kMAX).d[0];
  if (e.z.dims[0] > 0) e.min_batch = e.max_batch = e.z.dims[0];  // static batch, no profile
}

std::unique_ptr<Engine> load_engine(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw RunError("engine '" + path + "' not found");
  const std::vector<char> blob((std::istreambuf_iterator<char>(f)),
                               std::istreambuf_iterator<char>());
  auto e = std::make_unique<Engine>();
  e->runtime.reset(nvinfer1::createInferRuntime(logger()));
  if (!e->runtime) throw RunError("createInferRuntime failed");
  e->engine.reset(e->runtime->deserializeCudaEngine(blob.data(), blob.size()));
  if (!e->engine)
    throw RunError("cannot deserialize TensorRT engine '" + path + "' (corrupt, or built by " +
                   "another TensorRT version or for another GPU)");
  e->context.reset(e->engine->createExecutionContext());
  if (!e->context) throw RunError("createExecutionContext failed");
  find_tensors(*e);
  return e;
}

// Device buffers for up to `capacity` items and one stream.
class Session {
 public:
  Session(Engine& e, int64_t capacity) : e_(e), capacity_(capacity) {
    cuda_check(cudaStreamCreate(&stream_), "cudaStreamCreate");
    set_shapes(capacity);  // resolves the output shape at the largest batch
    const std::vector<int64_t> od = dims_of(e_.context->getTensorShape(e_.out.name.c_str()));
    if (od.empty() || *std::min_element(od.begin(), od.end()) < 0)
      throw RunError("output '" + e_.out.name + "' has unresolved shape " +
                     vae::npy::shape_str(od));
    item_shape.assign(od.begin() + 1, od.end());
    z_ = std::make_unique<DeviceBuffer>(capacity * e_.latent_numel() * 4);
    y_ = std::make_unique<DeviceBuffer>(e_.y ? capacity * elem_size(e_.y->type) : 0);
    out_ = std::make_unique<DeviceBuffer>(capacity * prod(item_shape) * 4);
  }
  ~Session() { cudaStreamDestroy(stream_); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  void upload(const float* z, const char* y, int64_t b) {
    copy(z_->ptr, z, b * e_.latent_numel() * 4, cudaMemcpyHostToDevice, "z");
    if (e_.y) copy(y_->ptr, y, b * elem_size(e_.y->type), cudaMemcpyHostToDevice, "y");
  }
  // Binds a batch of b <= capacity items and enqueues the engine on the session's stream.
  void enqueue(int64_t b) {
    set_shapes(b);
    bind(e_.z.name, z_->ptr);
    if (e_.y) bind(e_.y->name, y_->ptr);
    bind(e_.out.name, out_->ptr);
    if (!e_.context->enqueueV3(stream_))
      throw RunError("enqueueV3 failed at batch " + std::to_string(b));
  }
  void download(float* out, int64_t b) {
    copy(out, out_->ptr, b * prod(item_shape) * 4, cudaMemcpyDeviceToHost, "out");
  }
  void sync() { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }

  std::vector<int64_t> item_shape;

 private:
  void copy(void* dst, const void* src, int64_t bytes, cudaMemcpyKind kind, const char* what) {
    const cudaError_t st = cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), kind, stream_);
    cuda_check(st, (std::string("cudaMemcpyAsync(") + what + ")").c_str());
  }
  void set_shapes(int64_t b) {
    if (b < 1 || b > capacity_) throw RunError("batch " + std::to_string(b) + " out of range");
    for (const Tensor* t : {&e_.z, e_.y ? &*e_.y : nullptr}) {
      if (!t) continue;
      nvinfer1::Dims d = e_.engine->getTensorShape(t->name.c_str());
      d.d[0] = b;
      if (!e_.context->setInputShape(t->name.c_str(), d))
        throw RunError("setInputShape('" + t->name + "') rejected batch " + std::to_string(b));
    }
  }
  void bind(const std::string& name, void* ptr) {
    if (!e_.context->setTensorAddress(name.c_str(), ptr))
      throw RunError("setTensorAddress('" + name + "') failed");
  }

  Engine& e_;
  int64_t capacity_;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<DeviceBuffer> z_, y_, out_;
};

std::vector<float> make_latents(const Options& o, const Engine& e, int64_t* n) {
  const std::vector<int64_t> want(e.z.dims.begin() + 1, e.z.dims.end());
  if (o.latents.empty()) {
    *n = o.n;
    std::vector<float> z(static_cast<size_t>(o.n * prod(want)));
    std::mt19937_64 rng(o.seed);
    std::normal_distribution<float> normal;
    for (float& v : z) v = normal(rng);
    return z;
  }
  const auto a = vae::npy::read(o.latents, "<f4");
  const auto& s = a.header.shape;
  if (s.empty() || s[0] < 1 || std::vector<int64_t>(s.begin() + 1, s.end()) != want)
    throw RunError("wrong latent shape in " + o.latents + ": the engine's input '" + e.z.name +
                   "' is " + vae::npy::shape_str(e.z.dims) + ", got " + vae::npy::shape_str(s));
  if (o.n >= 0 && o.n != s[0])
    throw UsageError("--n " + std::to_string(o.n) + " disagrees with the latents in " + o.latents);
  *n = s[0];
  const float* p = reinterpret_cast<const float*>(a.bytes.data());
  return std::vector<float>(p, p + a.numel());
}

// Labels in the engine's integer type, as raw bytes (N * elem_size).
std::vector<char> make_labels(const Options& o, const Engine& e, int64_t n) {
  if (!e.y) {
    if (!o.labels.empty()) throw UsageError("--labels given but the engine has no label input");
    return {};
  }
  if (o.labels.empty())
    throw UsageError("the engine takes labels '" + e.y->name + "': pass --labels FILE.npy");
  const auto a = vae::npy::read(o.labels, "<i8");
  if (a.header.shape != std::vector<int64_t>{n})
    throw RunError("wrong label shape in " + o.labels + ": expected (" + std::to_string(n) + ",)");
  if (e.y->type == nvinfer1::DataType::kINT64) return a.bytes;
  std::vector<char> out(static_cast<size_t>(n) * 4);
  const auto* src = reinterpret_cast<const int64_t*>(a.bytes.data());
  auto* dst = reinterpret_cast<int32_t*>(out.data());
  std::transform(src, src + n, dst, [](int64_t v) { return static_cast<int32_t>(v); });
  return out;
}

// Decodes all n latents in batches; returns float32 (n, *item_shape) on the host.
std::vector<float> decode_all(Session& s, const Engine& e, const std::vector<float>& z,
                              const std::vector<char>& y, int64_t n, int64_t batch) {
  const int64_t ysz = e.y ? elem_size(e.y->type) : 0, item = prod(s.item_shape);
  std::vector<float> out(static_cast<size_t>(n * item));
  for (int64_t i = 0; i < n; i += batch) {
    const int64_t b = std::min(batch, n - i);
    s.upload(z.data() + i * e.latent_numel(), e.y ? y.data() + i * ysz : nullptr, b);
    s.enqueue(b);
    s.download(out.data() + i * item, b);
    s.sync();  // the next upload reuses the input buffers
  }
  return out;
}

// Times `repeat` enqueue + synchronize calls on the first batch (uploaded once, untimed).
void bench(Session& s, const Options& o, const std::vector<float>& z, const std::vector<char>& y,
           int64_t b, double load_s) {
  s.upload(z.data(), y.data(), b);
  const int64_t warmup = o.warmup >= 0 ? o.warmup : std::max<int64_t>(5, o.repeat / 10);
  std::vector<double> ms;
  for (int64_t i = 0; i < warmup + o.repeat; ++i) {
    const auto t0 = Clock::now();
    s.enqueue(b);
    s.sync();
    if (i >= warmup)
      ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::cout << vae::cli::timing_json("tensorrt", "cuda", b, ms, load_s) << std::endl;
}

void write_outputs(const Options& o, const std::vector<float>& out, std::vector<int64_t> shape) {
  vae::npy::write(o.out, "<f4", shape, out.data(), out.size() * sizeof(float));
  if (o.grid.empty()) return;
  if (shape.size() != 4)
    throw RunError("--grid needs outputs of shape (N, C, H, W), got " + vae::npy::shape_str(shape));
  vae::grid::write(o.grid, out.data(), shape[0], shape[1], shape[2], shape[3]);
}

int run(int argc, const char* const* argv) {
  const Options o = vae::cli::parse(argc, argv);
  if (o.help) {
    std::cout << vae::cli::usage("vae_sample_trt", "a serialized TensorRT 10 engine");
    return 0;
  }
  if (!o.out.empty()) vae::cli::check_output_dir(o.out, "--out");
  if (!o.grid.empty()) vae::cli::check_output_dir(o.grid, "--grid");
  if (!o.grid.empty()) vae::grid::check_path(o.grid, -1);
  if (!o.device.empty() && o.device.rfind("cuda", 0) != 0)
    throw UsageError("TensorRT engines run on CUDA only, got --device " + o.device);
  const auto t0 = Clock::now();
  const std::unique_ptr<Engine> e = load_engine(o.package);
  const double load_s = std::chrono::duration<double>(Clock::now() - t0).count();
  int64_t n = 0;
  const std::vector<float> z = make_latents(o, *e, &n);
  const std::vector<char> y = make_labels(o, *e, n);
  const int64_t batch = std::min(o.batch_size, n);
  if (batch > e->max_batch || batch < e->min_batch || (n % batch && n % batch < e->min_batch))
    throw UsageError("batches of " + std::to_string(batch) + " (last " +
                     std::to_string(n % batch ? n % batch : batch) + ") fall outside the " +
                     "engine's profile [" + std::to_string(e->min_batch) + ", " +
                     std::to_string(e->max_batch) + "]; change --batch-size or --n");
  Session session(*e, batch);
  if (o.repeat > 0) bench(session, o, z, y, batch, load_s);
  if (o.out.empty()) return 0;
  const std::vector<float> out = decode_all(session, *e, z, y, n, batch);
  std::vector<int64_t> shape{n};
  shape.insert(shape.end(), session.item_shape.begin(), session.item_shape.end());
  write_outputs(o, out, shape);
  std::cerr << "vae_sample_trt: wrote " << vae::npy::shape_str(shape) << " to " << o.out << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "vae_sample_trt: error: " << vae::cli::first_line(e.what()) << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "vae_sample_trt: error: " << vae::cli::first_line(e.what()) << "\n";
    return 1;
  }
}

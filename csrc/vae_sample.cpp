// vae_sample: decode latents with an AOTInductor decoder package (.pt2) through libtorch.
//
//   vae_sample model.pt2 --n 64 --batch-size 16 --seed 0 --out samples.npy --grid samples.pgm
//   vae_sample model.pt2 --latents z.npy --out x.npy          # z: float32 (N, *latent_shape)
//   vae_sample model.pt2 --n 1 --batch-size 1 --repeat 1000   # per-call latency as JSON
//
// The package is what `python -m export.aoti` writes (torch.export + aoti_compile_and_package
// of the decoder view, dynamic batch). Metadata embedded through inductor_configs
// "aot_inductor.metadata" tells the runner what to feed it: latent_shape "20", output_shape
// "1,28,28", conditional "0"/"1", num_classes, and optionally part "decoder", latent_dtype
// "float32"/"int64" (VQ codes, drawn uniformly from num_codes), max_batch (0: unbounded);
// AOTI_DEVICE_KEY ("cpu"/"cuda") is added by Inductor. Random gaussian latents are torch::randn on a CPU generator seeded with --seed, drawn for
// all N at once, so they equal torch.randn((N, *latent), generator=torch.Generator().manual_seed(S))
// in Python, whatever the device and the batch size.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>

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

// What the package's metadata says; shapes exclude the batch dimension.
struct PackageInfo {
  std::string device = "cpu";
  std::optional<std::vector<int64_t>> latent_shape, output_shape;
  bool codes = false;  // latent_dtype "int64": VQ code indices in [0, num_codes)
  bool conditional = false;
  int64_t num_classes = 0, num_codes = 0, max_batch = 0;
};

std::vector<int64_t> as_vector(at::IntArrayRef dims) { return {dims.begin(), dims.end()}; }

// "(N, 1, 28, 28)": a shape with a symbolic or concrete batch dimension, for messages.
std::string shape_of(int64_t batch, const std::vector<int64_t>& rest) {
  std::string s = "(" + (batch < 0 ? std::string("N") : std::to_string(batch));
  for (int64_t d : rest) s += ", " + std::to_string(d);
  return s + (rest.empty() ? ",)" : ")");
}

// "1,28,28", "(1, 28, 28)" or "[1, 28, 28]" -> {1, 28, 28}.
std::vector<int64_t> parse_dims(const std::string& key, const std::string& text) {
  std::string cleaned;
  for (char c : text) cleaned += (c == ',' || c == '(' || c == ')' || c == '[' || c == ']') ? ' ' : c;
  std::istringstream is(cleaned);
  std::vector<int64_t> dims;
  std::string tok;
  while (is >> tok) {
    size_t used = 0;
    try {
      dims.push_back(std::stoll(tok, &used));
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != tok.size() || dims.back() < 1)
      throw RunError("package metadata " + key + "='" + text + "' is not a list of positive ints");
  }
  return dims;
}

void check_package_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(path, ec)) throw RunError("package '" + path + "' not found");
  if (fs::is_directory(path, ec)) return;  // an unpacked package directory
  char magic[4] = {};
  std::ifstream(path, std::ios::binary).read(magic, 4);
  if (std::string(magic, 4) != std::string("PK\x03\x04", 4))
    throw RunError("package '" + path + "' is not an AOTInductor .pt2 (not a zip archive); "
                   "export one with `python -m export.aoti CKPT`");
}

int64_t parse_count(const std::unordered_map<std::string, std::string>& meta, const char* key) {
  const auto it = meta.find(key);
  if (it == meta.end() || it->second.empty() || it->second == "0") return 0;
  const std::vector<int64_t> v = parse_dims(key, it->second);
  if (v.size() != 1) throw RunError(std::string("package metadata ") + key + " is not one int");
  return v[0];
}

PackageInfo read_package_info(const std::string& path) {
  std::unordered_map<std::string, std::string> meta;
  try {
    meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const c10::Error& e) {
    throw RunError("cannot read AOTInductor package '" + path + "': " +
                   vae::cli::first_line(e.what_without_backtrace()));
  }
  PackageInfo info;
  auto get = [&](const char* k) { auto it = meta.find(k); return it == meta.end() ? "" : it->second; };
  if (!get("AOTI_DEVICE_KEY").empty()) info.device = get("AOTI_DEVICE_KEY");
  if (!get("latent_shape").empty()) info.latent_shape = parse_dims("latent_shape", get("latent_shape"));
  if (!get("output_shape").empty()) info.output_shape = parse_dims("output_shape", get("output_shape"));
  const std::string cond = get("conditional"), part = get("part"), dtype = get("latent_dtype");
  info.conditional = cond == "1" || cond == "true" || cond == "True";
  info.codes = dtype == "int64";
  if (!part.empty() && part != "decoder")
    throw RunError("package '" + path + "' holds the " + part + " part; vae_sample runs decoders");
  if (!dtype.empty() && dtype != "float32" && dtype != "int64")
    throw RunError("package '" + path + "' has latent_dtype " + dtype + " (expected float32/int64)");
  info.num_classes = parse_count(meta, "num_classes");
  info.num_codes = parse_count(meta, "num_codes");
  info.max_batch = parse_count(meta, "max_batch");
  if (info.conditional && info.num_classes < 1)
    throw RunError("package '" + path + "' is conditional but its metadata has no num_classes");
  if (info.codes && info.num_codes < 1)
    throw RunError("package '" + path + "' decodes int64 codes but its metadata has no num_codes");
  return info;
}

c10::Device choose_device(const Options& o, const PackageInfo& info) {
  const std::string requested = o.device.empty() ? info.device : o.device;
  const c10::Device device(requested);
  if (device.type() != c10::Device(info.device).type())
    throw UsageError("the package was compiled for " + info.device + " but --device " + o.device +
                     " was requested; re-export it with --device " + device.str());
  if (device.is_cuda() && !torch::cuda::is_available())
    throw RunError("the package was compiled for CUDA but no CUDA device is visible "
                   "(or this libtorch has no CUDA support)");
  return device;
}

// A CPU tensor viewing the data of a strictly checked .npy file ("<f4" or "<i8").
at::Tensor read_tensor(const std::string& path, const std::string& descr) {
  auto a = std::make_shared<vae::npy::Array>(vae::npy::read(path, descr));
  return at::from_blob(a->bytes.data(), a->header.shape, [a](void*) {},
                       descr == "<i8" ? at::kLong : at::kFloat);
}

void check_range(const at::Tensor& t, int64_t hi, const std::string& what) {
  if (t.numel() > 0 && (t.min().item<int64_t>() < 0 || t.max().item<int64_t>() >= hi))
    throw RunError(what + ": values must lie in [0, " + std::to_string(hi) + ")");
}

// CPU (N, *latent_shape): float32 latents or int64 codes, from --latents or seeded draws.
at::Tensor make_latents(const Options& o, const PackageInfo& info) {
  if (o.latents.empty()) {
    if (!info.latent_shape)
      throw RunError("the package has no latent_shape metadata: pass --latents FILE.npy");
    std::vector<int64_t> shape{o.n};
    shape.insert(shape.end(), info.latent_shape->begin(), info.latent_shape->end());
    const at::Generator gen = at::detail::createCPUGenerator(o.seed);
    return info.codes ? at::randint(info.num_codes, shape, gen, at::kLong)
                      : at::randn(shape, gen, at::kFloat);
  }
  const at::Tensor z = read_tensor(o.latents, info.codes ? "<i8" : "<f4");
  const std::vector<int64_t> shape = as_vector(z.sizes());
  if (shape.empty() || shape[0] < 1)
    throw RunError(o.latents + ": expected latents of shape (N, ...) with N >= 1, got " +
                   vae::npy::shape_str(shape));
  const std::vector<int64_t> rest(shape.begin() + 1, shape.end());
  if (info.latent_shape && rest != *info.latent_shape)
    throw RunError("wrong latent shape in " + o.latents + ": the package expects " +
                   shape_of(-1, *info.latent_shape) + ", got " + vae::npy::shape_str(shape));
  if (o.n >= 0 && o.n != shape[0])
    throw UsageError("--n " + std::to_string(o.n) + " disagrees with the " +
                     std::to_string(shape[0]) + " latents in " + o.latents);
  if (info.codes) check_range(z, info.num_codes, o.latents);
  return z;
}

// CPU int64 (N,) labels, or an undefined tensor for unconditional packages.
at::Tensor make_labels(const Options& o, const PackageInfo& info, int64_t n) {
  if (!info.conditional) {
    if (!o.labels.empty()) throw UsageError("--labels given but the package is unconditional");
    return {};
  }
  if (o.labels.empty()) return at::arange(n, at::kLong).remainder(info.num_classes);
  const at::Tensor y = read_tensor(o.labels, "<i8");
  if (as_vector(y.sizes()) != std::vector<int64_t>{n})
    throw RunError("wrong label shape in " + o.labels + ": expected (" + std::to_string(n) +
                   ",), got " + vae::npy::shape_str(as_vector(y.sizes())));
  check_range(y, info.num_classes, o.labels);
  return y;
}

std::vector<at::Tensor> inputs_for(const at::Tensor& z, const at::Tensor& y, int64_t begin,
                                   int64_t end, const c10::Device& device) {
  std::vector<at::Tensor> in{z.slice(0, begin, end).to(device).contiguous()};
  if (y.defined()) in.push_back(y.slice(0, begin, end).to(device).contiguous());
  return in;
}

at::Tensor run_batch(torch::inductor::AOTIModelPackageLoader& loader,
                     const std::vector<at::Tensor>& in) {
  try {
    std::vector<at::Tensor> out = loader.run(in);
    if (out.empty()) throw RunError("the package returned no outputs");
    return out[0];
  } catch (const c10::Error& e) {
    throw RunError("running the package failed: " +
                   vae::cli::first_line(e.what_without_backtrace()));
  }
}

// Decodes all N latents in batches of B; returns CPU float32 (N, *output_shape).
at::Tensor decode_all(torch::inductor::AOTIModelPackageLoader& loader, const PackageInfo& info,
                      const at::Tensor& z, const at::Tensor& y, int64_t batch,
                      const c10::Device& device) {
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < z.size(0); i += batch) {
    const int64_t end = std::min(i + batch, z.size(0));
    at::Tensor x = run_batch(loader, inputs_for(z, y, i, end, device));
    if (x.dim() < 1 || x.size(0) != end - i)
      throw RunError("the package returned " + vae::npy::shape_str(as_vector(x.sizes())) +
                     " for a batch of " + std::to_string(end - i));
    const std::vector<int64_t> rest(x.sizes().begin() + 1, x.sizes().end());
    if (info.output_shape && rest != *info.output_shape)
      throw RunError("the package returned " + vae::npy::shape_str(as_vector(x.sizes())) +
                     " but its metadata says " + shape_of(end - i, *info.output_shape));
    parts.push_back(x.to(at::kCPU, at::kFloat).contiguous());
  }
  return at::cat(parts, 0);
}

void write_outputs(const Options& o, const at::Tensor& x) {
  const std::vector<int64_t> shape = as_vector(x.sizes());
  vae::npy::write(o.out, "<f4", shape, x.data_ptr(), static_cast<size_t>(x.nbytes()));
  if (o.grid.empty()) return;
  if (x.dim() != 4)
    throw RunError("--grid needs outputs of shape (N, C, H, W), got " + vae::npy::shape_str(shape));
  vae::grid::write(o.grid, x.data_ptr<float>(), shape[0], shape[1], shape[2], shape[3]);
}

void synchronize(const c10::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(device.index());
}

// Times `repeat` calls on the first --batch-size latents; prints the timing JSON.
void bench(const Options& o, torch::inductor::AOTIModelPackageLoader& loader, const at::Tensor& z,
           const at::Tensor& y, const c10::Device& device, double load_s) {
  const int64_t b = std::min(o.batch_size, z.size(0));
  const std::vector<at::Tensor> in = inputs_for(z, y, 0, b, device);
  const int64_t warmup = o.warmup >= 0 ? o.warmup : std::max<int64_t>(5, o.repeat / 10);
  for (int64_t i = 0; i < warmup; ++i) run_batch(loader, in);
  synchronize(device);
  std::vector<double> ms;
  for (int64_t i = 0; i < o.repeat; ++i) {
    const auto t0 = Clock::now();
    run_batch(loader, in);
    synchronize(device);
    ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::cout << vae::cli::timing_json("aoti", device.str(), b, ms, load_s) << std::endl;
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

int run(int argc, const char* const* argv) {
  const Options o = vae::cli::parse(argc, argv);
  if (o.help) {
    std::cout << vae::cli::usage("vae_sample", "an AOTInductor decoder package (.pt2)");
    return 0;
  }
  if (!o.out.empty()) vae::cli::check_output_dir(o.out, "--out");
  if (!o.grid.empty()) vae::cli::check_output_dir(o.grid, "--grid");
  if (!o.grid.empty()) vae::grid::check_path(o.grid, -1);
  if (o.threads > 0) at::set_num_threads(static_cast<int>(o.threads));
  check_package_file(o.package);
  const PackageInfo info = read_package_info(o.package);
  const c10::Device device = choose_device(o, info);
  if (info.max_batch > 0 && o.batch_size > info.max_batch)
    throw UsageError("--batch-size " + std::to_string(o.batch_size) + " exceeds the package's " +
                     "max_batch " + std::to_string(info.max_batch));
  if (!o.grid.empty() && info.output_shape && info.output_shape->size() == 3)
    vae::grid::check_path(o.grid, info.output_shape->front());
  const at::Tensor z = make_latents(o, info);
  const at::Tensor y = make_labels(o, info, z.size(0));

  const auto t_load = Clock::now();
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
        o.package, "model", false, 1, device.is_cuda() ? device.index() : -1);
  } catch (const c10::Error& e) {
    throw RunError("cannot load AOTInductor package '" + o.package + "': " +
                   vae::cli::first_line(e.what_without_backtrace()));
  }
  const double load_s = seconds_since(t_load);
  if (o.repeat > 0) bench(o, *loader, z, y, device, load_s);
  if (o.out.empty()) return 0;

  const auto t0 = Clock::now();
  const at::Tensor x = decode_all(*loader, info, z, y, o.batch_size, device);
  const double decode_s = seconds_since(t0);
  write_outputs(o, x);
  std::cerr << "vae_sample: wrote " << vae::npy::shape_str(as_vector(x.sizes())) << " to "
            << o.out << (o.grid.empty() ? "" : " and " + o.grid) << " (" << device.str() << ", "
            << decode_s * 1e3 << " ms decoding, " << load_s * 1e3 << " ms loading)" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "vae_sample: error: " << vae::cli::first_line(e.what()) << "\n";
    return 2;
  } catch (const c10::Error& e) {
    std::cerr << "vae_sample: error: " << vae::cli::first_line(e.what_without_backtrace()) << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "vae_sample: error: " << vae::cli::first_line(e.what()) << "\n";
    return 1;
  }
}

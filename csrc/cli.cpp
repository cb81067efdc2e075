// Command line parsing and small helpers; see cli.h.
#include "cli.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <numeric>
#include <sstream>

namespace vae::cli {
namespace {

int64_t to_int(const std::string& flag, const std::string& v, int64_t min) {
  size_t used = 0;
  long long x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != v.size() || v.empty())
    throw UsageError(flag + " expects an integer, got '" + v + "'");
  if (x < min) throw UsageError(flag + " must be >= " + std::to_string(min) + ", got " + v);
  return x;
}

using Setter = std::function<void(Options&, const std::string&)>;

const std::map<std::string, Setter>& setters() {
  static const std::map<std::string, Setter> table = {
      {"--n", [](Options& o, const std::string& v) { o.n = to_int("--n", v, 1); }},
      {"--batch-size",
       [](Options& o, const std::string& v) { o.batch_size = to_int("--batch-size", v, 1); }},
      {"--seed",
       [](Options& o, const std::string& v) { o.seed = static_cast<uint64_t>(to_int("--seed", v, 0)); }},
      {"--out", [](Options& o, const std::string& v) { o.out = v; }},
      {"--latents", [](Options& o, const std::string& v) { o.latents = v; }},
      {"--labels", [](Options& o, const std::string& v) { o.labels = v; }},
      {"--grid", [](Options& o, const std::string& v) { o.grid = v; }},
      {"--device", [](Options& o, const std::string& v) { o.device = v; }},
      {"--repeat", [](Options& o, const std::string& v) { o.repeat = to_int("--repeat", v, 1); }},
      {"--warmup", [](Options& o, const std::string& v) { o.warmup = to_int("--warmup", v, 0); }},
      {"--threads", [](Options& o, const std::string& v) { o.threads = to_int("--threads", v, 1); }},
  };
  return table;
}

void validate(const Options& o) {
  if (o.package.empty()) throw UsageError("missing PACKAGE (the first positional argument)");
  if (o.out.empty() && o.repeat == 0) throw UsageError("--out FILE.npy is required");
  if (o.n < 0 && o.latents.empty())
    throw UsageError("give --n N (random latents) or --latents FILE.npy");
  if (!o.device.empty() && o.device != "cpu" && o.device.rfind("cuda", 0) != 0)
    throw UsageError("--device must be cpu, cuda or cuda:K, got '" + o.device + "'");
  if (!o.grid.empty() && o.out.empty()) throw UsageError("--grid needs --out");
}

}  // namespace

Options parse(int argc, const char* const* argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    if (arg == "-h" || arg == "--help") {
      o.help = true;
      return o;
    }
    if (arg.rfind("--", 0) != 0) {
      if (!o.package.empty()) throw UsageError("unexpected argument '" + arg + "'");
      o.package = arg;
      continue;
    }
    const size_t eq = arg.find('=');
    if (eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    const auto it = setters().find(arg);
    if (it == setters().end()) throw UsageError("unknown option '" + arg + "' (see --help)");
    if (eq == std::string::npos) {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      value = argv[++i];
    }
    it->second(o, value);
  }
  validate(o);
  return o;
}

std::string usage(const std::string& prog, const std::string& package_kind) {
  return "usage: " + prog + " PACKAGE (--n N | --latents FILE.npy) --out FILE.npy\n"
         "       [--batch-size B] [--seed S] [--labels FILE.npy] [--grid FILE.pgm|FILE.ppm]\n"
         "       [--device cpu|cuda[:K]] [--threads T] [--repeat R [--warmup W]]\n\n"
         "Decode latents with " + package_kind + " and write the outputs as float32 .npy.\n\n"
         "  PACKAGE          " + package_kind + "\n"
         "  --n N            number of samples; latents z ~ N(0, I) from --seed (default 0)\n"
         "  --latents FILE   float32 C-order .npy of shape (N, *latent_shape) instead\n"
         "  --labels FILE    int64 .npy of shape (N,) for conditional models\n"
         "                   (default: labels 0, 1, ..., num_classes-1, repeated)\n"
         "  --batch-size B   decode B latents per call (default 64)\n"
         "  --out FILE       float32 .npy of shape (N, *output_shape)\n"
         "  --grid FILE      also write an image grid, values clamped to [0, 1]\n"
         "  --device D       device to run on; must match the package (default: the package's)\n"
         "  --threads T      CPU intra-op threads (default: the library's)\n"
         "  --repeat R       time R decode calls of --batch-size latents, print JSON with the\n"
         "                   median per-call latency (--out becomes optional)\n"
         "  --warmup W       untimed calls before timing (default max(5, R/10))\n\n"
         "Exit status: 0 on success, 1 on a runtime error, 2 on a usage error.\n";
}

void check_output_dir(const std::string& path, const std::string& flag) {
  namespace fs = std::filesystem;
  fs::path dir = fs::path(path).parent_path();
  if (dir.empty()) dir = ".";
  std::error_code ec;
  if (!fs::is_directory(dir, ec))
    throw UsageError("output directory '" + dir.string() + "' of " + flag + " " + path +
                     " does not exist; create it first");
}

std::string first_line(const std::string& what) {
  const size_t nl = what.find('\n');
  return nl == std::string::npos ? what : what.substr(0, nl);
}

double percentile(std::vector<double> values, double pct) {
  // Linear interpolation between closest ranks, as numpy.percentile does by default.
  if (values.empty()) return std::nan("");
  std::sort(values.begin(), values.end());
  const double pos = pct / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos)), hi = static_cast<size_t>(std::ceil(pos));
  return values[lo] + (values[hi] - values[lo]) * (pos - static_cast<double>(lo));
}

std::string timing_json(const std::string& backend, const std::string& device, int64_t batch,
                        const std::vector<double>& ms, double load_s) {
  const double mean = std::accumulate(ms.begin(), ms.end(), 0.0) / static_cast<double>(ms.size());
  std::ostringstream os;
  os.precision(6);
  os << "{\"backend\": \"" << backend << "\", \"device\": \"" << device
     << "\", \"batch\": " << batch << ", \"repeat\": " << ms.size()
     << ", \"median_ms\": " << percentile(ms, 50) << ", \"p10_ms\": " << percentile(ms, 10)
     << ", \"p90_ms\": " << percentile(ms, 90) << ", \"mean_ms\": " << mean
     << ", \"min_ms\": " << *std::min_element(ms.begin(), ms.end())
     << ", \"load_s\": " << load_s << ", \"times_ms\": [";
  for (size_t i = 0; i < ms.size(); ++i) os << (i ? ", " : "") << ms[i];
  os << "]}";
  return os.str();
}

}  // namespace vae::cli

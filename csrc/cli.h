// Command line shared by vae_sample and vae_sample_trt, C++17, no torch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace vae::cli {

// A usage error: the runner prints "<prog>: error: <what>" and exits with status 2.
struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct Options {
  std::string package;        // .pt2 (vae_sample) or serialized engine (vae_sample_trt)
  int64_t n = -1;             // samples; -1: from --latents
  int64_t batch_size = 64;
  uint64_t seed = 0;
  std::string out;            // .npy of the outputs, float32 (N, *output_shape)
  std::string latents;        // .npy float32 (N, *latent_shape)
  std::string labels;         // .npy int64 (N,)
  std::string grid;           // .pgm / .ppm
  std::string device;         // "", "cpu", "cuda", "cuda:K"
  int64_t repeat = 0;         // > 0: time `repeat` calls at --batch-size, print JSON
  int64_t warmup = -1;        // calls before timing; -1: max(5, repeat / 10)
  int64_t threads = 0;        // > 0: intra-op threads (CPU)
  bool help = false;
};

// Parses argv; "--flag value" and "--flag=value" both work. Throws UsageError.
Options parse(int argc, const char* const* argv);

std::string usage(const std::string& prog, const std::string& package_kind);

// Throws UsageError when the directory that would hold `path` does not exist.
void check_output_dir(const std::string& path, const std::string& flag);

// The first line of `what`, for one-line error messages.
std::string first_line(const std::string& what);

// Percentile (0..100, linear interpolation as numpy.percentile) of per-call times.
double percentile(std::vector<double> values, double pct);

// {"median_ms": ..., "times_ms": [...]}: the timing JSON both runners print for --repeat.
std::string timing_json(const std::string& backend, const std::string& device, int64_t batch,
                        const std::vector<double>& ms, double load_s);

}  // namespace vae::cli

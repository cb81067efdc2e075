// PGM/PPM image grid; see image_grid.h. Format: https://netpbm.sourceforge.net/doc/pgm.html
#include "image_grid.h"

#include <cmath>
#include <fstream>
#include <stdexcept>
#include <vector>

namespace vae::grid {
namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

unsigned char to_byte(float v) {
  if (!(v > 0.f)) return 0;  // also NaN
  if (v >= 1.f) return 255;
  return static_cast<unsigned char>(std::lround(v * 255.f));
}

}  // namespace

void check_path(const std::string& path, int64_t channels) {
  const bool pgm = ends_with(path, ".pgm"), ppm = ends_with(path, ".ppm");
  if (!pgm && !ppm)
    throw std::invalid_argument("--grid " + path + ": expected a .pgm (1 channel) or .ppm "
                                "(3 channels) file name");
  if (channels < 0) return;
  if (channels != 1 && channels != 3)
    throw std::invalid_argument("--grid needs outputs of shape (N, 1 or 3, H, W); these have " +
                                std::to_string(channels) + " channels");
  if ((channels == 1) != pgm)
    throw std::invalid_argument("--grid " + path + ": outputs have " + std::to_string(channels) +
                                " channel(s), use a ." + (channels == 1 ? "pgm" : "ppm") +
                                " file name");
}

void write(const std::string& path, const float* images, int64_t n, int64_t channels,
           int64_t height, int64_t width, int64_t pad) {
  check_path(path, channels);
  int64_t cols = 1;
  while (cols * cols < n) ++cols;
  const int64_t rows = (n + cols - 1) / cols;
  const int64_t gw = cols * (width + pad) + pad, gh = rows * (height + pad) + pad;
  std::vector<unsigned char> pix(static_cast<size_t>(gw * gh * channels), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x0 = pad + (i % cols) * (width + pad), y0 = pad + (i / cols) * (height + pad);
    const float* img = images + i * channels * height * width;  // (C, H, W)
    for (int64_t c = 0; c < channels; ++c)
      for (int64_t y = 0; y < height; ++y)
        for (int64_t x = 0; x < width; ++x)
          pix[static_cast<size_t>(((y0 + y) * gw + x0 + x) * channels + c)] =
              to_byte(img[(c * height + y) * width + x]);
  }
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error(path + ": cannot open for writing (does its directory exist?)");
  f << (channels == 1 ? "P5" : "P6") << '\n' << gw << ' ' << gh << "\n255\n";
  f.write(reinterpret_cast<const char*>(pix.data()), static_cast<std::streamsize>(pix.size()));
  if (!f.flush()) throw std::runtime_error(path + ": write failed (disk full?)");
}

}  // namespace vae::grid

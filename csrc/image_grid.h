// Write a batch of images as one binary PGM (1 channel) or PPM (3 channels) grid, C++17.
#pragma once

#include <cstdint>
#include <string>

namespace vae::grid {

// Throws std::invalid_argument unless `path` ends in .pgm (channels == 1) or .ppm (channels == 3).
// channels < 0 checks the extension only.
void check_path(const std::string& path, int64_t channels);

// images: (n, channels, height, width) float32, C order. Values are clamped to [0, 1] (NaN -> 0)
// and scaled to 0..255. Images are laid out row-major in ceil(sqrt(n)) columns with `pad` black
// pixels between and around them.
void write(const std::string& path, const float* images, int64_t n, int64_t channels,
           int64_t height, int64_t width, int64_t pad = 2);

}  // namespace vae::grid

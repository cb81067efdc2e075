// Strict reader and writer of NumPy .npy files (format 1.0 / 2.0 / 3.0), C++17, no torch.
//
// Only what the runners exchange is accepted: little-endian float32 ('<f4') latents and
// outputs, int64 ('<i8') labels, C order. Anything else (a bad magic string, an unknown version,
// another dtype, fortran_order True, a malformed header dict, a data size that does not match
// the shape) raises vae::npy::Error with a one-line message naming the file.
// Format: https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace vae::npy {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Header {
  std::string descr;            // e.g. "<f4"
  bool fortran_order = false;
  std::vector<int64_t> shape;   // () for a scalar
};

struct Array {
  Header header;
  std::vector<char> bytes;      // C-order data, numel * itemsize bytes
  int64_t numel() const;
};

// Parses the header dict text, e.g. "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 8), }".
Header parse_header(const std::string& text);

// Reads `path`, requiring dtype `descr` ("<f4" or "<i8"), C order and an exact data size.
Array read(const std::string& path, const std::string& descr);

// Writes a version 1.0 file; `bytes` must hold numel(shape) * itemsize(descr) bytes.
void write(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
           const void* bytes, size_t nbytes);

// "(2, 8)" -- a shape as Python prints it, for messages.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace vae::npy

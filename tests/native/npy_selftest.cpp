// Torch-free checks of the .npy reader/writer and the image grid (ctest: native.npy_selftest).
//   npy_selftest SCRATCH_DIR
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include "image_grid.h"
#include "npy.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::cerr << "FAIL: " << what << "\n";
    ++failures;
  }
}

// `fn` must throw an exception whose message contains `needle`.
void expect_error(const std::function<void()>& fn, const std::string& needle,
                  const std::string& what) {
  try {
    fn();
    check(false, what + ": no exception");
  } catch (const std::exception& e) {
    check(std::string(e.what()).find(needle) != std::string::npos,
          what + ": message '" + e.what() + "' lacks '" + needle + "'");
  }
}

void write_raw(const std::string& path, const std::string& header, size_t data_bytes,
               char version = '\x01') {
  std::string h = header;
  while ((10 + h.size() + 1) % 64) h += ' ';
  h += '\n';
  std::ofstream f(path, std::ios::binary);
  f << "\x93NUMPY" << version << '\x00';
  f.put(static_cast<char>(h.size() & 0xff)).put(static_cast<char>(h.size() >> 8));
  f << h << std::string(data_bytes, '\0');
}

void round_trip(const std::string& dir) {
  const std::vector<float> x = {0.f, 1.5f, -2.f, 3.25f, 4.f, 5.f};
  vae::npy::write(dir + "/rt.npy", "<f4", {2, 3}, x.data(), x.size() * 4);
  const auto a = vae::npy::read(dir + "/rt.npy", "<f4");
  check(a.header.shape == std::vector<int64_t>{2, 3}, "round trip shape");
  check(std::vector<float>(reinterpret_cast<const float*>(a.bytes.data()),
                           reinterpret_cast<const float*>(a.bytes.data()) + 6) == x,
        "round trip values");
  const auto h = vae::npy::parse_header("{'descr': '<i8', 'fortran_order': False, 'shape': (7,), }");
  check(h.descr == "<i8" && h.shape == std::vector<int64_t>{7}, "parse 1-d header");
  check(vae::npy::parse_header("{\"shape\": (), \"fortran_order\": False, \"descr\": \"<f4\"}")
            .shape.empty(), "parse scalar header, any key order");
}

void bad_files(const std::string& dir) {
  const std::string p = dir + "/bad.npy";
  const auto rd = [&] { vae::npy::read(p, "<f4"); };
  std::ofstream(p) << "hello";
  expect_error(rd, "bad magic", "bad magic");
  write_raw(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 8, '\x07');
  expect_error(rd, "unsupported .npy version 7.0", "bad version");
  write_raw(p, "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 16);
  expect_error(rd, "found '<f8'", "float64");
  write_raw(p, "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8);
  expect_error(rd, "found '>f4'", "big endian");
  write_raw(p, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", 16);
  expect_error(rd, "fortran_order is True", "fortran order");
  write_raw(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 20);
  expect_error(rd, "needs 24 data bytes, the file has 20", "truncated data");
  write_raw(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 12);
  expect_error(rd, "needs 8 data bytes, the file has 12", "trailing data");
  write_raw(p, "{'descr': '<f4', 'fortran_order': False}", 0);
  expect_error(rd, "missing key 'shape'", "missing key");
  write_raw(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, -1), }", 0);
  expect_error(rd, "expected a non-negative integer", "negative dim");
  write_raw(p, "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'x': 1}", 8);
  expect_error(rd, "unexpected key 'x'", "extra key");
  expect_error([&] { vae::npy::read(dir + "/absent.npy", "<f4"); }, "cannot open", "absent");
}

void grid(const std::string& dir) {
  const std::vector<float> img(5 * 1 * 4 * 3, 2.f);  // 5 images 1x4x3, clamped to 255
  vae::grid::write(dir + "/g.pgm", img.data(), 5, 1, 4, 3, 1);
  std::ifstream f(dir + "/g.pgm", std::ios::binary);
  std::string magic;
  int w = 0, h = 0, maxval = 0;
  f >> magic >> w >> h >> maxval;
  check(magic == "P5" && w == 3 * 4 + 1 && h == 2 * 5 + 1 && maxval == 255, "grid header");
  expect_error([&] { vae::grid::check_path(dir + "/g.ppm", 1); }, "use a .pgm", "grid ext");
  expect_error([&] { vae::grid::check_path(dir + "/g.png", -1); }, ".pgm (1 channel)", "png");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string dir = argc > 1 ? argv[1] : ".";
  round_trip(dir);
  bad_files(dir);
  grid(dir);
  std::cout << (failures ? "FAILED" : "all npy/grid checks passed") << "\n";
  return failures ? 1 : 0;
}

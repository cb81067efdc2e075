// Strict .npy reader/writer; see npy.h.
#include "npy.h"

#include <cctype>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <sstream>

namespace vae::npy {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;

int64_t itemsize(const std::string& descr) {
  if (descr == "<f4") return 4;
  if (descr == "<i8") return 8;
  throw Error("unsupported dtype '" + descr + "' (supported: '<f4' float32, '<i8' int64)");
}

std::string dtype_name(const std::string& descr) {
  return descr == "<f4" ? "float32" : descr == "<i8" ? "int64" : descr;
}

// Recursive-descent parser of the one Python literal dict an .npy header holds.
class HeaderParser {
 public:
  explicit HeaderParser(const std::string& text) : s_(text) {}

  Header parse() {
    std::map<std::string, bool> seen;
    Header h;
    expect('{');
    while (!peek('}')) {
      std::string key = string_literal();
      expect(':');
      if (seen[key]) fail("duplicate key '" + key + "'");
      seen[key] = true;
      if (key == "descr") h.descr = string_literal();
      else if (key == "fortran_order") h.fortran_order = boolean();
      else if (key == "shape") h.shape = tuple();
      else fail("unexpected key '" + key + "'");
      if (!peek('}')) expect(',');
    }
    expect('}');
    skip_space();
    if (pos_ != s_.size()) fail("trailing characters after the dict");
    for (const char* k : {"descr", "fortran_order", "shape"})
      if (!seen[k]) fail(std::string("missing key '") + k + "'");
    return h;
  }

 private:
  [[noreturn]] void fail(const std::string& why) const {
    throw Error("malformed .npy header (" + why + " at offset " + std::to_string(pos_) + ")");
  }
  void skip_space() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool peek(char c) {
    skip_space();
    return pos_ < s_.size() && s_[pos_] == c;
  }
  void expect(char c) {
    if (!peek(c)) fail(std::string("expected '") + c + "'");
    ++pos_;
  }
  std::string string_literal() {
    skip_space();
    if (pos_ >= s_.size() || (s_[pos_] != '\'' && s_[pos_] != '"')) fail("expected a string");
    const char quote = s_[pos_++];
    const size_t end = s_.find(quote, pos_);
    if (end == std::string::npos) fail("unterminated string");
    std::string out = s_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return out;
  }
  bool boolean() {
    skip_space();
    for (const auto& [word, value] : {std::pair{"True", true}, std::pair{"False", false}}) {
      const size_t n = std::strlen(word);
      if (s_.compare(pos_, n, word) == 0) {
        pos_ += n;
        return value;
      }
    }
    fail("expected True or False");
  }
  int64_t integer() {
    skip_space();
    const size_t start = pos_;
    int64_t v = 0;
    while (pos_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[pos_]))) {
      if (v > (std::numeric_limits<int64_t>::max() - 9) / 10) fail("dimension too large");
      v = v * 10 + (s_[pos_++] - '0');
    }
    if (pos_ == start) fail("expected a non-negative integer");
    if (pos_ < s_.size() && s_[pos_] == 'L') ++pos_;  // Python 2 longs in old files
    return v;
  }
  std::vector<int64_t> tuple() {
    std::vector<int64_t> dims;
    expect('(');
    while (!peek(')')) {
      dims.push_back(integer());
      if (peek(',')) ++pos_;
      else if (!peek(')')) fail("expected ',' or ')' in shape");
    }
    expect(')');
    return dims;
  }

  const std::string& s_;
  size_t pos_ = 0;
};

uint32_t read_le(const unsigned char* p, int nbytes) {
  uint32_t v = 0;
  for (int i = nbytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) throw Error("shape overflows");
    n *= d;
  }
  return n;
}

}  // namespace

int64_t Array::numel() const { return checked_numel(header.shape); }

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << '(';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
}

Header parse_header(const std::string& text) { return HeaderParser(text).parse(); }

Array read(const std::string& path, const std::string& descr) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(path + ": cannot open the file (does it exist?)");
  const std::string file((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  const auto* u = reinterpret_cast<const unsigned char*>(file.data());
  if (file.size() < kMagicLen + 2 || file.compare(0, kMagicLen, kMagic) != 0)
    throw Error(path + ": not a .npy file (bad magic string); save it with numpy.save");
  const int major = u[6], minor = u[7];
  if (!((major == 1 || major == 2 || major == 3) && minor == 0))
    throw Error(path + ": unsupported .npy version " + std::to_string(major) + "." +
                std::to_string(minor) + " (expected 1.0, 2.0 or 3.0)");
  const size_t len_bytes = major == 1 ? 2 : 4, start = kMagicLen + 2 + len_bytes;
  if (file.size() < start) throw Error(path + ": truncated .npy header");
  const size_t header_len = read_le(u + kMagicLen + 2, static_cast<int>(len_bytes));
  if (file.size() < start + header_len) throw Error(path + ": truncated .npy header");
  Array a;
  try {
    a.header = parse_header(file.substr(start, header_len));
  } catch (const Error& e) {
    throw Error(path + ": " + e.what());
  }
  if (a.header.descr != descr)
    throw Error(path + ": expected dtype '" + descr + "' (" + dtype_name(descr) + "), found '" +
                a.header.descr + "'; convert with numpy.asarray(x, dtype=numpy." +
                dtype_name(descr) + ")");
  if (a.header.fortran_order)
    throw Error(path + ": fortran_order is True; save a C-order array (numpy.ascontiguousarray)");
  const int64_t nbytes = checked_numel(a.header.shape) * itemsize(descr);
  const int64_t have = static_cast<int64_t>(file.size() - start - header_len);
  if (have != nbytes)
    throw Error(path + ": shape " + shape_str(a.header.shape) + " needs " +
                std::to_string(nbytes) + " data bytes, the file has " + std::to_string(have));
  a.bytes.assign(file.begin() + static_cast<std::ptrdiff_t>(start + header_len), file.end());
  return a;
}

void write(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
           const void* bytes, size_t nbytes) {
  if (static_cast<int64_t>(nbytes) != checked_numel(shape) * itemsize(descr))
    throw Error("npy::write: " + std::to_string(nbytes) + " bytes do not match shape " +
                shape_str(shape) + " of dtype " + descr);
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " +
                       shape_str(shape) + ", }";
  const size_t unpadded = kMagicLen + 2 + 2 + header.size() + 1;  // + the final '\n'
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  if (header.size() > 65535) throw Error("npy::write: header too long for format 1.0");
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw Error(path + ": cannot open for writing (does its directory exist?)");
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  f.write(kMagic, kMagicLen).put('\x01').put('\x00');
  f.write(reinterpret_cast<const char*>(len), 2).write(header.data(), header.size());
  f.write(static_cast<const char*>(bytes), static_cast<std::streamsize>(nbytes));
  if (!f.flush()) throw Error(path + ": write failed (disk full?)");
}

}  // namespace vae::npy

// Errors raised by the core. The bindings translate each kind into the matching Python exception,
// so a message written here reaches the user verbatim: name the op and the argument.
#pragma once

#include <stdexcept>
#include <string>

namespace meldkit {

enum class ErrorKind {
  kValue,    // a bad value or shape: Python ValueError
  kType,     // a bad dtype, device or object type: Python TypeError
  kRuntime,  // a failure while running (CUDA launch error, ...): Python RuntimeError
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }

 private:
  ErrorKind kind_;
};

[[noreturn]] inline void throw_value_error(const std::string& msg) {
  throw Error(ErrorKind::kValue, msg);
}
[[noreturn]] inline void throw_type_error(const std::string& msg) {
  throw Error(ErrorKind::kType, msg);
}
[[noreturn]] inline void throw_runtime_error(const std::string& msg) {
  throw Error(ErrorKind::kRuntime, msg);
}

}  // namespace meldkit

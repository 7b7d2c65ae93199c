// The DLPack exchange ABI (version 1.x), declared from the DLPack specification: the struct layouts
// and enum values every producer (torch, numpy, cupy, jax) agrees on. Only what the bindings read
// is declared. See third_party/dlpack/README.md for why this is not a vendored copy.
#pragma once

#include <cstdint>

namespace meldkit::dlpack {

// Capsule names of the two exchange structs.
constexpr const char* kVersionedCapsule = "dltensor_versioned";
constexpr const char* kLegacyCapsule = "dltensor";
constexpr uint32_t kMajorVersion = 1;

enum DeviceType : int32_t {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLCUDAManaged = 13,
};

enum TypeCode : uint8_t {
  kDLInt = 0,
  kDLUInt = 1,
  kDLFloat = 2,
  kDLBfloat = 4,
  kDLComplex = 5,
  kDLBool = 6,
};

constexpr uint64_t kFlagReadOnly = 1ull << 0;

struct Version {
  uint32_t major;
  uint32_t minor;
};

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; may be null in the legacy struct (compact row-major)
  uint64_t byte_offset;
};

struct ManagedTensor {
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  uint64_t flags;
  Tensor dl_tensor;
};

}  // namespace meldkit::dlpack

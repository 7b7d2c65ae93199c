// The DLPack exchange ABI (version 1.x), declared from the DLPack specification: the struct layouts
// and enum values every producer (torch, numpy, cupy, jax) agrees on, and the C exchange table of
// DLPack 1.3 (`__dlpack_c_exchange_api__`). Only what the bindings read is declared. See
// third_party/dlpack/README.md for why this is not a vendored copy.
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

// DLPack 1.3's C exchange table: a producer's type carries it as `__dlpack_c_exchange_api__`, a
// capsule named kExchangeApiCapsule. Both calls need the GIL, return 0 or -1 with a Python
// exception set, and synchronise nothing: the consumer runs on the producer's current stream.
constexpr const char* kExchangeApiCapsule = "dlpack_exchange_api";
constexpr uint32_t kExchangeApiMinMinor = 3;

struct ExchangeApiHeader {
  Version version;
  ExchangeApiHeader* prev_api;
};

struct ExchangeApi {
  ExchangeApiHeader header;
  void* managed_tensor_allocator;               // not used here
  void* managed_tensor_from_py_object_no_sync;  // not used here
  void* managed_tensor_to_py_object_no_sync;    // not used here
  // A non-owning view of the object's tensor (may be null: not provided). Its shape and strides
  // belong to the producer and stay valid while the object lives unchanged.
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);
  // The producer's current stream on a device (null on the CPU, and for CUDA's default stream).
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};

}  // namespace meldkit::dlpack

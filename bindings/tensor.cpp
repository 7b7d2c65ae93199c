// DLPack import and the shared argument checks.
#include "tensor.h"

#include <cmath>
#include <sstream>

#include "dlpack_abi.h"
#include "meldkit/status.h"
#include "ops.h"

namespace meldkit::bind {

namespace {

std::string type_name(py::handle obj) { return py::str(py::type::of(obj).attr("__qualname__")); }

std::string dl_dtype_name(const dlpack::DataType& t) {
  std::string base;
  switch (t.code) {
    case dlpack::kDLInt:
      base = "int";
      break;
    case dlpack::kDLUInt:
      base = "uint";
      break;
    case dlpack::kDLFloat:
      base = "float";
      break;
    case dlpack::kDLBfloat:
      base = "bfloat";
      break;
    case dlpack::kDLComplex:
      base = "complex";
      break;
    case dlpack::kDLBool:
      return "bool";
    default:
      base = "code" + std::to_string(t.code) + "_";
  }
  std::string name = base + std::to_string(t.bits);
  if (t.lanes != 1) name += "x" + std::to_string(t.lanes);
  return name;
}

bool to_dtype(const dlpack::DataType& t, DType* out) {
  if (t.lanes != 1) return false;
  if (t.code == dlpack::kDLFloat && t.bits == 32)
    *out = DType::kFloat32;
  else if (t.code == dlpack::kDLFloat && t.bits == 16)
    *out = DType::kFloat16;
  else if (t.code == dlpack::kDLBfloat && t.bits == 16)
    *out = DType::kBFloat16;
  else if (t.code == dlpack::kDLFloat && t.bits == 64)
    *out = DType::kFloat64;
  else if (t.code == dlpack::kDLInt && t.bits == 64)
    *out = DType::kInt64;
  else
    return false;
  return true;
}

// Calls obj.__dlpack__, asking for a versioned capsule first and falling back to the legacy one
// for producers that predate DLPack 1.0 (they reject the max_version keyword).
py::object export_capsule(py::handle obj, const ArgName& name, py::object stream) {
  py::object fn = obj.attr("__dlpack__");
  try {
    return fn(py::arg("stream") = stream, py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& e) {
    if (!e.matches(PyExc_TypeError)) {
      throw_type_error(name.prefix() + ": cannot be exported through DLPack: " + e.what());
    }
  }
  try {
    return fn(py::arg("stream") = stream);
  } catch (py::error_already_set& e) {
    throw_type_error(name.prefix() + ": cannot be exported through DLPack: " + e.what());
  }
}

}  // namespace

int64_t TensorArg::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

bool TensorArg::is_contiguous() const {
  if (numel() == 0) return true;  // nothing to address, as torch treats it
  int64_t expected = 1;
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] != 1 && strides[d] != expected) return false;
    expected *= shape[d];
  }
  return true;
}

std::string TensorArg::device_str() const {
  return device == DeviceKind::kCPU ? "cpu" : "cuda:" + std::to_string(device_id);
}

std::string TensorArg::shape_str() const {
  std::ostringstream os;
  os << "[";
  for (size_t d = 0; d < shape.size(); ++d) os << (d ? ", " : "") << shape[d];
  os << "]";
  return os.str();
}

namespace {

// The DLPack 1.3 C exchange table of obj's type, or null when it has none we can use (older
// producers, other major versions, no non-owning view). Looked up on the type each call: an
// attribute lookup on a type is cached by CPython, and no table outlives a type here.
const dlpack::ExchangeApi* exchange_api(py::handle obj) {
  static PyObject* const attr = PyUnicode_InternFromString("__dlpack_c_exchange_api__");
  PyObject* cap = PyObject_GetAttr(reinterpret_cast<PyObject*>(Py_TYPE(obj.ptr())), attr);
  if (cap == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  const dlpack::ExchangeApi* api = nullptr;
  if (PyCapsule_IsValid(cap, dlpack::kExchangeApiCapsule)) {
    api = static_cast<const dlpack::ExchangeApi*>(
        PyCapsule_GetPointer(cap, dlpack::kExchangeApiCapsule));
  }
  Py_DECREF(cap);
  if (api == nullptr || api->header.version.major != dlpack::kMajorVersion ||
      api->header.version.minor < dlpack::kExchangeApiMinMinor ||
      api->dltensor_from_py_object_no_sync == nullptr || api->current_work_stream == nullptr) {
    return nullptr;
  }
  return api;
}

bool use_exchange = true;  // set_dlpack_exchange; read and written with the GIL held

// The fast path of import_tensor: the producer's C exchange table fills a non-owning view, with
// no Python call (torch's __dlpack__ costs 2-4 µs per tensor on the CPU, more with a CUDA
// stream). Taken only where it means the same as __dlpack__(stream): on the CPU, and on CUDA when
// `stream` is the producer's current stream (then __dlpack__ would not synchronise either).
// Returns false, with no Python error pending, where the caller must take __dlpack__. (Unlike
// torch's __dlpack__, the table also views tensors that require grad; the wrappers detach.)
bool view_without_export(py::handle obj, int64_t stream, dlpack::Tensor* out) {
  if (!use_exchange) return false;
  const dlpack::ExchangeApi* api = exchange_api(obj);
  if (api == nullptr) return false;
  if (api->dltensor_from_py_object_no_sync(obj.ptr(), out) != 0) {
    PyErr_Clear();  // __dlpack__ raises its own error, which names what is wrong
    return false;
  }
  if (out->device.device_type == dlpack::kDLCUDA ||
      out->device.device_type == dlpack::kDLCUDAManaged) {
    void* current = nullptr;
    if (api->current_work_stream(out->device.device_type, out->device.device_id, &current) != 0) {
      PyErr_Clear();
      return false;
    }
    return reinterpret_cast<int64_t>(current) == stream;
  }
  return true;
}

}  // namespace

bool set_dlpack_exchange(bool enabled) {
  const bool previous = use_exchange;
  use_exchange = enabled;
  return previous;
}

TensorArg import_tensor(py::handle obj, ArgName name, int64_t stream) {
  TensorArg t{name};
  dlpack::Tensor view{};
  const dlpack::Tensor* dl = nullptr;
  if (!obj.is_none() && view_without_export(obj, stream, &view)) {
    t.owner = py::reinterpret_borrow<py::object>(obj);
    dl = &view;
  } else {
    if (obj.is_none() || !py::hasattr(obj, "__dlpack__") ||
        !py::hasattr(obj, "__dlpack_device__")) {
      throw_type_error(name.prefix() + ": expected a tensor (an object with __dlpack__), got " +
                       type_name(obj));
    }
    int32_t dev_type = 0;
    try {
      py::tuple dev = obj.attr("__dlpack_device__")();
      dev_type = dev[0].cast<int32_t>();
    } catch (py::error_already_set& e) {
      throw_type_error(name.prefix() + ": __dlpack_device__ failed: " + e.what());
    }
    // DLPack reserves stream 0 for "no stream"; the legacy default stream is 1.
    py::object stream_arg = py::none();
    if (dev_type == dlpack::kDLCUDA || dev_type == dlpack::kDLCUDAManaged) {
      stream_arg = py::int_(stream == 0 ? 1 : stream);
    }
    t.owner = export_capsule(obj, name, stream_arg);
    PyObject* cap = t.owner.ptr();
    if (PyCapsule_IsValid(cap, dlpack::kVersionedCapsule)) {
      auto* m = static_cast<dlpack::ManagedTensorVersioned*>(
          PyCapsule_GetPointer(cap, dlpack::kVersionedCapsule));
      if (m->version.major != dlpack::kMajorVersion) {
        // Unknown layout: only the deleter may be touched, which the capsule's destructor does.
        throw_type_error(name.prefix() + ": DLPack major version " +
                         std::to_string(m->version.major) + " is not supported (expected 1)");
      }
      dl = &m->dl_tensor;
      t.read_only = (m->flags & dlpack::kFlagReadOnly) != 0;
    } else if (PyCapsule_IsValid(cap, dlpack::kLegacyCapsule)) {
      dl = &static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, dlpack::kLegacyCapsule))
                ->dl_tensor;
    } else {
      throw_type_error(name.prefix() + ": __dlpack__ did not return a DLPack capsule");
    }
  }

  if (!to_dtype(dl->dtype, &t.dtype)) {
    throw_type_error(name.prefix() + ": dtype " + dl_dtype_name(dl->dtype) +
                     " is not supported (expected float32, bfloat16, float16 or float64)");
  }
  switch (dl->device.device_type) {
    case dlpack::kDLCPU:
    case dlpack::kDLCUDAHost:
      t.device = DeviceKind::kCPU;
      break;
    case dlpack::kDLCUDA:
    case dlpack::kDLCUDAManaged:
      t.device = DeviceKind::kCUDA;
      t.device_id = dl->device.device_id;
      break;
    default:
      throw_type_error(name.prefix() + ": DLPack device type " +
                       std::to_string(dl->device.device_type) +
                       " is not supported (expected a CPU or CUDA tensor)");
  }
  t.shape.assign(dl->shape, dl->shape + dl->ndim);
  if (dl->strides != nullptr) {
    t.strides.assign(dl->strides, dl->strides + dl->ndim);
  } else {
    t.strides.resize(dl->ndim);
    int64_t s = 1;
    for (int d = dl->ndim; d-- > 0;) {
      t.strides[d] = s;
      s *= dl->shape[d];
    }
  }
  t.data = static_cast<char*>(dl->data) + dl->byte_offset;
  return t;
}

void check_contiguous(const TensorArg& t) {
  if (!t.is_contiguous()) {
    std::ostringstream os;
    os << t.name.prefix() << ": must be contiguous (shape " << t.shape_str() << ", strides [";
    for (size_t d = 0; d < t.strides.size(); ++d) os << (d ? ", " : "") << t.strides[d];
    os << "]); call .contiguous() first";
    throw_value_error(os.str());
  }
}

void check_writable(const TensorArg& t) {
  if (t.read_only) throw_value_error(t.name.prefix() + ": is read-only");
}

void check_same_shape(const TensorArg& t, const TensorArg& ref) {
  if (t.shape != ref.shape) {
    throw_value_error(t.name.prefix() + ": shape " + t.shape_str() + " does not match '" +
                      ref.name.arg + "' " + ref.shape_str());
  }
}

void check_same_device(const TensorArg& t, const TensorArg& ref) {
  if (t.device != ref.device || t.device_id != ref.device_id) {
    throw_type_error(t.name.prefix() + ": is on " + t.device_str() + " but '" + ref.name.arg +
                     "' is on " + ref.device_str());
  }
}

void check_dtype_in(const TensorArg& t, const DType* begin, const DType* end,
                    const std::string& device) {
  std::string supported;
  for (const DType* d = begin; d != end; ++d) {
    if (*d == t.dtype) return;
    supported += (supported.empty() ? "" : ", ") + std::string(dtype_name(*d));
  }
  throw_type_error(t.name.prefix() + ": dtype " + dtype_name(t.dtype) + " has no " + device +
                   " kernel (supported: " + supported + ")");
}

namespace {

// True when a and b share a byte of memory on one device (empty tensors share none).
bool shares_bytes(const TensorArg& a, const TensorArg& b) {
  const auto* pa = static_cast<const char*>(a.data);
  const auto* pb = static_cast<const char*>(b.data);
  const int64_t na = a.nbytes(), nb = b.nbytes();
  if (na == 0 || nb == 0 || a.device != b.device) return false;
  return pa < pb + nb && pb < pa + na;
}

}  // namespace

void check_no_partial_overlap(const TensorArg& out, const std::vector<TensorArg>& inputs) {
  for (const TensorArg& in : inputs) {
    const bool identical =
        out.data == in.data && out.nbytes() == in.nbytes() && out.dtype == in.dtype;
    if (shares_bytes(out, in) && !identical) {
      throw_value_error(out.name.prefix() + ": overlaps '" + in.name.arg +
                        "' partially; it may be exactly one of the inputs or separate memory");
    }
  }
}

void check_no_overlap(const TensorArg& scratch, const std::vector<TensorArg>& others) {
  for (const TensorArg& t : others) {
    if (shares_bytes(scratch, t)) {
      throw_value_error(scratch.name.prefix() + ": overlaps '" + t.name.arg +
                        "'; a workspace must be memory of its own");
    }
  }
}

std::vector<float> import_floats(py::handle obj, ArgName name, size_t expected, bool allow_inf) {
  if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj)) {
    throw_type_error(name.prefix() + ": expected a sequence of floats, got " + type_name(obj));
  }
  auto seq = py::reinterpret_borrow<py::sequence>(obj);
  if (seq.size() != expected) {
    throw_value_error(name.prefix() + ": has " + std::to_string(seq.size()) +
                      " entries but there are " + std::to_string(expected) + " tensors");
  }
  std::vector<float> w(expected);
  for (size_t i = 0; i < expected; ++i) {
    py::handle item = seq[i];
    if (!py::isinstance<py::float_>(item) && !py::isinstance<py::int_>(item)) {
      throw_type_error(name.prefix() + "[" + std::to_string(i) + "]: expected a float, got " +
                       type_name(item));
    }
    w[i] = static_cast<float>(item.cast<double>());
    if (std::isnan(w[i]) || (!allow_inf && !std::isfinite(w[i]))) {
      throw_value_error(name.prefix() + "[" + std::to_string(i) +
                        "]: must be finite in float32, got " + py::str(item).cast<std::string>());
    }
  }
  return w;
}

void check_fixed(const TensorArg& t, const TensorArg& ref, const std::vector<int64_t>& shape,
                 DType dtype, bool writable) {
  check_same_device(t, ref);
  check_contiguous(t);
  if (writable) check_writable(t);
  if (t.shape != shape) {
    std::string want = "[";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    throw_value_error(t.name.prefix() + ": shape " + t.shape_str() + ", expected " + want + "]");
  }
  if (t.dtype != dtype) {
    throw_type_error(t.name.prefix() + ": dtype " + dtype_name(t.dtype) + ", expected " +
                     dtype_name(dtype));
  }
}

py::dict float_dtype_table(bool cpu_float64) {
  py::list cpu, cuda;
  for (DType t : kFloatDtypes) {
    cpu.append(dtype_name(t));
    cuda.append(dtype_name(t));
  }
  if (cpu_float64) cpu.append(dtype_name(DType::kFloat64));
  py::dict d;
  d["cpu"] = cpu;
  if (has_cuda()) d["cuda"] = cuda;
  return d;
}

}  // namespace meldkit::bind

// vit_fast._C: the outputs of one bound launch allocated in one call (kernels/alloc.py).
//
//   empties(like, specs) -> tuple
//       tuple(None if s is None else like.new_empty(s[0], dtype=s[1]) for s in specs): each a
//       new contiguous tensor on like's device. The Block's step allocates 30-odd outputs per
//       forward+backward; from Python each is a call whose argument parsing (a shape list, a
//       dtype keyword) costs more host time than the allocation behind it.
//
// A plain CPython function (METH_FASTCALL): the specs are tuples the bound launch made once.
#include "empties.h"

#include <ATen/ATen.h>
#include <c10/util/SmallVector.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

namespace vit_fast {
namespace {

// specs[i] as (shape, dtype); false with a TypeError set where it is not one.
bool read_spec(PyObject* spec, Py_ssize_t i, c10::SmallVector<int64_t, 4>& shape,
               at::ScalarType& dtype) {
  if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) != 2 ||
      !PyTuple_Check(PyTuple_GET_ITEM(spec, 0)) || !THPDtype_Check(PyTuple_GET_ITEM(spec, 1))) {
    PyErr_Format(PyExc_TypeError,
                 "empties(): specs[%zd] must be None or a (shape tuple, torch.dtype) pair", i);
    return false;
  }
  PyObject* dims = PyTuple_GET_ITEM(spec, 0);
  const Py_ssize_t n = PyTuple_GET_SIZE(dims);
  shape.resize(n);
  for (Py_ssize_t d = 0; d < n; ++d) {
    PyObject* size = PyTuple_GET_ITEM(dims, d);
    const long long v = PyLong_Check(size) ? PyLong_AsLongLong(size) : -1;
    if (v < 0) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError,
                   "empties(): specs[%zd] shape must hold non-negative ints, got %R", i, dims);
      return false;
    }
    shape[d] = v;
  }
  dtype = reinterpret_cast<THPDtype*>(PyTuple_GET_ITEM(spec, 1))->scalar_type;
  return true;
}

PyObject* empties(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "empties() takes 2 arguments (%zd given)", nargs);
    return nullptr;
  }
  if (!THPVariable_Check(args[0])) {
    PyErr_Format(PyExc_TypeError, "empties(): like must be a Tensor, not %s",
                 Py_TYPE(args[0])->tp_name);
    return nullptr;
  }
  if (!PyTuple_Check(args[1])) {
    PyErr_Format(PyExc_TypeError, "empties(): specs must be a tuple, not %s",
                 Py_TYPE(args[1])->tp_name);
    return nullptr;
  }
  const at::TensorOptions options = THPVariable_Unpack(args[0]).options();
  PyObject* specs = args[1];
  const Py_ssize_t n = PyTuple_GET_SIZE(specs);
  THPObjectPtr out(PyTuple_New(n));
  if (!out) {
    return nullptr;
  }
  c10::SmallVector<int64_t, 4> shape;
  at::ScalarType dtype;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* spec = PyTuple_GET_ITEM(specs, i);
    PyObject* item;
    if (spec == Py_None) {
      item = Py_None;
      Py_INCREF(item);
    } else {
      if (!read_spec(spec, i, shape, dtype)) {
        return nullptr;
      }
      item = THPVariable_Wrap(at::empty(shape, options.dtype(dtype)));
      if (!item) {
        return nullptr;
      }
    }
    PyTuple_SET_ITEM(out.get(), i, item);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef empties_methods[] = {
    {"empties", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&empties)),
     METH_FASTCALL, "tuple(like.new_empty(shape, dtype=dtype) or None per spec), in one call."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace vit_fast

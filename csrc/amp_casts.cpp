// vit_fast._C: the fused Block's AMP weight casts (vit_fast/amp_weights.py) in one call each,
// where Python pays a probe matmul per autocast region and a `.to()` call per weight.
//
//   autocast_cached_cast(t, dtype) -> Tensor
//       t as autocast itself casts it (at::autocast::cached_cast for t's device type): an fp32
//       leaf that requires grad is cast once per autocast region and the cast kept in
//       autocast's cache until the outermost region exits. Grad mode is on for the cast, as
//       torch's own fix for the no_grad case does (pytorch#158232): a cast cached without a
//       grad_fn would cut the gradient of any later op of the region that takes it.
//   casts(tensors, dtype) -> tuple
//       tuple(None if t is None else t if t.dtype == dtype else t.to(dtype) for t in tensors):
//       the same values (the same rounding), the same shapes and strides.
//
// Plain CPython functions (METH_FASTCALL): their argument handling is a few type checks.
#include "amp_casts.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <algorithm>
#include <vector>

namespace vit_fast {
namespace {

bool check_args(const char* name, PyObject* const* args, Py_ssize_t nargs, bool tuple_first) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", name, nargs);
    return false;
  }
  if (tuple_first ? !PyTuple_Check(args[0]) : !THPVariable_Check(args[0])) {
    PyErr_Format(PyExc_TypeError, "%s(): argument 1 must be %s, not %s", name,
                 tuple_first ? "a tuple" : "a Tensor", Py_TYPE(args[0])->tp_name);
    return false;
  }
  if (!THPDtype_Check(args[1])) {
    PyErr_Format(PyExc_TypeError, "%s(): dtype must be a torch.dtype, not %s", name,
                 Py_TYPE(args[1])->tp_name);
    return false;
  }
  return true;
}

PyObject* autocast_cached_cast(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("autocast_cached_cast", args, nargs, false)) {
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(args[0]);
  const auto dtype = reinterpret_cast<THPDtype*>(args[1])->scalar_type;
  at::Tensor cast;
  {
    c10::AutoGradMode grad(true);
    cast = at::autocast::cached_cast(dtype, t, t.device().type());
  }
  return THPVariable_Wrap(std::move(cast));
  END_HANDLE_TH_ERRORS
}

PyObject* casts(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (!check_args("casts", args, nargs, true)) {
    return nullptr;
  }
  PyObject* tensors = args[0];
  const auto dtype = reinterpret_cast<THPDtype*>(args[1])->scalar_type;
  const Py_ssize_t n = PyTuple_GET_SIZE(tensors);
  for (Py_ssize_t i = 0; i < n; ++i) {  // all checked before any cast is made
    PyObject* item = PyTuple_GET_ITEM(tensors, i);
    if (item != Py_None && !THPVariable_Check(item)) {
      PyErr_Format(PyExc_TypeError, "casts(): tensors[%zd] must be a Tensor or None, not %s", i,
                   Py_TYPE(item)->tp_name);
      return nullptr;
    }
  }
  // Each cast's storage allocated apart, all filled by one _foreach_copy_: one launch on a GPU
  // (multi_tensor_apply) where a .to() per tensor is one each, and one dispatch here. With
  // grad mode on and a tensor that requires grad, each is a .to() (its ToCopyBackward).
  std::vector<at::Tensor> sources, targets;
  std::vector<Py_ssize_t> where;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyTuple_GET_ITEM(tensors, i);
    if (item == Py_None) {
      continue;
    }
    const at::Tensor& t = THPVariable_Unpack(item);
    if (t.scalar_type() != dtype) {
      sources.push_back(t);
      where.push_back(i);
    }
  }
  const bool per_tensor = c10::GradMode::is_enabled() &&
                          std::any_of(sources.begin(), sources.end(),
                                      [](const at::Tensor& t) { return t.requires_grad(); });
  targets.reserve(sources.size());
  for (const auto& t : sources) {
    targets.push_back(per_tensor ? t.to(dtype) : at::empty_like(t, t.options().dtype(dtype)));
  }
  if (!per_tensor && !targets.empty()) {
    at::_foreach_copy_(targets, sources);
  }
  THPObjectPtr out(PyTuple_New(n));
  if (!out) {
    return nullptr;
  }
  size_t next = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* cast;
    if (next < where.size() && where[next] == i) {
      cast = THPVariable_Wrap(std::move(targets[next++]));
      if (!cast) {
        return nullptr;
      }
    } else {
      cast = PyTuple_GET_ITEM(tensors, i);
      Py_INCREF(cast);
    }
    PyTuple_SET_ITEM(out.get(), i, cast);
  }
  return out.release();
  END_HANDLE_TH_ERRORS
}

}  // namespace

PyMethodDef amp_cast_methods[] = {
    {"autocast_cached_cast",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&autocast_cached_cast)), METH_FASTCALL, "t as autocast casts it, through autocast's weight cache (grad mode on)."},
    {"casts", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(&casts)), METH_FASTCALL,
     "tuple(t.to(dtype)) for a tuple of tensors and Nones, in one call."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace vit_fast

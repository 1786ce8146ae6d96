// Registration hooks of the pybind11 module sambay._core, one per bound class.
#pragma once

#include <pybind11/pybind11.h>

namespace sambay::py_bind {

void register_errors(pybind11::module_ & m);
void register_model(pybind11::module_ & m);
void register_context(pybind11::module_ & m);

} // namespace sambay::py_bind

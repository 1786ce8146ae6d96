// One registration function per bound part of the engine; module.cpp calls them all.
#pragma once

#include <pybind11/pybind11.h>

namespace sambay::py_bindings {

void register_logging(pybind11::module_ & m);
void register_errors(pybind11::module_ & m);
void register_model(pybind11::module_ & m);
void register_context(pybind11::module_ & m);
void register_quantize(pybind11::module_ & m);
void register_sampling(pybind11::module_ & m);

} // namespace sambay::py_bindings

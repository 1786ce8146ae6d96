// C++ exception types -> Python exception types, by type.
#include "bindings.h"

#include "errors.h"

namespace py = pybind11;

namespace sambay::py_bindings {

void register_errors(py::module_ & m) {
    py::register_exception<load_error>(m, "LoadError", PyExc_ValueError);
    py::register_exception<state_error>(m, "StateError", PyExc_ValueError);
    py::register_exception<aborted_error>(m, "AbortedError", PyExc_RuntimeError);
    py::register_exception<compute_error>(m, "ComputeError", PyExc_RuntimeError);
    // ContextFullError carries n_requested and n_ctx as attributes; a ValueError as in
    // llama-cpp-python, and still the RuntimeError it always was
    static py::exception<context_full_error> ctx_full(
        m, "ContextFullError",
        py::make_tuple(py::handle(PyExc_ValueError), py::handle(PyExc_RuntimeError)));
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const context_full_error & e) {
            py::object type = py::reinterpret_borrow<py::object>(ctx_full.ptr());
            py::object inst = type(e.what());
            inst.attr("n_requested") = e.n_requested;
            inst.attr("n_ctx") = e.n_ctx;
            inst.attr("seq_id") = e.seq_id;
            PyErr_SetObject(ctx_full.ptr(), inst.ptr());
        }
    });
}

} // namespace sambay::py_bindings

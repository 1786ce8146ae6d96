#include "bindings.h"

#include <pybind11/numpy.h>

#include "top-k.h"

namespace py = pybind11;

namespace sambay::py_bindings {

void register_sampling(py::module_ & m) {
    m.def("top_k_indices",
        [](py::array_t<float, py::array::c_style | py::array::forcecast> values, int64_t k) {
            if (values.ndim() != 1) {
                throw py::value_error("top_k_indices expects a 1-D array");
            }
            std::vector<int32_t> idx;
            {
                py::gil_scoped_release nogil;
                idx = top_k_indices(values.data(), values.shape(0), k);
            }
            return py::array_t<int32_t>((py::ssize_t) idx.size(), idx.data());
        },
        py::arg("values"), py::arg("k"),
        "indices of the k largest values, largest first (ties: lower index first)");
}

} // namespace sambay::py_bindings

// The Python module fastoptim._C: importing it loads the library, which registers every op with the dispatcher.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastoptim's native ops; use them through torch.ops.fastoptim or fastoptim.ops";
#ifdef FASTOPTIM_WITH_CUDA
  m.attr("cuda_kernels_built") = true;
#else
  m.attr("cuda_kernels_built") = false;
#endif
}

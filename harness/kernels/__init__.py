"""What a quantization state becomes on a GPU: deployed weight layouts and the kernels that use them.

``packing`` (int4 / int8 storage of the codes), ``triton_matmul`` (our Triton matmuls),
``gemlite_adapter`` (gemlite's kernels fed with our codes), ``fused`` (activation quantizers fused
into the op producing the input), ``online`` (a state's online input transforms, eager),
``hadamard`` (the online Hadamard fused with the quantizer after it), ``real`` (``RealLinear``: one
layer in deployed form, its kernel candidates) and ``select`` (choosing a layout and a kernel per
shape and phase by correctness and time).

Below the benchmark (``harness.perf``): nothing here imports it, the runner, the CLI or reporting.
"""

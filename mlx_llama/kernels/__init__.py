"""Our compute under MLX on the CPU: the C++ extension (quantized matmul, fused ops), and OpenBLAS for MLX's own matmuls."""

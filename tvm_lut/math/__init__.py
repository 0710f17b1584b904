"""The numerics, in numpy: product quantization (codebooks, encode, tables), the encoder distances, the cost
model, butterfly factor chains, low rank, channel energy. Nothing here imports TVM's graph or kernels."""

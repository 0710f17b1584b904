"""The torch side: learned centroids (LUT-NN / PECAN, ``lutnn``), trainable butterfly and low-rank layers
(``structured_nn``), the small models and the data loaders the tutorials, tests and benchmarks train."""

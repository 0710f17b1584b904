"""The application on top of the passes: compile-and-measure (``pipeline``), per-layer profiling, reports,
the baselines users compare against, the ``tvm-lut`` command line and the demo."""

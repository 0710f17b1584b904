"""Building and running Relax modules on this host: compile and batch runs (``build``), calibration data
checks and layer-input capture (``calibrate``), and the saved artifact a deployment loads (``artifact``)."""

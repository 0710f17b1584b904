"""Reading models: ONNX, PyTorch and exported programs into Relax (``importer``), the layers a rewrite can
touch (``graph``), and the quieting of TVM's native prints while importing (``native_log``)."""

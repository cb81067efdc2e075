"""Export of trained VAEs: ONNX (`export.onnx`), AOTInductor (`export.aoti`) and TensorRT
engines built from the ONNX graphs (`export.tensorrt`). Each exporter checks parity against
the PyTorch model and records the artifact in `<export_dir>/manifest.json` (`export.manifest`).
"""

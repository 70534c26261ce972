"""Builtin export formats (``clipkit export --format``): ``onnx`` and ``hf``, registered through the same
hook as a third party's. The exporters are in :mod:`clipkit.exporters`. No torch here."""
from ...hookspecs import Register, hookimpl


@hookimpl
def register_exporters(register: Register) -> None:
    register("onnx", "clipkit.exporters.onnx:OnnxExporter")
    register("hf", "clipkit.exporters.hf:HFExporter")

"""Runtimes that caption images from an exported model without torch or transformers.

``vlmkit.runtime.onnx.OnnxCaptioner`` runs a folder written by ``vlmkit export --format onnx``
with ONNX Runtime, numpy, Pillow and tokenizers only. Nothing here is imported by ``vlmkit``
itself: import the runtime you need.
"""

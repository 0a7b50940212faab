"""Exports of models and adapters to other runtimes (Core ML, adapter formats).

Their heavy dependencies (coremltools) are optional: install `ondevice-lora[coreml]`.
"""

"""peftcore's own plugins, declared through the same entry-point groups third parties use.

This file is pure data: ``setup.py`` reads it (without importing peftcore) to write the
package's entry points, and the registry falls back to it when peftcore runs from a source
tree that was never installed (no packaging metadata to read).
"""

ENTRY_POINTS = {
    "peftcore.methods": [
        "lora = peftcore.tuners.lora.method:LoraMethod",
        "adapter = peftcore.tuners.adapter.method:AdapterMethod",
        "prefix = peftcore.tuners.prefix.method:PrefixMethod",
        "prompt = peftcore.tuners.prompt.method:PromptMethod",
    ],
    "peftcore.layers": [
        "lora.linear = peftcore.tuners.lora.layers:LINEAR",
        "lora.hf_conv1d = peftcore.tuners.lora.layers:HF_CONV1D",
        "lora.embedding = peftcore.tuners.lora.layers:EMBEDDING",
        "lora.conv1d = peftcore.tuners.lora.layers:CONV1D",
        "lora.conv2d = peftcore.tuners.lora.layers:CONV2D",
        "lora.conv3d = peftcore.tuners.lora.layers:CONV3D",
    ],
    "peftcore.kernels": [
        "lora_linear.reference = peftcore.ops.lora:REFERENCE",
        "lora_linear.cpp = peftcore.ops.lora_cpp:CPP",
        "lora_linear.triton = peftcore.ops.lora_triton:TRITON",
        "lora_linear.cuda = peftcore.ops.lora_cuda:CUDA",
        "lora_grouped.reference = peftcore.ops.lora_grouped:REFERENCE",
        "lora_grouped.cpp = peftcore.ops.lora_grouped_cpp:CPP",
        "lora_grouped.triton = peftcore.ops.lora_grouped_triton:TRITON",
        "lora_grouped.cuda = peftcore.ops.lora_grouped_cuda:CUDA",
        "bottleneck.reference = peftcore.ops.bottleneck:REFERENCE",
        "bottleneck.cpp = peftcore.ops.bottleneck_cpp:CPP",
        "bottleneck.triton = peftcore.ops.bottleneck_triton:TRITON",
    ],
}

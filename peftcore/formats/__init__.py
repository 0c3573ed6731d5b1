"""On-disk adapter formats other than peftcore's own: converters to and from the native form.

:mod:`peftcore.formats.peft` reads and writes HF PEFT's format (``adapter_config.json`` with a
``peft_type``), one converter module per PEFT method family. ``peftcore.save``/``peftcore.load``
(:mod:`peftcore.persistence`) use them; the model-side code never sees which format a file had.
"""

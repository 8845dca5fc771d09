"""An example third-party vlmkit plugin: a Mistral decoder and a CSV caption dataset.

Installing this package is all a user does; vlmkit finds it through the entry point in
``pyproject.toml`` (group ``vlmkit``, pointing at ``vlmkit_plugin_example.plugin``)::

    pip install vlmkit-plugin-example
    vlmkit plugins list                 # mistral (decoder), captions-csv (dataset)
    vlmkit train --decoder mistral --dataset captions-csv:path=captions.csv ...

Modules, in the order to read them:

- ``plugin``        the hook implementations: what this package registers
- ``mistral``       ``MistralDecoder``, a decoder spec (the short path: subclass
                    ``vlmkit.TransformersDecoderSpec`` and declare data)
- ``captions_csv``  ``CaptionsCsvDataset``, a dataset spec written from scratch
- ``testing``       ``tiny_mistral_checkpoint``, a tiny random Mistral for tests

None of them imports torch or transformers at import time: ``vlmkit plugins list`` imports
every plugin and must stay fast.
"""

__version__ = "0.1.0"

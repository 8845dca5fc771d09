"""The module the ``vlmkit`` entry point names: one ``@vlmkit.hookimpl`` per kind of spec.

Each hook is handed a ``register`` callback; call it once per spec *instance*. vlmkit checks
the spec (right base class, exact lowercase ``name``) and records which package provided it.
Keep this module cheap to import: ``vlmkit plugins list`` imports it.
"""

import vlmkit

from vlmkit_plugin_example.captions_csv import CaptionsCsvDataset
from vlmkit_plugin_example.mistral import MistralDecoder


@vlmkit.hookimpl
def register_decoders(register):
    register(MistralDecoder())


@vlmkit.hookimpl
def register_datasets(register):
    register(CaptionsCsvDataset())

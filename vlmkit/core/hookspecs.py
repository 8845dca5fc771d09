"""The vlmkit plugin hooks. Start here if you are writing a plugin.

A plugin is a module (or any object) with one or more of the functions below, decorated with
``vlmkit.hookimpl``. Publish it with an entry point in your package's ``pyproject.toml``::

    [project.entry-points.vlmkit]
    my-plugin = "my_package.plugin"

Each hook receives a ``register`` callback; call it once per spec you provide::

    import vlmkit

    @vlmkit.hookimpl
    def register_decoders(register):
        register(MyDecoder())          # a vlmkit.DecoderSpec subclass instance

Names are exact and lowercase; two plugins registering one name is an error naming both. What a
spec must declare is in ``vlmkit/core/contracts.py``; the full guide is ``docs/plugins.md``.
Built-in plugins use exactly these hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("vlmkit")
hookimpl = pluggy.HookimplMarker("vlmkit")


@hookspec
def register_encoders(register):
    """Register vision encoders: ``register(spec)`` with a ``vlmkit.EncoderSpec`` instance."""


@hookspec
def register_decoders(register):
    """Register language-model decoders: ``register(spec)`` with a ``vlmkit.DecoderSpec`` instance."""


@hookspec
def register_datasets(register):
    """Register caption datasets: ``register(spec)`` with a ``vlmkit.DatasetSpec`` instance."""

"""The plugin registry: exact-name lookup, clashes, broken plugins, entry-point filters.

Plugins here are real plugin objects (modules with ``@vlmkit.hookimpl`` functions) registered
in-process, or fake installed distributions found through ``importlib.metadata`` entry points.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import pytest

import vlmkit
from vlmkit.core.errors import PluginError
from vlmkit.core.registry import PluginWarning, Registry, get_registry, reset_registry

# ------------------------------------------------------------------------ in-process plugins


class Decoder(vlmkit.DecoderSpec):
    """A decoder spec with nothing to load: the registry only reads what a spec declares."""

    name = "qwen2"
    default_checkpoint = "Qwen/Qwen2.5-0.5B-Instruct"
    model_types = ("qwen2",)
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")

    def load(self, checkpoint=None, *, revision=None, dtype=None):
        raise NotImplementedError

    def format(self, tokenizer, prompt, caption, style="auto"):
        raise NotImplementedError

    def stop_token_ids(self, tokenizer, style="auto"):
        raise NotImplementedError

    def resolve_lora_targets(self, model):
        raise NotImplementedError


class SmolLM(Decoder):
    name = "smollm"


class Siglip(vlmkit.EncoderSpec):
    name = "siglip"

    def load(self, checkpoint=None, *, revision=None):
        raise NotImplementedError


class Shapes(vlmkit.DatasetSpec):
    name = "shapes"

    def load(self, split, options=None, *, seed=0):
        raise NotImplementedError


def plugin(name: str, **hooks) -> ModuleType:
    """A plugin module built in-process: each keyword is a hook function, marked ``@hookimpl``."""
    module = ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, vlmkit.hookimpl(function))
    return module


def registering(*specs):
    """A hook function that registers ``specs``."""

    def hook(register):
        for spec in specs:
            register(spec)

    return hook


@pytest.fixture
def registry() -> Registry:
    """qwen2 and smollm decoders, a siglip encoder and a shapes dataset, from one plugin."""
    registry = Registry()
    registry.add_plugin(
        plugin(
            "acme_builtin",
            register_decoders=registering(Decoder(), SmolLM()),
            register_encoders=registering(Siglip()),
            register_datasets=registering(Shapes()),
        )
    )
    return registry


# ------------------------------------------------------------------------ lookup


def test_lookup_is_by_exact_name_per_kind(registry):
    assert isinstance(registry.decoder("qwen2"), Decoder)
    assert isinstance(registry.decoder("smollm"), SmolLM)
    assert isinstance(registry.encoder("siglip"), Siglip)
    assert isinstance(registry.dataset("shapes"), Shapes)
    assert registry.names("decoder") == ["qwen2", "smollm"]
    assert registry.names("encoder") == ["siglip"]
    assert registry.get("decoder", "qwen2") is registry.decoder("qwen2")


def test_unknown_name_lists_available_names_and_a_close_match(registry):
    with pytest.raises(PluginError) as info:
        registry.decoder("qwen")
    message = str(info.value)
    assert "\n" not in message
    assert "unknown decoder 'qwen'; did you mean 'qwen2'?" in message
    assert "Available decoders: qwen2, smollm." in message


def test_unknown_name_without_close_match_offers_no_guess(registry):
    with pytest.raises(
        PluginError, match=r"unknown decoder 'llama'\. Available decoders: qwen2, smollm\."
    ) as info:
        registry.decoder("llama")
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "name", ["qwen", "Qwen2", "QWEN2", "qwen2.5", "qwen2-instruct", "Qwen/Qwen2.5-0.5B-Instruct", " qwen2"]
)
def test_no_substring_or_case_insensitive_matching(registry, name):
    with pytest.raises(PluginError, match="unknown decoder"):
        registry.decoder(name)


def test_names_do_not_cross_kinds(registry):
    with pytest.raises(PluginError, match="unknown encoder 'qwen2'.*Available encoders: siglip"):
        registry.encoder("qwen2")


def test_unknown_kind_is_a_programming_error(registry):
    with pytest.raises(ValueError, match="kind must be one of"):
        registry.get("model", "qwen2")


# ------------------------------------------------------------------------ clashes


def test_two_plugins_registering_one_name_fail_on_lookup_naming_both(registry):
    registry.add_plugin(plugin("other_vlm", register_decoders=registering(Decoder())))

    with pytest.raises(PluginError) as info:
        registry.decoder("qwen2")
    message = str(info.value)
    assert "\n" not in message
    assert "decoder name 'qwen2' is registered by both acme_builtin" in message
    assert "and other_vlm" in message
    assert "VLMKIT_DISABLE_PLUGINS" in message
    # every other name still works, and the clashing name is still listed (with both providers)
    assert isinstance(registry.decoder("smollm"), SmolLM)
    assert registry.names("decoder") == ["qwen2", "smollm"]
    assert [r.provider.package for r in registry.all() if r.name == "qwen2"] == ["acme_builtin", "other_vlm"]
    assert registry.broken == []


def test_one_name_in_two_kinds_is_not_a_clash():
    class QwenDataset(Shapes):
        name = "qwen2"

    registry = Registry()
    registry.add_plugin(plugin("a", register_decoders=registering(Decoder())))
    registry.add_plugin(plugin("b", register_datasets=registering(QwenDataset())))
    assert isinstance(registry.decoder("qwen2"), Decoder)
    assert isinstance(registry.dataset("qwen2"), QwenDataset)


def test_clash_between_installed_packages_names_both_packages(fake_site):
    fake_site.add_dist("acme-vlm-plugin", {"acme": fake_site.specs(decoders=["qwen2", "acme-lm"])})
    fake_site.add_dist("other-vlm-plugin", {"other": fake_site.specs(decoders=["qwen2"])}, version="2.3")
    registry = Registry()
    registry.load_entry_points({"VLMKIT_PLUGINS": "acme,other"})

    with pytest.raises(PluginError) as info:
        registry.decoder("qwen2")
    # the entry-point name is what VLMKIT_DISABLE_PLUGINS takes: the message gives it, ready to use
    assert str(info.value) == (
        "decoder name 'qwen2' is registered by both acme-vlm-plugin (entry point 'acme', module "
        "acme_vlm_plugin.acme) and other-vlm-plugin (entry point 'other', module other_vlm_plugin.other); "
        "uninstall one, or exclude one with VLMKIT_DISABLE_PLUGINS=acme or VLMKIT_DISABLE_PLUGINS=other"
    )
    assert registry.decoder("acme-lm").name == "acme-lm"
    excluded = Registry()
    excluded.load_entry_points({"VLMKIT_PLUGINS": "acme,other", "VLMKIT_DISABLE_PLUGINS": "other"})
    assert excluded.registration("decoder", "qwen2").provider.package == "acme-vlm-plugin"


def test_same_entry_point_name_in_two_packages_is_a_clash_not_a_silent_skip(fake_site):
    # Both packages call their entry point "vlm": neither may hide the other.
    fake_site.add_dist("acme-vlm-plugin", {"vlm": fake_site.specs(decoders=["qwen2"])})
    fake_site.add_dist("other-vlm-plugin", {"vlm": fake_site.specs(decoders=["qwen2"])})
    registry = Registry()
    registry.load_entry_points({"VLMKIT_PLUGINS": "vlm"})
    # one entry-point name for both: the message offers the package:name form, which picks one
    with pytest.raises(PluginError, match="acme-vlm-plugin .* and other-vlm-plugin .*") as info:
        registry.decoder("qwen2")
    assert str(info.value).endswith(
        "VLMKIT_DISABLE_PLUGINS=acme-vlm-plugin:vlm or VLMKIT_DISABLE_PLUGINS=other-vlm-plugin:vlm"
    )

    # ``package:entry-point`` picks one of the two
    registry = Registry()
    registry.load_entry_points({"VLMKIT_PLUGINS": "vlm", "VLMKIT_DISABLE_PLUGINS": "other-vlm-plugin:vlm"})
    assert registry.registration("decoder", "qwen2").provider.package == "acme-vlm-plugin"


# ------------------------------------------------------------------------ broken plugins


def _raise(exc):
    def hook(register):
        raise exc

    return hook


def test_plugin_raising_in_its_hook_is_recorded_and_others_keep_working(registry):
    with pytest.warns(PluginWarning) as record:
        registry.add_plugin(plugin("flaky", register_decoders=_raise(OSError("weights folder\nnot found"))))

    assert len(record) == 1
    (broken,) = registry.broken
    assert broken.provider.plugin == "flaky"
    assert broken.error == "register_decoders failed: OSError: weights folder not found"  # one line
    assert isinstance(registry.decoder("qwen2"), Decoder)
    with pytest.raises(PluginError, match=r"\(broken plugins not loaded: flaky\)"):
        registry.decoder("flaky-lm")


def test_installed_plugins_that_fail_to_import_or_register_are_recorded_with_one_warning(fake_site):
    fake_site.add_dist(
        "acme-vlm-plugin",
        {
            "acme": fake_site.specs(decoders=["acme-lm"], encoders=["acme-vit"]),
            "acme-gpu": "raise RuntimeError('acme-gpu needs CUDA')\n",
            "acme-missing": "import acme_private_sdk  # not installed\n",
            "acme-hook": """
                import vlmkit

                @vlmkit.hookimpl
                def register_datasets(register):
                    raise KeyError("ACME_DATA_DIR")
            """,
        },
    )
    registry = Registry()
    with pytest.warns(PluginWarning) as record:
        registry.load_entry_points({})

    assert len(record) == 1  # one warning for the whole load, however many plugins broke
    warning = str(record[0].message)
    assert "\n" not in warning
    assert "acme-gpu from acme-vlm-plugin" in warning and "acme-missing" in warning and "acme-hook" in warning
    errors = {b.provider.plugin: b.error for b in registry.broken if b.provider.package == "acme-vlm-plugin"}
    plugin_file = fake_site.path / "acme_vlm_plugin"
    assert errors == {  # an import failure names the file and line that failed
        "acme-gpu": f"import failed at {plugin_file / 'acme_gpu.py'}:1: RuntimeError: acme-gpu needs CUDA",
        "acme-missing": f"import failed at {plugin_file / 'acme_missing.py'}:1: ModuleNotFoundError: "
        "No module named 'acme_private_sdk'",
        "acme-hook": "register_datasets failed: KeyError: 'ACME_DATA_DIR'",
    }
    # the full tracebacks travel with the warning, for vlmkit --debug
    tracebacks = record[0].message.tracebacks
    assert len(tracebacks) == 3 and all(t.startswith("Traceback (most recent call last)") for t in tracebacks)
    assert any("acme_private_sdk" in t and "acme_missing.py" in t for t in tracebacks)
    assert registry.decoder("acme-lm").name == "acme-lm"
    assert registry.encoder("acme-vit").name == "acme-vit"


def test_import_failure_in_a_module_the_plugin_imports_names_that_file_and_line(fake_site):
    fake_site.add_dist(
        "acme-vlm-plugin",
        {
            "acme": "import acme_vlm_plugin.helpers\n",
            "helpers": "X = 1\n\n\ndef broken(:\n    pass\n",  # a syntax error on line 4
        },
    )
    registry = Registry()
    with pytest.warns(PluginWarning):
        registry.load_entry_points({"VLMKIT_PLUGINS": "acme"})
    (broken,) = registry.broken
    helpers = fake_site.path / "acme_vlm_plugin" / "helpers.py"
    assert broken.error.startswith(f"import failed at {helpers}:4: SyntaxError: ")


class Unnamed(Shapes):
    name = None


class Uppercase(Decoder):
    name = "Qwen2"


class Spaced(Decoder):
    name = "my decoder"


class StringModelTypes(Decoder):
    model_types = "gemma2"  # noqa: UP034 - the trap: a string, which "in" would match by substring


class StringTargets(Decoder):
    lora_targets = "query_key_value"


class NumberTargetsPerModelType(Decoder):
    lora_targets = {"phi": ("q_proj", 3)}


class ClassAsLayerClass(Decoder):
    layer_class = Decoder


@pytest.mark.parametrize(
    ("hook_name", "spec", "error"),
    [
        ("register_decoders", Decoder, "register an instance, not the class: register(Decoder())"),
        ("register_decoders", Siglip(), "Siglip is not a DecoderSpec (registered as a decoder)"),
        ("register_encoders", Decoder(), "Decoder is not a EncoderSpec (registered as a encoder)"),
        ("register_datasets", {"name": "shapes"}, "dict is not a DatasetSpec"),
        (
            "register_decoders",
            Uppercase(),
            "Uppercase.name must be an exact lowercase name like 'my-decoder', got 'Qwen2'",
        ),
        ("register_decoders", Spaced(), "got 'my decoder'"),
        ("register_datasets", Unnamed(), "Unnamed.name must be an exact lowercase name"),
        (
            "register_decoders",
            StringModelTypes(),
            "StringModelTypes.model_types must be a tuple of names, got 'gemma2'",
        ),
        ("register_decoders", StringTargets(), "StringTargets.lora_targets must be a tuple of names"),
        ("register_decoders", NumberTargetsPerModelType(), "got {'phi': ('q_proj', 3)}"),
        ("register_decoders", ClassAsLayerClass(), "ClassAsLayerClass.layer_class must be a class name"),
    ],
    ids=[
        "class-not-instance",
        "encoder-as-decoder",
        "decoder-as-encoder",
        "not-a-spec",
        "uppercase",
        "space",
        "no-name",
        "model-types-a-string",
        "lora-targets-a-string",
        "lora-targets-per-model-type-not-names",
        "layer-class-not-a-name",
    ],
)
def test_invalid_spec_is_recorded_as_a_broken_plugin(registry, hook_name, spec, error):
    with pytest.warns(PluginWarning, match="acme_invalid"):
        registry.add_plugin(plugin("acme_invalid", **{hook_name: registering(spec)}))

    (broken,) = registry.broken
    assert broken.provider.plugin == "acme_invalid"
    assert broken.error.startswith(f"{hook_name} failed: PluginError: ")
    assert error in broken.error
    assert registry.names("decoder") == ["qwen2", "smollm"]  # nothing of the bad plugin registered


def test_misspelt_hook_is_reported_not_silently_ignored():
    registry = Registry()
    with pytest.warns(PluginWarning, match="unknown hook register_decoder;"):
        registry.add_plugin(plugin("typo", register_decoder=registering(Decoder())))
    assert (
        "vlmkit hooks are register_encoders, register_decoders, register_datasets" in registry.broken[0].error
    )


def test_hook_with_wrong_arguments_is_reported():
    def register_decoders(callback):  # the hook's argument must be called ``register``
        callback(Decoder())

    registry = Registry()
    with pytest.warns(PluginWarning):
        registry.add_plugin(plugin("wrong_args", register_decoders=register_decoders))
    assert registry.broken[0].error.startswith("invalid plugin: PluginValidationError:")
    assert registry.names("decoder") == []


# ------------------------------------------------------------------------ providers


def test_entry_point_plugin_reports_its_package_version_and_module(fake_site):
    fake_site.add_dist("acme-vlm-plugin", {"acme": fake_site.specs(decoders=["acme-lm"])}, version="1.0")
    registry = Registry()
    registry.load_entry_points({"VLMKIT_PLUGINS": "acme"})

    provider = registry.registration("decoder", "acme-lm").provider
    assert (provider.plugin, provider.package, provider.version, provider.module) == (
        "acme",
        "acme-vlm-plugin",
        "1.0",
        "acme_vlm_plugin.acme",
    )


def test_module_added_in_process_reports_the_package_that_installed_it(fake_site):
    fake_site.add_dist("acme-vlm-plugin", {"acme": fake_site.specs(encoders=["acme-vit"])}, version="0.4")
    import acme_vlm_plugin.acme

    registry = Registry()
    registry.add_plugin(acme_vlm_plugin.acme)
    provider = registry.registration("encoder", "acme-vit").provider
    assert (provider.plugin, provider.package, provider.version) == (
        "acme_vlm_plugin.acme",
        "acme-vlm-plugin",
        "0.4",
    )


# ------------------------------------------------------------------------ VLMKIT_PLUGINS / VLMKIT_DISABLE_PLUGINS


@pytest.fixture
def three_plugins(fake_site):
    fake_site.add_dist(
        "acme-vlm-plugin",
        {
            "acme": fake_site.specs(decoders=["acme-lm"]),
            "acme-vision": fake_site.specs(encoders=["acme-vit"]),
            "acme-data": fake_site.specs(datasets=["acme-captions"]),
        },
    )


def _loaded(registry: Registry) -> set[str]:
    return {r.provider.plugin for r in registry.all() if r.provider.package == "acme-vlm-plugin"}


@pytest.mark.parametrize(
    ("environ", "loaded"),
    [
        ({"VLMKIT_PLUGINS": "acme"}, {"acme"}),
        ({"VLMKIT_PLUGINS": " acme , acme-data,"}, {"acme", "acme-data"}),
        ({"VLMKIT_PLUGINS": "acme-vlm-plugin:acme-vision"}, {"acme-vision"}),
        ({"VLMKIT_PLUGINS": ""}, set()),
        ({"VLMKIT_PLUGINS": "acme,acme-vision", "VLMKIT_DISABLE_PLUGINS": "acme"}, {"acme-vision"}),
    ],
)
def test_allow_list_loads_only_the_named_entry_points(three_plugins, environ, loaded):
    registry = Registry()
    registry.load_entry_points(environ)
    assert _loaded(registry) == loaded
    assert all(r.provider.package == "acme-vlm-plugin" for r in registry.all())


@pytest.mark.parametrize(
    ("environ", "unmatched"),
    [
        ({"VLMKIT_PLUGINS": "acme,acme-vison"}, "VLMKIT_PLUGINS entry 'acme-vison'"),
        ({"VLMKIT_DISABLE_PLUGINS": "acme-dta"}, "VLMKIT_DISABLE_PLUGINS entry 'acme-dta'"),
        (
            {"VLMKIT_PLUGINS": "acme,nope", "VLMKIT_DISABLE_PLUGINS": "other-pkg:acme"},
            "VLMKIT_PLUGINS entry 'nope', VLMKIT_DISABLE_PLUGINS entry 'other-pkg:acme'",
        ),
    ],
)
def test_an_entry_that_matches_no_installed_plugin_is_one_warning(three_plugins, environ, unmatched):
    registry = Registry()
    with pytest.warns(PluginWarning) as record:
        registry.load_entry_points(environ)
    (warning,) = [str(w.message) for w in record if "matches no installed" in str(w.message)]
    assert warning.startswith(f"{unmatched} matches no installed vlmkit plugin (installed: ")
    assert "acme, acme-data, acme-vision" in warning and "\n" not in warning
    assert "acme" in _loaded(registry)  # the entries that match still apply


def test_entries_that_match_warn_nothing(three_plugins):
    registry = Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        registry.load_entry_points(
            {"VLMKIT_PLUGINS": "acme,acme-vlm-plugin:acme-data", "VLMKIT_DISABLE_PLUGINS": "acme-data"}
        )
    assert _loaded(registry) == {"acme"}


def test_deny_list_skips_the_named_entry_points(three_plugins):
    registry = Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # built-in plugins may be mid-development
        registry.load_entry_points({"VLMKIT_DISABLE_PLUGINS": "acme-vision,acme-data"})
    assert _loaded(registry) == {"acme"}


def test_without_filters_every_entry_point_loads(three_plugins):
    registry = Registry()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        registry.load_entry_points({})
    assert _loaded(registry) == {"acme", "acme-vision", "acme-data"}
    assert "vlmkit" in {r.provider.package for r in registry.all()} | {
        b.provider.package for b in registry.broken
    }


def test_global_registry_reads_the_environment_once_until_reset(three_plugins, monkeypatch):
    monkeypatch.setenv("VLMKIT_PLUGINS", "acme-data")
    monkeypatch.delenv("VLMKIT_DISABLE_PLUGINS", raising=False)
    reset_registry()
    try:
        first = get_registry()
        assert get_registry() is first
        assert _loaded(first) == {"acme-data"}

        monkeypatch.setenv("VLMKIT_PLUGINS", "acme")
        assert get_registry() is first  # cached: the environment is read on first use
        reset_registry()
        assert _loaded(get_registry()) == {"acme"}

        mine = Registry()
        reset_registry(mine)
        assert get_registry() is mine
    finally:
        reset_registry()

"""PrefixConditioningVLM: a frozen vision encoder, a trainable projection, and an LM with LoRA.

The sequence the LM sees for one example is::

    before  +  [K image-prefix embeddings]  +  after  +  target
    (e.g. "<|im_start|>user\\n")  (prompt, assistant header)  (caption + end token)

The decoder plugin decides the token ids of ``before``/``after``/``target`` (its chat template or
a plain format); this module only places the image prefix and masks the labels. Labels are -100
everywhere except ``target``, so the loss is only on caption tokens and the end token: never on
the prefix, the prompt, or padding. Padding is marked by ``attention_mask`` and the labels tensor,
never by comparing with the pad id (GPT-2's pad token *is* its EOS, which is a real target).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from vlmkit import __version__
from vlmkit.core.contracts import Formatted, cut_at_stop
from vlmkit.core.errors import ArtifactError, ConfigError, PluginError
from vlmkit.core.paths import read_json_manifest
from vlmkit.core.projection import ProjectionConfig, build_projection

log = logging.getLogger(__name__)

MANIFEST = "vlmkit.json"
ARTIFACT_FORMAT = "vlmkit-model"
ARTIFACT_VERSION = 1
IGNORE_INDEX = -100


class LoraSettings(BaseModel):
    """LoRA on the decoder; ``targets`` overrides the decoder plugin's ``lora_targets``."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, gt=0)
    alpha: float = Field(32.0, gt=0)
    #: 0 as in peft: on CPU the dropout masks cost ~12% of a training step (benchmarks/RESULTS.md);
    #: raise it (0.05-0.1) for many epochs over a small dataset
    dropout: float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None


class ModelConfig(BaseModel):
    """Everything needed to build the model; saved in the manifest and read back by ``load``."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = "timm"
    encoder_checkpoint: str | None = None
    encoder_revision: str | None = None
    decoder: str = "smollm"
    decoder_checkpoint: str | None = None
    decoder_revision: str | None = None
    projection: ProjectionConfig = Field(default_factory=ProjectionConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    unfreeze_encoder_layers: int = Field(0, ge=0)
    prompt: str = ""
    format: Literal["auto", "chat", "plain"] = "auto"
    max_caption_tokens: int = Field(48, gt=0)


@contextlib.contextmanager
def _quiet_peft():
    """peft reads ``model.is_gradient_checkpointing``, which transformers 5 deprecates with a
    FutureWarning on every wrap: peft's business, not our users'. Only that warning is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


@dataclass
class Batch:
    """Token-level inputs for a batch: ``image_mask`` marks the K prefix slots of each row."""

    input_ids: Any
    attention_mask: Any
    image_mask: Any
    labels: Any | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "image_mask": self.image_mask,
        }
        if self.labels is not None:
            out["labels"] = self.labels
        return out


class PrefixConditioningVLM(nn.Module):
    """Encoder + projection + LoRA-adapted decoder. Build with ``build``; restore with ``load``."""

    def __init__(self, config, encoder, encoder_spec, decoder_spec, lm, tokenizer, projection) -> None:
        super().__init__()
        self.settings = config
        self.encoder = encoder
        self.encoder_spec = encoder_spec
        self.decoder_spec = decoder_spec
        self.lm = lm
        self.tokenizer = tokenizer
        self.projection = projection
        self.num_prefix_tokens = config.projection.output_tokens(encoder.num_tokens, encoder.grid)
        #: the id in padding and image-slot positions (the masks, not this id, say which positions
        #: are real) and what ``generate`` emits after a row has stopped; the tokenizer's pad, else 0
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prompt_cache: dict[tuple[str, str], Formatted] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, config: ModelConfig | dict | None = None, *, registry=None, seed: int | None = 0):
        """Load the encoder and decoder through their plugins, add LoRA and a fresh projection."""
        from peft import LoraConfig, get_peft_model

        from vlmkit.core.registry import get_registry

        config = _validate_config(config)
        registry = registry or get_registry()
        encoder_spec = registry.encoder(config.encoder)
        decoder_spec = registry.decoder(config.decoder)
        encoder = encoder_spec.load(config.encoder_checkpoint, revision=config.encoder_revision)
        base, tokenizer = decoder_spec.load(config.decoder_checkpoint, revision=config.decoder_revision)
        lora_args = _lora_kwargs(decoder_spec, base, config.lora.targets)
        _check_lora_targets(base, lora_args["target_modules"], config.decoder)
        lora = LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout, **lora_args
        )
        with _quiet_peft():
            lm = get_peft_model(base, lora)
        if seed is not None:
            torch.manual_seed(seed)
        projection = build_projection(
            config.projection, encoder.feature_dim, base.get_input_embeddings().embedding_dim, encoder.grid
        )
        model = cls(config, encoder, encoder_spec, decoder_spec, lm, tokenizer, projection)
        model.freeze_encoder(config.unfreeze_encoder_layers)
        return model

    def freeze_encoder(self, unfreeze_last: int = 0) -> None:
        """Freeze the encoder, then make its last ``unfreeze_last`` blocks trainable."""
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        if unfreeze_last:
            layers = list(self.encoder.layers())
            if unfreeze_last > len(layers):
                raise ConfigError(
                    f"unfreeze_encoder_layers={unfreeze_last} but encoder {self.settings.encoder!r} has "
                    f"{len(layers)} layers"
                )
            for layer in layers[-unfreeze_last:]:
                layer.requires_grad_(True)

    @property
    def encoder_frozen(self) -> bool:
        """True when features can come from the cache: no encoder parameter trains."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.encoder_frozen:  # a frozen encoder stays in eval mode (dropout, batch-norm stats)
            self.encoder.eval()
        return self

    # ------------------------------------------------------------------ tokens

    def format(self, caption: str | None, prompt: str | None = None) -> Formatted:
        prompt = self.settings.prompt if prompt is None else prompt
        if caption is None:
            key = (prompt, self.settings.format)
            if key not in self._prompt_cache:
                self._prompt_cache[key] = self.decoder_spec.format(
                    self.tokenizer, prompt, None, self.settings.format
                )
            return self._prompt_cache[key]
        formatted = self.decoder_spec.format(self.tokenizer, prompt, caption, self.settings.format)
        limit = self.settings.max_caption_tokens
        if len(formatted.target) > limit:
            # keep the end token(s) so a truncated caption still teaches the model to stop
            stops = set(self.stop_token_ids)
            tail = [t for t in formatted.target[-2:] if t in stops] or formatted.target[-1:]
            body = formatted.target[: limit - len(tail)]
            formatted = Formatted(formatted.before, formatted.after, body + tail)
        return formatted

    @property
    def stop_token_ids(self) -> list[int]:
        return self.decoder_spec.stop_token_ids(self.tokenizer, self.settings.format)

    def tokenize(
        self,
        captions: Sequence[str | None],
        *,
        prompt: str | Sequence[str] | None = None,
        padding_side: Literal["left", "right"] = "right",
    ) -> Batch:
        """Token ids, attention mask, image-slot mask and labels for a batch of captions.

        ``None`` captions format for generation (no target, no labels). Training pads on the
        right; generation on the left, so every row's next token comes right after its prompt.
        """
        rows, label_rows, image_rows = [], [], []
        k = self.num_prefix_tokens
        prompts = [prompt] * len(captions) if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(captions):
            raise ValueError(f"got {len(prompts)} prompts for {len(captions)} captions")
        for caption, row_prompt in zip(captions, prompts, strict=True):
            f = self.format(caption, row_prompt)
            ids = [*f.before, *([self.pad_token_id] * k), *f.after, *f.target]
            rows.append(ids)
            image_rows.append([False] * len(f.before) + [True] * k + [False] * (len(ids) - len(f.before) - k))
            label_rows.append([IGNORE_INDEX] * (len(ids) - len(f.target)) + list(f.target))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        image_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (ids, img, lab) in enumerate(zip(rows, image_rows, label_rows, strict=True)):
            n = len(ids)
            sl = slice(width - n, width) if padding_side == "left" else slice(0, n)
            input_ids[i, sl] = torch.tensor(ids)
            attention[i, sl] = 1
            image_mask[i, sl] = torch.tensor(img)
            labels[i, sl] = torch.tensor(lab)
        has_labels = any(c is not None for c in captions)
        return Batch(input_ids, attention, image_mask, labels if has_labels else None)

    # ------------------------------------------------------------------ forward

    def preprocess(self, images) -> Any:
        """PIL images -> pixel values, exactly as the encoder checkpoint expects."""
        return self.encoder.preprocess(images)

    def encode(self, pixel_values):
        """Encoder features [B, N, Dv]; no autograd through a frozen encoder."""
        if self.encoder_frozen:
            with torch.no_grad():
                return self.encoder(pixel_values)
        return self.encoder(pixel_values)

    def embed(self, input_ids, image_mask, prefix):
        """LM input embeddings with the image prefix written into the image slots."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        prefix = prefix.to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), prefix.reshape(-1, prefix.shape[-1]))
        return embeds

    def forward(
        self,
        input_ids,
        attention_mask,
        image_mask,
        labels=None,
        pixel_values=None,
        features=None,
        return_logits: bool = False,
    ) -> dict[str, Any]:
        """Loss (when ``labels`` are given) from either ``pixel_values`` or cached ``features``.

        The LM head runs only on positions whose next token is a target: caption positions are a
        small part of each row (the prefix and prompt are most of it) and the vocabulary
        projection is the single largest matmul of a small LM.
        """
        if features is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values or features")
            features = self.encode(pixel_values)
        prefix = self.projection(features)
        embeds = self.embed(input_ids, image_mask, prefix)
        base = self.lm.get_base_model()
        if return_logits or labels is None:
            out = base(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
            logits = out.logits
            result: dict[str, Any] = {"logits": logits}
            if labels is not None:
                result["loss"] = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
                )
            return result
        hidden = base.get_decoder()(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = base.get_output_embeddings()(hidden[keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep])
        return {"loss": loss}

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        images=None,
        *,
        pixel_values=None,
        features=None,
        prompt: str | Sequence[str] | None = None,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        return_ids: bool = False,
    ) -> list[str] | list[list[int]]:
        """Captions for a batch, decoded with the LM's KV cache (greedy by default).

        Give exactly one of ``images`` (PIL), ``pixel_values`` or ``features``. ``prompt`` is one
        prompt for all, or one per image (rows are then left-padded to a common length).
        """
        given = [x is not None for x in (images, pixel_values, features)]
        if sum(given) != 1:
            raise ValueError("generate needs exactly one of images, pixel_values or features")
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                if images is not None:
                    pixel_values = self.preprocess(images)
                if features is None:
                    features = self.encode(pixel_values)
                prefix = self.projection(features)
                batch = self.tokenize([None] * prefix.shape[0], prompt=prompt, padding_side="left")
                embeds = self.embed(batch.input_ids, batch.image_mask, prefix)
                # positions count real tokens only, so a left-padded row starts at position 0
                out = self.lm.get_base_model().generate(
                    inputs_embeds=embeds,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens or self.settings.max_caption_tokens,
                    num_beams=num_beams,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=top_p if do_sample else None,
                    top_k=None,
                    eos_token_id=self.stop_token_ids,
                    pad_token_id=self.pad_token_id,
                )
        finally:
            self.train(was_training)
        sequences = cut_at_stop(out.tolist(), self.stop_token_ids)
        if return_ids:
            return sequences
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in sequences]

    def caption(self, images, **kwargs) -> list[str]:
        """Captions for PIL images (see ``generate`` for options)."""
        return self.generate(images, **kwargs)

    # ------------------------------------------------------------------ artifacts

    def manifest(self, training: dict | None = None) -> dict[str, Any]:
        fingerprint = self.encoder.fingerprint() if hasattr(self.encoder, "fingerprint") else None
        return {
            "format": ARTIFACT_FORMAT,
            "format_version": ARTIFACT_VERSION,
            "vlmkit_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": self.settings.model_dump(mode="json"),
            "encoder": {
                "plugin": self.settings.encoder,
                "checkpoint": getattr(self.encoder, "checkpoint", self.settings.encoder_checkpoint),
                "revision": getattr(self.encoder, "revision", self.settings.encoder_revision),
                "fingerprint": fingerprint,
                "num_tokens": self.encoder.num_tokens,
                "feature_dim": self.encoder.feature_dim,
                "grid": list(self.encoder.grid) if self.encoder.grid else None,
            },
            "decoder": {
                "plugin": self.settings.decoder,
                "checkpoint": self.settings.decoder_checkpoint or self.decoder_spec.default_checkpoint,
                "revision": self.settings.decoder_revision,
                "model_type": self.lm.get_base_model().config.model_type,
            },
            "prefix_tokens": self.num_prefix_tokens,
            "stop_token_ids": self.stop_token_ids,
            # the ids around the image at generation: ``load`` checks that they are still these
            "prompt_ids": self._prompt_ids(),
            "files": {
                "projection": "projection.safetensors",
                "adapter": "adapter",
                "encoder": "encoder.safetensors" if self.encoder_weights() else None,
            },
            "training": training or {},
        }

    def _prompt_ids(self) -> dict[str, list[int]]:
        context = self.format(None)
        return {"before": list(context.before), "after": list(context.after)}

    def save(self, path: str | Path, *, training: dict | None = None) -> Path:
        """Write the small artifact: manifest, projection and LoRA adapter (safetensors).

        Base weights are referenced, not copied. Other files in the folder (checkpoints, logs)
        are left alone. The manifest is removed first and written last, so a folder whose save
        was interrupted is never mistaken for a complete model.
        """
        import os
        import shutil

        from safetensors.torch import save_file

        path = Path(path)
        ours = (path / MANIFEST).exists() or (path / "run.yaml").exists()  # run.yaml: a vlmkit train run
        if path.exists() and not ours and any(path.iterdir()):
            raise ArtifactError(f"{path} exists and is not a vlmkit model; choose another folder")
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
        tmp = path / ".saving"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_state(self.projection), str(tmp / "projection.safetensors"))
        self.lm.save_pretrained(str(tmp / "adapter"))
        files = ["projection.safetensors", "adapter"]
        encoder_weights = self.encoder_weights()
        if encoder_weights:
            save_file(encoder_weights, str(tmp / "encoder.safetensors"))
            files.append("encoder.safetensors")
        else:
            (path / "encoder.safetensors").unlink(missing_ok=True)
        for name in files:
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        shutil.rmtree(tmp)
        manifest_tmp = path / f".{MANIFEST}.tmp"
        manifest_tmp.write_text(json.dumps(self.manifest(training), indent=2) + "\n")
        os.replace(manifest_tmp, path / MANIFEST)
        return path

    @classmethod
    def load(cls, path: str | Path, *, registry=None, trainable: bool = False):
        """Rebuild a saved model through the registry (``vlmkit.load``)."""
        from peft import PeftModel
        from safetensors.torch import load_file

        from vlmkit.core.registry import get_registry

        path = Path(path)
        manifest = read_manifest(path)
        config = _validate_config(manifest["config"], source=str(path / MANIFEST))
        for part in ("projection.safetensors", "adapter", (manifest.get("files") or {}).get("encoder")):
            if part and not (path / part).exists():  # checked before minutes of loading base weights
                raise ArtifactError(f"{path} is an incomplete vlmkit model: {part} is missing; save it again")
        registry = registry or get_registry()
        try:
            encoder_spec = registry.encoder(config.encoder)
            decoder_spec = registry.decoder(config.decoder)
        except PluginError as exc:
            raise PluginError(f"model {path} needs a plugin that is not available: {exc}") from exc
        encoder = encoder_spec.load(config.encoder_checkpoint, revision=config.encoder_revision)
        base, tokenizer = decoder_spec.load(config.decoder_checkpoint, revision=config.decoder_revision)
        with _quiet_peft():
            lm = PeftModel.from_pretrained(base, str(path / "adapter"), is_trainable=trainable)
        projection = build_projection(
            config.projection, encoder.feature_dim, base.get_input_embeddings().embedding_dim, encoder.grid
        )
        projection.load_state_dict(load_file(str(path / "projection.safetensors")))
        model = cls(config, encoder, encoder_spec, decoder_spec, lm, tokenizer, projection)
        model.freeze_encoder(config.unfreeze_encoder_layers)
        encoder_file = manifest.get("files", {}).get("encoder")
        if encoder_file:
            missing = set(load_file(str(path / encoder_file))) - {k for k, _ in encoder.named_parameters()}
            if missing:
                raise ArtifactError(
                    f"{path / encoder_file} holds weights the encoder lacks: {sorted(missing)[:3]}"
                )
            encoder.load_state_dict(load_file(str(path / encoder_file)), strict=False)
        # checked after loading trained encoder layers: the saved fingerprint includes them
        saved_fp = manifest.get("encoder", {}).get("fingerprint")
        if saved_fp and hasattr(encoder, "fingerprint") and encoder.fingerprint() != saved_fp:
            log.warning(
                "encoder %r differs from the one model %s was trained with (weights or preprocessing "
                "changed); captions may be wrong",
                config.encoder,
                path,
            )
        saved_prompt, now = manifest.get("prompt_ids"), model._prompt_ids()
        if saved_prompt and saved_prompt != now:
            log.warning(
                "decoder %r lays out the prompt of model %s differently from when it was trained "
                "(%d+%d ids around the image, now %d+%d: the tokenizer, its chat template or vlmkit "
                "changed); captions may be wrong: load the decoder revision it was trained with",
                config.decoder,
                path,
                len(saved_prompt["before"]),
                len(saved_prompt["after"]),
                len(now["before"]),
                len(now["after"]),
            )
        if not trainable:
            model.requires_grad_(False)
        model.eval()
        return model

    # ------------------------------------------------------------------ introspection

    def encoder_weights(self) -> dict[str, Any]:
        """The encoder weights an artifact must carry: those of the last ``unfreeze_encoder_layers``
        blocks and any other trainable ones. Chosen by the config as well as ``requires_grad``, so
        a model loaded for inference (everything frozen) and saved or exported again keeps them."""
        n = self.settings.unfreeze_encoder_layers
        layers = list(self.encoder.layers())[-n:] if n else []
        unfrozen = {id(p) for layer in layers for p in layer.parameters()}
        return {
            k: v.detach().contiguous()
            for k, v in self.encoder.named_parameters()
            if v.requires_grad or id(v) in unfrozen
        }

    def trainable_parameter_groups(self) -> dict[str, list]:
        """Trainable parameters by part, so each part can get its own learning rate."""
        return {
            "projection": [p for p in self.projection.parameters() if p.requires_grad],
            "lora": [p for p in self.lm.parameters() if p.requires_grad],
            "encoder": [p for p in self.encoder.parameters() if p.requires_grad],
        }


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a model folder; ``ArtifactError`` when ``path`` is not a vlmkit model."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"model folder {path} does not exist")
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path} is not a vlmkit model (no {MANIFEST}); train one with 'vlmkit train'")
    manifest = read_json_manifest(file, "vlmkit model manifest")
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{file} is not a vlmkit model manifest (format is {manifest.get('format')!r})")
    if manifest.get("format_version", 0) > ARTIFACT_VERSION:
        raise ArtifactError(
            f"{path} was written by a newer vlmkit (format {manifest['format_version']}); upgrade vlmkit"
        )
    return manifest


def _validate_config(config, source: str = "model config") -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    try:
        return ModelConfig.model_validate(config or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{source}: {where}: {first['msg']}") from exc


def _lora_kwargs(decoder_spec, base, targets: list[str] | None) -> dict[str, Any]:
    """peft ``LoraConfig`` arguments from the decoder spec: ``target_modules`` plus whatever the
    family needs (e.g. ``fan_in_fan_out`` for GPT-2's Conv1D layers)."""
    return dict(decoder_spec.lora_kwargs(base, targets))


def _check_lora_targets(base, targets: Sequence[str], decoder: str) -> None:
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()} | {
        n for n, _ in base.named_modules()
    }
    missing = [t for t in targets if t not in names]
    if missing or not targets:
        raise PluginError(
            f"LoRA targets {missing or list(targets)} match no module of the {decoder!r} model; "
            f"set lora.targets to module names it has"
        )


def _state(module) -> dict:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}

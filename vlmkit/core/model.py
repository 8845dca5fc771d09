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

import sys
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vlmkit.core import artifact
from vlmkit.core.contracts import Formatted, cut_at_stop
from vlmkit.core.errors import ConfigError

IGNORE_INDEX = -100


@dataclass
class Batch:
    """Token-level inputs for a batch: ``image_mask`` marks the K prefix slots of each row."""

    input_ids: Any
    attention_mask: Any
    image_mask: Any
    labels: Any | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dict(input_ids=self.input_ids, attention_mask=self.attention_mask, image_mask=self.image_mask)
        return out if self.labels is None else {**out, "labels": self.labels}


class PrefixConditioningVLM(nn.Module):
    """Encoder + projection + LoRA-adapted decoder. Build with ``build``; restore with ``load``."""

    def __init__(
        self, config, encoder, encoder_spec, decoder_spec, lm, tokenizer, projection, *, embedding_scale=1.0
    ) -> None:
        super().__init__()
        self.settings = config
        self.encoder = encoder
        self.encoder_spec = encoder_spec
        self.decoder_spec = decoder_spec
        self.lm = lm
        self.tokenizer = tokenizer
        self.projection = projection
        #: what the LM multiplies its embedding module's output by when it embeds token ids itself
        #: and not ``inputs_embeds`` (Falcon-H1's ``embedding_multiplier``; 1.0 for most families),
        #: measured when the model is built (``vlmkit.core.lm.token_embedding_scale``)
        self.embedding_scale = float(embedding_scale)
        self.num_prefix_tokens = config.projection.output_tokens(encoder.num_tokens, encoder.grid)
        #: the id in padding and image-slot positions (the masks, not this id, say which positions
        #: are real) and what ``generate`` emits after a row has stopped; the tokenizer's pad, else 0
        self.pad_token_id: int = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._prompt_cache: dict[tuple[str, str], Formatted] = {}
        resolve = getattr(decoder_spec, "resolve_layer_class", None)  # FSDP's auto-wrap reads this
        self._no_split_modules = [resolve(lm)] if resolve and decoder_spec.layer_class else []

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls, config=None, *, registry=None, seed: int | None = 0, dtype=None, encoder_dtype=None
    ) -> PrefixConditioningVLM:
        """A fresh model: encoder and decoder through their plugins, new LoRA and projection
        (``vlmkit.core.artifact.assemble``); ``dtype`` is that of the frozen base weights,
        ``encoder_dtype`` (default ``dtype``) the frozen encoder's."""
        return artifact.assemble(
            cls, config, registry=registry, seed=seed, dtype=dtype, encoder_dtype=encoder_dtype
        )

    @classmethod
    def load(cls, path, *, registry=None, trainable: bool = False, dtype=None) -> PrefixConditioningVLM:
        """A saved model or merged export (``vlmkit.load``; ``vlmkit.core.artifact.load``)."""
        return artifact.load(cls, path, registry=registry, trainable=trainable, dtype=dtype)

    def save(self, path, *, training: dict | None = None):
        """Write the model artifact to ``path`` (``vlmkit.core.artifact.save``)."""
        return artifact.save(self, path, training=training)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute the decoder's activations in backward (``Trainer``'s name for it). Non-reentrant
        by default: it needs no input that requires grad, so LoRA and the prefix train as without."""
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        lm = self.language_model  # transformers 5 renamed it activation checkpointing
        if hasattr(lm, "activation_checkpointing_enable"):
            return lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    @property
    def language_model(self):
        """The causal LM under the LoRA wrapper (the LM itself in a merged export)."""
        get_base = getattr(self.lm, "get_base_model", None)
        return get_base() if get_base is not None else self.lm

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
                # trained in the default memory format (not channels-last): sharding views it flat
                layer.requires_grad_(True).to(memory_format=torch.contiguous_format)

    @property
    def encoder_frozen(self) -> bool:
        """True when features can come from the cache: no encoder parameter trains."""
        return not any(p.requires_grad for p in self.encoder.parameters())

    def unfrozen_encoder_layers(self) -> list[nn.Module]:  # by the config, trainable or not
        return list(self.encoder.layers())[-n:] if (n := self.settings.unfreeze_encoder_layers) else []

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen blocks and all batch norm: statistics would move every batch
        if mode and not self.encoder_frozen:
            for layer in self.unfrozen_encoder_layers():
                layer.train()
            for m in self.encoder.modules():
                m.training = m.training and not getattr(m, "track_running_stats", False)
        return self

    # ------------------------------------------------------------------ tokens

    def format(self, caption: str | None, prompt: str | None = None) -> Formatted:
        prompt = self.settings.prompt if prompt is None else prompt
        if caption is None:
            key = (prompt, self.settings.prompt_format)
            if key not in self._prompt_cache:
                self._prompt_cache[key] = self.decoder_spec.format(
                    self.tokenizer, prompt, None, self.settings.prompt_format
                )
            return self._prompt_cache[key]
        formatted = self.decoder_spec.format(self.tokenizer, prompt, caption, self.settings.prompt_format)
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
        return self.decoder_spec.stop_token_ids(self.tokenizer, self.settings.prompt_format)

    def tokenize(
        self,
        captions: Sequence[str | None],
        *,
        prompt: str | Sequence[str] | None = None,
        padding_side: Literal["left", "right"] = "right",
        device=None,
    ) -> Batch:
        """Token ids, attention mask, image-slot mask and labels for a batch of captions.

        ``None`` captions format for generation (no target, no labels). Training pads on the
        right; generation on the left, so every row's next token comes right after its prompt.
        The tensors are on ``device`` (default: the model's).
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

        def padded(row_list, fill):
            left = padding_side == "left"
            return [
                [fill] * (width - len(r)) * left + list(r) + [fill] * (width - len(r)) * (not left)
                for r in row_list
            ]

        device = self.device if device is None else device  # the collator asks for CPU (Trainer moves)
        input_ids = torch.tensor(padded(rows, self.pad_token_id), dtype=torch.long, device=device)
        attention = torch.tensor(padded([[1] * len(r) for r in rows], 0), dtype=torch.long, device=device)
        image_mask = torch.tensor(padded(image_rows, False), dtype=torch.bool, device=device)
        labels = torch.tensor(padded(label_rows, IGNORE_INDEX), dtype=torch.long, device=device)
        has_labels = any(c is not None for c in captions)
        return Batch(input_ids, attention, image_mask, labels if has_labels else None)

    # ------------------------------------------------------------------ forward

    @property
    def device(self) -> torch.device:
        """Where the LM's input embeddings are; every input is moved there."""
        return self.lm.get_input_embeddings().weight.device

    def preprocess(self, images) -> Any:
        """PIL images -> pixel values, exactly as the encoder checkpoint expects."""
        return self.encoder.preprocess(images)

    def encode(self, pixel_values):
        """Encoder features [B, N, Dv]; no autograd through a frozen encoder."""
        with torch.no_grad() if self.encoder_frozen else nullcontext():
            return self.encoder(pixel_values)

    def embed(self, input_ids, image_mask, prefix):
        """LM input embeddings with the image prefix written into the image slots. Token ids are
        embedded as the LM embeds them itself: its embedding module (which may scale, as Gemma's
        does), then ``embedding_scale`` (what its forward applies to ids only, as Falcon-H1's)."""
        embeds = self.lm.get_input_embeddings()(input_ids)
        if self.embedding_scale != 1.0:
            embeds = embeds * self.embedding_scale
        prefix = prefix.to(embeds.dtype).reshape(-1, prefix.shape[-1])
        return embeds.masked_scatter(image_mask.unsqueeze(-1), prefix)

    accepts_loss_kwargs = True  # Trainer passes num_items_in_batch: loss = sum / the step's target count

    def forward(
        self,
        input_ids,
        attention_mask,
        image_mask,
        labels=None,
        pixel_values=None,
        features=None,
        return_logits: bool = False,
        num_items_in_batch=None,
    ) -> dict[str, Any]:
        """Loss (when ``labels`` are given) from either ``pixel_values`` or cached ``features``.

        The LM head runs only on positions whose next token is a target: caption positions are a
        small part of each row (the prefix and prompt are most of it) and the vocabulary
        projection is the single largest matmul of a small LM. It runs in the model's own forward
        (``logits_to_keep``), not called by us: what a family does after the head (Gemma-2's
        softcapping, Granite's logit scaling) then trains as it generates.
        """
        if features is None:
            if pixel_values is None:
                raise ValueError("forward needs pixel_values or features")
            features = self.encode(pixel_values)
        embeds = self.embed(input_ids, image_mask, self.projection(features))
        full = return_logits or labels is None
        targets = None if labels is None else labels[:, 1:]
        keep = 0 if full else nn.functional.pad(targets != IGNORE_INDEX, (0, 1))  # 0: all positions
        if not full and not hasattr(sys.modules.get("transformers.modeling_utils"), "slice_logits_to_keep"):
            keep = keep.any(0).nonzero().squeeze(1)  # transformers 4: positions shared by all rows
        out = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep
        )
        result: dict[str, Any] = {"logits": out.logits} if full else {}
        if labels is not None:
            picked = targets if full else targets[:, keep] if keep.ndim == 1 else targets[keep[:, :-1]]
            logits = (out.logits[:, :-1] if full else out.logits).flatten(0, -2).float()
            loss = nn.functional.cross_entropy(logits, picked.flatten(), reduction="sum")  # skips -100
            count = (picked != IGNORE_INDEX).sum() if num_items_in_batch is None else num_items_in_batch
            result["loss"] = loss / count
        return result

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
        synced_gpus: bool | None = None,
    ) -> list[str] | list[list[int]]:
        """Captions for a batch, decoded with the LM's KV cache (greedy by default).

        Give exactly one of ``images`` (PIL), ``pixel_values`` or ``features``. ``prompt`` is one
        prompt for all, or one per image (rows are then left-padded to a common length).
        ``synced_gpus``: every rank steps until all are done (a sharded model needs every rank in
        each forward); ``None`` lets transformers decide from the LM's FSDP/ZeRO-3 markers.
        """
        given = [x is not None for x in (images, pixel_values, features)]
        if sum(given) != 1:
            raise ValueError("generate needs exactly one of images, pixel_values or features")
        if do_sample and not temperature > 0:  # transformers raises a ValueError mid-call
            raise ConfigError(
                f"sampling needs a temperature above 0, not {temperature}; for the most likely caption "
                "decode greedily (no --sample)"
            )
        max_new_tokens = max_new_tokens or self.settings.max_caption_tokens
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
                self._check_length(batch.input_ids.shape[1], max_new_tokens)
                embeds = self.embed(batch.input_ids, batch.image_mask, prefix)
                # positions count real tokens only, so a left-padded row starts at position 0
                out = self.language_model.generate(
                    inputs_embeds=embeds,
                    attention_mask=batch.attention_mask,
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    do_sample=do_sample,
                    temperature=temperature if do_sample else None,
                    top_p=top_p if do_sample else None,
                    top_k=None,
                    eos_token_id=self.stop_token_ids,
                    pad_token_id=self.pad_token_id,
                    synced_gpus=synced_gpus,
                )
        finally:
            self.train(was_training)
        sequences = cut_at_stop(out.tolist(), self.stop_token_ids)
        if return_ids:
            return sequences
        return [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in sequences]

    def _check_length(self, context: int, max_new_tokens: int) -> None:
        """Refuse to generate past the positions the decoder was trained for: GPT-2's position
        table ends there (an index error), rotary models go on, producing noise, for minutes."""
        config = self.language_model.config
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if isinstance(limit, int) and context + max_new_tokens > limit:
            raise ConfigError(
                f"max_new_tokens {max_new_tokens}: the decoder holds {limit} positions and the image and "
                f"prompt take {context}; ask for at most {max(limit - context, 0)} new tokens"
            )

    def caption(self, images, **kwargs) -> list[str]:
        """Captions for PIL images (see ``generate`` for options)."""
        return self.generate(images, **kwargs)

    # ------------------------------------------------------------------ introspection

    def encoder_weights(self) -> dict[str, Any]:
        """Parameters and buffers of the blocks unfrozen by the config (kept by a model loaded frozen)."""
        layers = self.unfrozen_encoder_layers()
        unfrozen = {id(t) for layer in layers for t in (*layer.parameters(), *layer.buffers())}
        return {
            k: v.detach().contiguous()
            for k, v in self.encoder.state_dict(keep_vars=True).items()
            if id(v) in unfrozen or v.requires_grad
        }

    def trainable_parameter_groups(self) -> dict[str, list]:
        """Trainable parameters by part, so each part can get its own learning rate."""
        return {
            "projection": [p for p in self.projection.parameters() if p.requires_grad],
            "lora": [p for p in self.lm.parameters() if p.requires_grad],
            "encoder": [p for p in self.encoder.parameters() if p.requires_grad],
        }

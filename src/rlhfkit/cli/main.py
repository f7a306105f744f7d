"""The ``rlhfkit`` command: one sub-command per method, plus tiny, eval, plot, configs and demo.

    rlhfkit sft --config FILE.yaml [key=value ...]
    rlhfkit sft --help          # every config field: type, default, description
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from pathlib import Path


def _methods() -> dict:
    # Imported lazily so `rlhfkit --help` stays fast.
    from ..methods.cpo import CPOConfig, run_cpo
    from ..methods.distill import DistillConfig, run_distill
    from ..methods.dpo import DPOConfig, run_dpo
    from ..methods.grpo import GRPOConfig, run_grpo
    from ..methods.kto import KTOConfig, run_kto
    from ..methods.online_dpo import OnlineDPOConfig, run_online_dpo
    from ..methods.orpo import ORPOConfig, run_orpo
    from ..methods.ppo import PPOConfig, run_ppo
    from ..methods.prm import PRMConfig, run_prm
    from ..methods.rloo import RLOOConfig, run_rloo
    from ..methods.rm import RMConfig, run_rm
    from ..methods.sft import SFTConfig, run_sft

    return {"sft": (SFTConfig, run_sft), "rm": (RMConfig, run_rm), "dpo": (DPOConfig, run_dpo),
            "cpo": (CPOConfig, run_cpo), "orpo": (ORPOConfig, run_orpo), "kto": (KTOConfig, run_kto),
            "online_dpo": (OnlineDPOConfig, run_online_dpo), "grpo": (GRPOConfig, run_grpo), "rloo": (RLOOConfig, run_rloo),
            "ppo": (PPOConfig, run_ppo), "prm": (PRMConfig, run_prm), "distill": (DistillConfig, run_distill)}


METHOD_HELP = {
    "sft": "supervised fine-tuning on prompt/completion or chat rows",
    "rm": "reward model on K-way rankings (or pairs), saved as a ...ForSequenceClassification folder",
    "dpo": "direct preference optimization on pairs, Plackett-Luce on rankings",
    "cpo": "CPO and SimPO (loss_type=simpo): preference optimization with no reference model (TRL's CPOTrainer); "
           "DPO's keys, other defaults",
    "orpo": "ORPO: SFT and an odds-ratio preference term in one loss, no reference model (TRL's ORPOTrainer); "
            "DPO's keys, other defaults",
    "online_dpo": "online DPO: DPO on pairs the policy samples as it trains, judged by rewards or a reward model "
                  "(TRL's OnlineDPOTrainer)",
    "kto": "KTO on unpaired answers labelled desirable or not (or pairs, read as two such answers)",
    "prm": "process reward model on step-labelled rows, saved as a ...ForTokenClassification folder "
           "(readout=head) or as the causal LM it reads (readout=likelihood)",
    "grpo": "group relative policy optimization with outcome or process rewards (rules or learned models)",
    "rloo": "RLOO: REINFORCE with a leave-one-out baseline and the KL in the reward (TRL's RLOOTrainer); GRPO's "
            "keys, other defaults",
    "ppo": "PPO with actor, critic, frozen reward and reference models (InstructGPT stage 3)",
    "distill": "on-policy distillation: a student matches a teacher's next-token distributions on its own answers "
               "(GKD; TRL's DistillationTrainer)",
}


def at_least(low: int):
    """An argparse type: an integer >= ``low`` (argparse's own one-line error otherwise)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def resolve_config(name: str) -> Path:
    """A path, or the name of a config shipped with rlhfkit (``sft_tiny``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = resources.files("rlhfkit") / "configs" / f"{name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return Path(str(shipped))
    available = sorted(p.name for p in (resources.files("rlhfkit") / "configs").iterdir())
    raise ConfigNotFound(f"config not found: {name} (shipped configs: {', '.join(available)})")


class ConfigNotFound(ValueError):
    """``--config`` names neither a file nor a shipped config."""


def cmd_method(args) -> int:
    from ..train.config import load_config

    config_cls, run = _methods()[args.command]
    cfg = load_config(config_cls, resolve_config(args.config) if args.config else None, args.overrides)
    summary = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns it: rank 0 says it once
        print(json.dumps({k: v for k, v in summary.items() if k != "evals"}, indent=1))
    return 0


class FieldsHelp(argparse.Action):
    """``-h/--help`` of a method: the usage, then every config field (imports the method only now,
    so that ``rlhfkit --help`` stays fast)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show the usage and "
                         "every config field with its type, default and description, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from .help import fields_help

        parser.print_help()
        print("\n" + fields_help(_methods()[parser.prog.split()[-1]][0]))
        parser.exit()


def cmd_configs(args) -> int:
    from .help import shipped_configs

    rows = shipped_configs()
    width = max(len(r[0]) for r in rows)
    for name, method, line in rows:
        print(f"{name:<{width}}  rlhfkit {method} --config {name}   # {line}")
    return 0


def cmd_plot(args) -> int:
    from ..data.rows import DataError
    from ..train.plots import plot_runs

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise DataError(f"--out {args.out} is a file; the plots go in a folder (give a new or existing folder)")
    paths = plot_runs(args.runs, args.out)
    if not paths:
        raise DataError(f"{', '.join(map(str, args.runs))}: no metrics to plot (their metrics.jsonl hold no numbers)")
    for path in paths:
        print(path)
    return 0


def cmd_tiny(args) -> int:
    from ..models.tiny import TinySpec, write_tiny_default
    from ..train.config import ConfigError

    if args.hidden % 8:
        raise ConfigError(f"--hidden {args.hidden}: a multiple of 8 (4 attention heads of an even width, as the "
                          "rotary embedding needs)")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"--out {out} already holds files (an earlier tiny default, perhaps edited): "
                          "pass --force to write over them, or another --out")
    spec = TinySpec(hidden_size=args.hidden, num_layers=args.layers, intermediate_size=4 * args.hidden)
    paths = write_tiny_default(args.out, spec, seed=args.seed, overwrite=args.force)
    for name, path in paths.items():
        print(f"{name:10s} {path}")
    return 0


NO_REFERENCE = "none"  # --ref none: a policy trained with no reference model (CPO, SimPO, ORPO)


def cmd_eval(args) -> int:
    from ..data.formats import FORMAT_NAMES, row_format
    from ..data.rows import read_rows
    from ..models.reward import is_likelihood_prm, is_sequence_classifier, is_token_classifier
    from ..train.config import ConfigError

    if not Path(args.model).is_dir():  # before its kind is judged from the folder
        from ..models.load import ModelLoadError, hub_hint

        raise ModelLoadError(f"model folder not found: {args.model}{hub_hint(args.model)}")
    kind = ("a process reward model" if is_token_classifier(args.model) or is_likelihood_prm(args.model) else
            "a reward model" if is_sequence_classifier(args.model) else
            "a policy against its reference" if args.ref else "a policy")
    _refuse_unread(args, kind)
    rows = read_rows(args.data)
    if args.limit:
        rows = rows[: args.limit]
    report = None  # what --overlong did to preference and step rows
    if kind == "a process reward model":  # step accuracy, F1, first error
        from ..data.steps import encode_step_rows
        from ..methods.prm import step_metrics
        from ..models.load import load_tokenizer
        from ..models.reward import load_process_reward_model

        tokenizer = load_tokenizer(args.model, args.tokenizer)
        model = load_process_reward_model(args.model, tokenizer)
        separator = getattr(model.config, "step_separator", None) or "\n"
        examples, report = encode_step_rows(rows, tokenizer, separator, args.max_length, args.overlong)
        metrics = step_metrics(model, examples, tokenizer.pad_token_id)
    elif kind == "a reward model":  # pairwise accuracy on rankings or pairs
        from ..data.prefs import encode_rankings
        from ..methods.rm import ranking_metrics
        from ..models.load import load_tokenizer
        from ..models.reward import load_reward_model

        tokenizer = load_tokenizer(args.model, args.tokenizer)
        examples, report = encode_rankings(rows, tokenizer, args.max_length, args.overlong)
        metrics = ranking_metrics(load_reward_model(args.model, tokenizer), examples, tokenizer.pad_token_id)
    elif args.ref and any(row_format(r) == "unpaired_preference" for r in rows):  # a KTO policy (pairs may be among them)
        from ..data.unpaired import encode_unpaired
        from ..methods.common import load_policy

        if args.ref == NO_REFERENCE:
            raise ConfigError("--ref none reads pairs or rankings; KTO's implicit reward on unpaired rows is "
                              "log(pi / pi_ref): give the reference's folder")
        from ..methods.kto import implicit_rewards
        from ..models.lora import Reference

        model, tokenizer = load_policy(args.model, args.tokenizer)
        reference, _ = load_policy(args.ref, args.tokenizer or args.model)
        examples, report = encode_unpaired(rows, tokenizer, args.max_length, args.overlong)
        metrics = {"measured": "the mean log(pi / pi_ref) of the desirable answers and of the undesirable ones "
                               "(KTO's implicit reward over beta), and their gap", "ref": str(args.ref),
                   **implicit_rewards(model, Reference(module=reference), examples, tokenizer.pad_token_id, 1.0),
                   "n": len(examples)}
    elif args.ref:  # a DPO policy against its reference (--ref none: a CPO, SimPO or ORPO policy alone)
        from ..data.prefs import encode_rankings
        from ..methods.common import load_policy
        from ..models.rankings import no_reference, precompute_reference, preference_accuracy

        if (fmt := row_format(rows[0])) not in ("preference", "implicit_preference", "ranking"):
            raise ConfigError(f"--ref compares a policy with its reference on pairs or rankings (DPO's preference "
                              f"accuracy) or on unpaired rows (KTO's); {rows[0].where} is a {fmt.replace('_', '-')} "
                              f"row: leave --ref out to evaluate the policy on it")
        free = args.ref == NO_REFERENCE
        model, tokenizer = load_policy(args.model, args.tokenizer)
        examples, report = encode_rankings(rows, tokenizer, args.max_length, args.overlong)
        if free:
            examples = no_reference(examples)
        else:
            reference, _ = load_policy(args.ref, args.tokenizer or args.model)
            examples = precompute_reference(reference, examples, tokenizer.pad_token_id)
        pairs = sum(a < b for e in examples for i, a in enumerate(e.ranks) for b in e.ranks[i + 1:])
        pad = tokenizer.pad_token_id
        metrics = {"measured": "preference accuracy: the policy's implicit reward beta log(pi / pi_ref) orders each "
                               "ranked pair as the data does", "ref": str(args.ref),
                   "preference_accuracy": preference_accuracy(model, examples, pad), "n": len(examples), "pairs": pairs}
        if free:
            metrics["measured"] = ("preference accuracy with no reference: the answers' log pi (preference_accuracy) "
                                   "and their mean log-prob per token (preference_accuracy_per_token, SimPO's and "
                                   "ORPO's reward) order each ranked pair as the data does")
            metrics["preference_accuracy_per_token"] = preference_accuracy(model, examples, pad, per_token=True)
    else:  # a policy: greedy exact-match accuracy on prompts, the held-out loss on answers and text
        from ..methods.common import load_policy
        from ..methods.sft import held_out_kinds, policy_eval

        if (fmt := row_format(rows[0])) in ("preference", "implicit_preference", "ranking", "unpaired_preference"):
            raise ConfigError(f"{rows[0].where}: a policy is measured on {FORMAT_NAMES[fmt]} rows against its reference "
                              f"(the model it was trained from): give --ref REF"
                              + ("" if fmt == "unpaired_preference" else ", or --ref none for a CPO, SimPO or ORPO "
                                 "policy") + "; without --ref a policy is measured on prompts, answers or text")
        if not held_out_kinds(rows)[1]:  # prompts alone: nothing for --max-length to measure (said before the eval)
            _refuse_unread(args, "a policy on prompt rows")
        model, tokenizer = load_policy(args.model, args.tokenizer)
        metrics, report = policy_eval(model, tokenizer, rows, args.max_new_tokens, args.max_length, args.overlong)
        if "accuracy" in metrics:
            metrics = {"measured": f"exact match of greedy answers of up to {args.max_new_tokens} new tokens",
                       "max_new_tokens": args.max_new_tokens, **metrics}
    result = {"model": str(args.model), "data": str(args.data), "limit": args.limit or None, **metrics}
    if report is not None:
        result["lengths"] = report.summary()
    out = Path(args.out or args.model)
    path = out if out.suffix == ".json" else out / "eval.json"  # --out a file, or the folder it goes in
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


# The eval options each kind of model reads: the rest, given, would be ignored
EVAL_READS = {"a process reward model": ("--max-length", "--overlong"), "a reward model": ("--max-length", "--overlong"),
              "a policy against its reference": ("--max-length", "--overlong", "--ref"),
              "a policy": ("--max-new-tokens", "--max-length", "--overlong"),
              "a policy on prompt rows": ("--max-new-tokens",)}
EVAL_DEFAULTS = {"--max-length": 512, "--overlong": "error", "--ref": None, "--max-new-tokens": 64}


def _refuse_unread(args, kind: str) -> None:
    given = [o for o, default in EVAL_DEFAULTS.items()
             if o not in EVAL_READS[kind] and getattr(args, o[2:].replace("-", "_")) != default]
    if given:
        from ..train.config import ConfigError

        raise ConfigError(f"{args.model} is {kind}, whose eval reads no {' or '.join(given)}: leave "
                          f"{'it' if len(given) == 1 else 'them'} out")


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, jobs=args.jobs,
             stages=[s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit", description="Align language models with human feedback.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in METHOD_HELP.items():
        p = sub.add_parser(name, help=help_text, add_help=False, description=f"{help_text}. Overrides: key=value, "
                           "nested with dots (train.lr=1e-3).")
        p.add_argument("-h", "--help", action=FieldsHelp)
        p.add_argument("--config", help=f"a YAML file or a shipped config name (e.g. {name}_tiny)")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
        p.set_defaults(func=cmd_method)
    p = sub.add_parser("tiny", help="build the embedded tiny default: tokenizer, base model, data files")
    p.add_argument("--out", default="tiny", help="folder to write (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data (default 0)")
    p.add_argument("--hidden", type=at_least(8), default=64, help="width: a multiple of 8 (4 heads of an even width)")
    p.add_argument("--layers", type=at_least(1), default=2, help="decoder layers (default 2)")
    p.add_argument("--force", action="store_true", help="write over the files of an --out folder that is not empty")
    p.set_defaults(func=cmd_tiny)
    p = sub.add_parser("eval", help="held-out metrics -> eval.json: a policy's exact-match accuracy and "
                       "held-out loss (with --ref, DPO's preference accuracy), a reward model's pairwise accuracy "
                       "and Kendall tau, or a PRM's step accuracy")
    p.add_argument("--model", required=True, help="a model folder a run wrote (or any save_pretrained folder; "
                   "a LoRA adapter folder too): its kind says what is measured")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    p.add_argument("--data", required=True, help="rows as training reads them (jsonl, json, csv, parquet, a saved "
                   "dataset folder): prompts with answers or completions, text or messages, pairs or rankings, "
                   "step-labelled rows")
    p.add_argument("--out", help="folder for eval.json (default: the model folder), or a path ending in .json")
    p.add_argument("--limit", type=at_least(0), default=0, help="the first N rows (0: all)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=EVAL_DEFAULTS["--max-new-tokens"],
                   help="longest greedy answer (default 64; the multi-step task's answers need up to 34)")
    p.add_argument("--max-length", type=at_least(2), default=EVAL_DEFAULTS["--max-length"],
                   help="longest prompt+completion of preference, step and (a policy's loss) answered or text rows "
                        "(default 512)")
    p.add_argument("--overlong", choices=("error", "truncate", "skip"), default=EVAL_DEFAULTS["--overlong"],  # data/encode.py's policies
                   help="rows longer than --max-length: error (default), truncate or skip; "
                        "eval.json says how many")
    p.add_argument("--ref", help="reference model folder: report a DPO policy's preference accuracy on pairs/rankings, "
                                 "a KTO policy's implicit rewards on unpaired rows (prompt, completion, label); "
                                 "none: the preference accuracy of log pi alone (CPO, SimPO, ORPO)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("configs", help="list the configs shipped with rlhfkit (for --config NAME)")
    p.set_defaults(func=cmd_configs)
    p = sub.add_parser("plot", help="PNG curves of one or more runs' metrics.jsonl, overlaid")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="folders holding metrics.jsonl (a method's train.out_dir)")
    p.add_argument("--out", default="plots", help="folder for the PNGs (default: plots)")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("demo", help="the whole pipeline on the tiny default, on a CPU, in minutes")
    p.add_argument("--out", default="demo_out", help="folder for every stage's run and summary.json (default: demo_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tiny default and of every stage (default 0)")
    p.add_argument("--quick", action="store_true", help="a shorter run (for smoke tests)")
    p.add_argument("--stages", help="comma-separated stages to run, in order (default: all); a stage needs the "
                   "ones it starts from, e.g. sft_multistep,prm,grpo_prm_learned")
    p.add_argument("--jobs", type=at_least(1), default=2, help="stages run side by side, each with cpus/jobs threads "
                   "(default 2; 1: one after another in this process)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from ..data.rows import DataError
    from ..models.kernels import KernelSettingError
    from ..models.load import ModelLoadError
    from ..rollout.rewards import RewardError
    from ..train.checkpoint import CheckpointError
    from ..train.config import ConfigError
    from ..train.optim import NonFiniteError
    from ..train.run import Preempted

    try:
        return args.func(args)
    except (DataError, ModelLoadError, CheckpointError, ConfigError, NonFiniteError, RewardError, ConfigNotFound,
            KernelSettingError) as e:
        print(f"{_who(args)}: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"{_who(args)}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # SIGINT outside the training steps (loading, evaluating, saving the model)
        print(f"{_who(args)}: interrupted; the last complete checkpoint, if any, is kept "
              "(train.resume=true continues from it)", file=sys.stderr)
        return 130
    except OSError as e:  # a folder that cannot be written, a file that cannot be read
        print(f"{_who(args)}: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _who(args) -> str:
    """``rlhfkit METHOD``, and under torchrun the rank past 0 (each rank reports its own failure)."""
    rank = os.environ.get("RANK", "0")
    return f"rlhfkit {args.command}" + (f" (rank {rank})" if rank != "0" else "")


if __name__ == "__main__":
    sys.exit(main())

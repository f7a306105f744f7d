"""A ``README.md`` model card in every saved model folder, as TRL and the Hub write one.

It says what the folder is and how it was made: the method, the model it started from, the
data files, the final metrics and the whole resolved config, under Hub-style YAML front matter
(``base_model``, ``library_name``, ``tags``) so that a Hub upload shows it as a model page.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

METHOD_NAMES = {"sft": "supervised fine-tuning (SFT)", "rm": "a reward model (Bradley-Terry / K-way rankings)",
                "dpo": "DPO (direct preference optimization)",
                "cpo": "CPO / SimPO (preference optimization with no reference model)",
                "orpo": "ORPO (odds-ratio preference optimization: SFT and preferences in one loss, no reference model)",
                "online_dpo": "online DPO (DPO on pairs the model samples, judged as they are drawn)",
                "grpo": "GRPO (group relative policy optimization)",
                "rloo": "RLOO (REINFORCE with a leave-one-out baseline)",
                "kto": "KTO (Kahneman-Tversky optimization on unpaired answers)",
                "ppo": "PPO (InstructGPT stage 3)",
                "distill": "on-policy distillation (GKD: the generalized JSD to a teacher on the model's own answers)",
                "prm": "a process reward model (per-step binary cross-entropy)"}


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "org/name"


def _data_files(config: dict) -> dict[str, str]:
    return {k: v for k, v in config.items() if (k.endswith("_data") or k == "eval_prompts") and v}


def model_card(method: str, config: dict, metrics: dict, what: str = "model", legend: list[str] = ()) -> str:
    """The card's text: front matter, a summary, the final metrics (``legend``: a line each on
    what their kinds are) and the resolved config."""
    base = config.get("model") or "?"
    lora = config.get("lora") or {}
    adapter = bool(lora.get("r")) and not lora.get("merge")  # the folder is a peft adapter
    front = {"library_name": "peft" if adapter else "transformers", "tags": ["rlhfkit", method]}
    if HUB_ID.fullmatch(str(base)) and not Path(str(base)).exists():  # a local folder (or a model object passed
        front["base_model"] = str(base)  # from Python) is no base_model the Hub can link; TRL omits it too
    loader = _loader(what, config)
    # an adapter's base is loaded from its own config, whose head size is transformers' default (2)
    head = f", num_labels={config.get('num_labels', 1)}" if adapter and "Classification" in loader else ""
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {Path(str(config.get('train', {}).get('out_dir', what))).name}: {what} trained with rlhfkit", "",
             f"- method: {METHOD_NAMES.get(method, method)}",
             f"- base model: `{base}`"]
    lines += [f"- {k}: `{v}`" for k, v in _data_files(config).items()]
    lines += ["", "## Final metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_number(v)} |" for k, v in metrics.items() if isinstance(v, (int, float, str)) and v != ""]
    if legend:
        lines += [""] + [f"- {line}" for line in legend]
    lines += ["", "## Use", "", "```python", f"from transformers import AutoTokenizer, {loader}", "",
              f'model = {loader}.from_pretrained("PATH_TO_THIS_FOLDER"{head})',
              'tokenizer = AutoTokenizer.from_pretrained("PATH_TO_THIS_FOLDER")', "```", "",
              "## Resolved config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def _loader(what: str, config: dict) -> str:
    """The transformers class that loads the folder: a score head's, or the causal LM's."""
    if what in ("reward model", "critic"):
        return "AutoModelForSequenceClassification"
    if what == "process reward model" and config.get("readout") != "likelihood":
        return "AutoModelForTokenClassification"
    return "AutoModelForCausalLM"


def _number(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if not isinstance(value, str) else value


def write_model_card(folder: str | Path, method: str, config: dict, metrics: dict, what: str = "model",
                     legend: list[str] = ()) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(method, config, metrics, what, legend))
    return path

"""Value tests of the config layer: overrides, YAML + override merging, type checks, replace."""

import re
from dataclasses import dataclass, field

import pytest

from rlhfkit.train.config import ConfigError, TrainConfig, load_config, parse_overrides, replace


@dataclass(frozen=True)
class Cfg:
    name: str = "base"
    steps: int = 3
    ratio: float = 0.5
    flag: bool = False
    train: TrainConfig = field(default_factory=TrainConfig)


def test_parse_overrides_values_and_types():
    out = parse_overrides(["a.b=1", "c=x", "d=1e-3", "e=true", "f.g.h=2.5", "a.k=", "m=a=b"])
    parsed = {"a": {"b": out["a"]["b"].parsed, "k": out["a"]["k"].parsed}, "c": out["c"].parsed, "d": out["d"].parsed,
              "e": out["e"].parsed, "f": {"g": {"h": out["f"]["g"]["h"].parsed}}, "m": out["m"].parsed}
    assert parsed == {"a": {"b": 1, "k": ""}, "c": "x", "d": "1e-3", "e": True, "f": {"g": {"h": 2.5}}, "m": "a=b"}
    assert type(parsed["a"]["b"]) is int and type(parsed["e"]) is bool and type(parsed["f"]["g"]["h"]) is float
    assert out["a"]["b"].text == "1" and out["m"].text == "a=b"
    # PyYAML reads YAML 1.1: "1e-3" (no dot) stays a string; the typed conversion below makes it a float
    assert load_config(Cfg, overrides=["ratio=1e-3"]).ratio == 0.001
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["noequals"])


def test_load_config_merges_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from_yaml\nsteps: 7\ntrain:\n  lr: 0.01\n  max_steps: 20\n")
    cfg = load_config(Cfg, path, ["train.lr=2e-3", "flag=yes"])
    assert cfg.name == "from_yaml" and cfg.steps == 7 and cfg.flag is True  # yaml, yaml, override
    assert cfg.train.lr == 0.002 and type(cfg.train.lr) is float  # override wins over the yaml 0.01
    assert cfg.train.max_steps == 20  # the yaml's other train key survives the nested override
    assert cfg.train.schedule == "cosine" and cfg.ratio == 0.5  # untouched defaults
    assert load_config(Cfg, path, {"train": {"seed": 4}}).train == TrainConfig(lr=0.01, max_steps=20, seed=4)


def test_unknown_key_is_named_with_its_prefix():
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): train\.lrr;"):
        load_config(Cfg, overrides=["train.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key\(s\): bogus;"):
        load_config(Cfg, overrides=["bogus=1"])


def test_unknown_keys_of_every_level_are_named_in_one_error():
    """One run names them all (it named one nesting level a run), each level with its known keys."""
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, overrides=["bogus=1", "train.lrr=1", "train.learning_rate=1"])
    said = str(e.value)
    assert said.startswith("unknown config key(s): bogus, train.learning_rate, train.lrr; ")
    assert "; TRL's names, rlhfkit's: train.learning_rate -> train.lr; " in said  # each level's hints too
    assert "; known: flag, name, ratio, steps, train; known under train: activation_checkpointing, " in said
    assert e.value.keys == ("bogus", "train.learning_rate", "train.lrr")
    # a near miss gets its likely key; one TRL names otherwise gets only TRL's hint; no guess for bogus
    assert "; did you mean: train.lrr -> train.lr; known: " in said


def test_a_misspelt_key_is_offered_the_known_key_it_is_closest_to():
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, overrides=["ratoi=1", "train.max_step=3", "train.sead=1"])
    said = str(e.value)
    assert "did you mean: ratoi -> ratio; train.max_step -> train.max_steps; train.sead -> train.seed; " in said
    with pytest.raises(ConfigError) as e:  # a key at the wrong level: the level that has it
        load_config(Cfg, overrides=["keep_checkpoints=1", "train.flag=true"])
    assert "did you mean: keep_checkpoints -> train.keep_checkpoints; train.flag -> flag; " in str(e.value)
    from rlhfkit.methods.sft import SFTConfig

    with pytest.raises(ConfigError) as e:  # data: as close to eval_data in spelling, but meant train_data
        load_config(SFTConfig, overrides=["data=rows.jsonl"])
    assert "did you mean: data -> train_data; " in str(e.value)


def test_an_error_about_a_key_the_file_sets_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: x\ntrain:\n  seed: 2\n  lr: fast\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:4: config key 'train.lr' expects float, got 'fast'$"):
        load_config(Cfg, path)
    # a value given by an override is the override's: no line of the file is named
    with pytest.raises(ConfigError, match=r"^config key 'train.lr' expects float, got 'slow'$"):
        load_config(Cfg, path, ["train.lr=slow"])
    path.write_text("name: x\ntrain:\n  seed: 2\n  lol: 1\nbogus: 1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} \(lines 4, 5\): unknown config key\(s\): bogus, train.lol;"):
        load_config(Cfg, path)
    # a check after the types (the value's range) points at the file's line too
    path.write_text("name: x\ntrain:\n  seed: -1\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:3: config key 'train.seed' must be >= 0; got -1$"):
        load_config(Cfg, path)


def test_every_wrong_type_of_a_level_is_named_in_one_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: five\nflag: maybe\ntrain:\n  lr: fast\n  seed: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(Cfg, path)
    said = str(e.value)
    for key in ("steps", "flag", "train.lr", "train.seed"):
        assert f"config key '{key}' expects" in said
    assert said.startswith(f"{path} (lines 1, 2, 4, 5): ")


@pytest.mark.parametrize("override, key", [
    ("train.lr=fast", "train.lr"), ("steps=1.5", "steps"), ("flag=maybe", "flag"), ("train=5", "train"),
])
def test_wrong_type_is_named(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_config(Cfg, overrides=[override])


def test_a_text_field_takes_the_text_as_typed():
    """YAML would make 3 a number and strip '; ' to ';': a text field keeps what was typed; null is None."""
    assert load_config(Cfg, overrides=["name=3"]).name == "3"
    assert load_config(Cfg, overrides=["name=; "]).name == "; "
    assert load_config(Cfg, overrides=["train.out_dir=2024", "train.resume=auto"]).train.out_dir == "2024"
    assert load_config(Cfg, overrides=["train.resume=true"]).train.resume is True  # bool | str: the YAML value


def test_numbers_are_converted():
    cfg = load_config(Cfg, overrides=["steps=1e3", "train.max_steps=2E2", "ratio=2", "train.warmup_steps=5"])
    assert cfg.steps == 1000 and type(cfg.steps) is int  # int(float("1e3"))
    assert cfg.train.max_steps == 200 and cfg.train.warmup_steps == 5
    assert cfg.ratio == 2.0 and type(cfg.ratio) is float  # an int given for a float is widened


def test_non_integral_exponent_for_an_int_is_refused():
    with pytest.raises(ConfigError, match="config key 'steps'"):
        load_config(Cfg, overrides=["steps=2.5e0"])


def test_nested_replace():
    cfg = load_config(Cfg, overrides=["train.seed=3"])
    new = replace(cfg, train__lr=0.5, steps=9)
    assert new.train.lr == 0.5 and new.steps == 9
    assert new.train.seed == 3 and new.train.max_steps == 100  # other nested fields kept
    assert cfg.train.lr == 1e-4 and cfg.steps == 3  # the original is untouched


def test_lora_target_modules_may_be_a_yaml_list(tmp_path):
    """A YAML list (in a file or an override) is the comma-separated text; anything but names is refused."""
    from rlhfkit.methods.sft import SFTConfig

    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\n  target_modules:\n    - q_proj\n    - v_proj\n")
    assert load_config(SFTConfig, path).lora.target_modules == "q_proj,v_proj"
    assert load_config(SFTConfig, overrides=["lora.r=4", "lora.target_modules=[q_proj, o_proj]"]).lora.target_modules \
        == "q_proj,o_proj"
    assert load_config(SFTConfig, overrides=["lora.r=4", "lora.target_modules=q_proj,k_proj"]).lora.target_modules \
        == "q_proj,k_proj"
    with pytest.raises(ConfigError, match="'lora.target_modules' must list module names; got \\[1, 2\\]"):
        load_config(SFTConfig, overrides=["lora.target_modules=[1, 2]"])
    with pytest.raises(ConfigError, match="'lora.target_modules' is empty"):
        load_config(SFTConfig, overrides=["lora.target_modules=[]"])
    for bad in ("5", "null"):
        with pytest.raises(ConfigError, match="'lora.target_modules' must be all-linear or module names"):
            load_config(SFTConfig, overrides=[f"lora.target_modules={bad}"])


def test_a_resume_may_change_cadence_length_and_engine_but_not_what_the_steps_compute():
    from rlhfkit.train.config import resume_changes

    saved = {"beta": 0.1, "eval_limit": 8, "train": {"lr": 1e-3, "max_steps": 4, "save_every": 2},
             "rollout": {"backend": "sampler"}, "lora": {"r": 0}}
    now = {"beta": 0.2, "eval_limit": 16, "train": {"lr": 1e-3, "max_steps": 8, "save_every": 2, "seed": 1},
           "rollout": {"backend": "vllm"}, "lora": {"r": 8}}
    allowed, refused = resume_changes(saved, now)
    assert allowed == ["eval_limit: 8 -> 16", "train.max_steps: 4 -> 8", "rollout.backend: 'sampler' -> 'vllm'"]
    assert refused == ["beta: 0.1 -> 0.2", "lora.r: 0 -> 8"]  # train.seed is not in the saved config: not compared


@pytest.mark.parametrize("before, after, allowed", [("precompute", "forward", True), ("forward", "precompute", True),
                                                    ("precompute", "none", False), ("none", "forward", False)])
def test_a_resume_may_change_how_the_reference_is_computed_but_not_drop_or_add_it(before, after, allowed):
    # none leaves the reference out of the loss: a DPO run would go on reference-free, a CPO run as DPO
    from rlhfkit.train.config import resume_changes

    said = [f"reference: {before!r} -> {after!r}"]
    assert resume_changes({"reference": before}, {"reference": after}) == ((said, []) if allowed else ([], said))


@pytest.mark.parametrize("override", ["=3", "train.=3", ".lr=3"])
def test_an_override_without_a_key_is_refused_by_name(override):
    with pytest.raises(ConfigError, match=f"override '{override}': a key before '=' is missing"):
        parse_overrides([override])


def test_trls_names_for_config_keys_are_answered_with_rlhfkits():
    from rlhfkit.methods.grpo import GRPOConfig

    with pytest.raises(ConfigError, match=r"unknown config key\(s\): learning_rate, num_generations; TRL's names, "
                                          r"rlhfkit's: learning_rate -> train\.lr; num_generations -> group_size; known: "):
        load_config(GRPOConfig, None, ["learning_rate=1e-6", "num_generations=4"])
    with pytest.raises(ConfigError, match=r"train\.num_train_epochs -> train\.epochs"):
        load_config(GRPOConfig, None, ["train.num_train_epochs=3"])
    with pytest.raises(ConfigError, match=r"loss_type=bnpo .* loss_type=dapo is the token mean over the whole batch"):
        load_config(GRPOConfig, None, ["loss_type=bnpo"])  # TRL's value: was "must be one of ...; got 'bnpo'"
    from rlhfkit.methods.rm import RMConfig

    with pytest.raises(ConfigError, match=r"num_labels -> nothing: a reward model has one output, its score"):
        load_config(RMConfig, None, ["num_labels=1"])
    from rlhfkit.methods.dpo import DPOConfig

    with pytest.raises(ConfigError) as e:  # TRL's PEFT keys: lora_alpha was offered DPO's ld_alpha, LD-DPO's weight
        load_config(DPOConfig, None, ["use_peft=true", "lora_r=8", "lora_alpha=16", "lora_target_modules=q_proj"])
    assert ("TRL's names, rlhfkit's: lora_alpha -> lora.alpha; lora_r -> lora.r; lora_target_modules -> "
            "lora.target_modules; use_peft -> lora.r (adapters are on where lora.r > 0); ") in str(e.value)
    assert "ld_alpha" not in str(e.value).split("; known")[0]


def test_trls_rloo_and_kto_names_are_answered_as_those_methods_read_them(tmp_path):
    from rlhfkit.methods.kto import KTOConfig
    from rlhfkit.methods.rloo import RLOOConfig
    from rlhfkit.models.load import ModelLoadError, load_tokenizer

    # TRL's RLOOTrainer before 0.20 (PPO-like names) and today's, where another method reads them otherwise
    for trl, ours in (("rloo_k=4", "rloo_k -> group_size"), ("kl_coef=0.05", "kl_coef -> beta"),
                      ("cliprange=0.2", "cliprange -> eps_low"), ("num_ppo_epochs=2", "num_ppo_epochs -> mu"),
                      ("reward_model_path=rm", "reward_model_path -> rewards \\(rm:PATH"),
                      ("max_prompt_length=64", "max_prompt_length -> nothing: GRPO's and RLOO's prompts are not cut")):
        with pytest.raises(ConfigError, match=ours):
            load_config(RLOOConfig, None, [trl])
    for trl in ("max_completion_length=8", "max_prompt_length=8"):
        with pytest.raises(ConfigError, match=trl.split("=")[0] + r" -> max_length \(prompt and answer together"):
            load_config(KTOConfig, None, [trl])
    with pytest.raises(ConfigError, match="precompute_ref_log_probs -> nothing: KTO forwards its reference"):
        load_config(KTOConfig, None, ["precompute_ref_log_probs=true"])
    # a shipped config after an SFT run that never wrote its snapshot: the final model is named
    (tmp_path / "runs" / "sft" / "model").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"never did; start from its final model: model=.*runs/sft/model"):
        load_tokenizer(str(tmp_path / "runs" / "sft" / "snapshot"))


def test_trl_hints_name_only_what_the_method_has_and_rows_given_in_python_are_described():
    from rlhfkit.methods.dpo import DPOConfig
    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.methods.ppo import PPOConfig
    from rlhfkit.methods.sft import SFTConfig
    from rlhfkit.train.config import plain_dict

    with pytest.raises(ConfigError, match=r"per_device_train_batch_size -> prompts_per_step .*TRL's GRPO and RLOO count "
                                          r"completions per device"):
        load_config(GRPOConfig, None, ["per_device_train_batch_size=8"])
    for trl, ours in (("reward_weights=[1, 2]", "reward_weights -> rewards \\(name:weight"),
                      ("vllm_importance_sampling_mode=token_mask", "-> sampling_correction \\(the same four modes"),
                      ("router_aux_loss_coef=0.1", "router_aux_loss_coef -> train.router_aux_loss_coef")):
        with pytest.raises(ConfigError, match=ours):
            load_config(GRPOConfig, None, [trl])
    assert load_config(GRPOConfig, None, ["scale_rewards=batch"]).scale_rewards == "batch"  # TRL's name and values
    with pytest.raises(ConfigError, match="loss_weights -> loss_type \\(name:weight"):
        load_config(DPOConfig, None, ["loss_weights=[1, 0.5]"])
    with pytest.raises(ConfigError, match=r"precompute_ref_log_probs -> reference \(precompute"):
        load_config(DPOConfig, None, ["precompute_ref_log_probs=true"])
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, ["num_generations=4"])
    assert "TRL's names" not in str(err.value)  # DPO has no group_size
    with pytest.raises(ConfigError) as err:
        load_config(GRPOConfig, None, ["loss_weights=1"])
    assert "TRL's names" not in str(err.value)  # GRPO's loss_type takes no weights
    # TRL 1.16's remaining SFT, DPO and GRPO fields are answered too, each only where it applies
    with pytest.raises(ConfigError, match=r"chat_template_path -> tokenizer \(a folder whose tokenizer holds the chat template"):
        load_config(SFTConfig, None, ["chat_template_path=t.jinja"])
    with pytest.raises(ConfigError, match=r"vllm_group_port -> nothing: TRL's vLLM server mode is not here"):
        load_config(GRPOConfig, None, ["vllm_group_port=51216"])
    with pytest.raises(ConfigError, match=r"eval_strategy -> train.eval_every \(steps between evals"):
        load_config(SFTConfig, None, ["eval_strategy=steps"])  # not "did you mean eval_task"
    with pytest.raises(ConfigError, match=r"local_rollout_forward_batch_size -> train.micro_batch_size"):
        load_config(PPOConfig, None, ["local_rollout_forward_batch_size=4"])
    with pytest.raises(ConfigError, match=r"per_device_train_batch_size -> prompts_per_step \(prompts a step, over all "
                                          r"ranks, one answer each; TRL's PPO batch"):
        load_config(PPOConfig, None, ["per_device_train_batch_size=4"])
    with pytest.raises(ConfigError, match=r"padding_free -> share_prompt \(each prompt once"):
        load_config(DPOConfig, None, ["padding_free=true"])
    with pytest.raises(ConfigError, match=r"padding_free -> packing"):
        load_config(SFTConfig, None, ["padding_free=true"])
    for key in ("remove_unused_columns=false", "max_tool_calling_iterations=2", "vllm_importance_sampling_cap=2"):
        with pytest.raises(ConfigError, match=key.split("=")[0] + " -> "):
            load_config(GRPOConfig, None, [key])
    assert load_config(DPOConfig, None, ["loss_type=[sigmoid, nca_pair]"]).loss_type == "sigmoid,nca_pair"  # TRL's list
    assert load_config(GRPOConfig, None, ["rewards=[exact_answer, contains_answer]"]).rewards == "exact_answer,contains_answer"
    with pytest.raises(ConfigError) as err:
        load_config(DPOConfig, None, ["packing_strategy=bfd"])
    assert "TRL's names" not in str(err.value)  # DPO has no packing
    config = plain_dict(SFTConfig(train_data={"prompt": ["a", "b"], "completion": ["c", "d"]},
                                  eval_data=[{"prompt": "a", "completion": "c"}]))
    assert config["train_data"] == "<dict of 2 columns, 2 rows>" and config["eval_data"] == "<list of 1 rows>"


def test_lora_settings_without_a_rank_are_refused_not_ignored():
    from rlhfkit.train.config import LoraConfig

    with pytest.raises(ConfigError, match=r"lora.alpha, lora.merge set but lora.r is 0 \(no adapters"):
        LoraConfig(alpha=32.0, merge=True)
    assert LoraConfig(r=8, alpha=32.0, merge=True).merge


def test_a_text_field_typed_as_a_newline_or_spaces_keeps_them():
    """``step_separator=$'\\n'`` (a newline, from bash) was read by YAML as null: "expects str"."""
    from rlhfkit.methods.prm import PRMConfig

    for typed in ("\n", "  "):
        cfg = load_config(PRMConfig, None, [f"step_separator={typed}", "model=m", "train_data=d.jsonl"])
        assert cfg.step_separator == typed
    assert load_config(PRMConfig, None, ["step_separator=; ", "model=m", "train_data=d.jsonl"]).step_separator == "; "


def test_every_trl_hint_names_a_key_some_method_has():
    """A hint that named a key no config has would send a user from one unknown key to another."""
    import dataclasses

    from rlhfkit.methods.distill import DistillConfig
    from rlhfkit.methods.dpo import DPOConfig
    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.methods.ppo import PPOConfig
    from rlhfkit.methods.prm import PRMConfig
    from rlhfkit.methods.rm import RMConfig
    from rlhfkit.methods.sft import SFTConfig
    from rlhfkit.train.config import TRL_NAMES

    def paths(cls, prefix=""):
        for f in dataclasses.fields(cls):
            yield prefix + f.name
            inner = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(inner):  # train., lora., rollout.
                yield from paths(type(inner), prefix + f.name + ".")

    known = {p for cls in (SFTConfig, RMConfig, DPOConfig, GRPOConfig, PPOConfig, PRMConfig, DistillConfig)
             for p in paths(cls)}
    targets = {trl: hint.split(" ")[0].split("=")[0] for trl, hint in TRL_NAMES.items() if not hint.startswith("nothing")}
    assert {trl: t for trl, t in targets.items() if t not in known} == {}
    assert targets["use_vllm"] == "rollout.backend" and targets["whiten_rewards"] == "whiten_scores"


def test_trls_reference_sync_names_are_dpos_and_grpos_own():
    from rlhfkit.methods.dpo import DPOConfig
    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.methods.kto import KTOConfig

    cfg = load_config(DPOConfig, overrides=["sync_ref_model=true", "reference=forward", "ref_model_sync_steps=64"])
    assert cfg.sync_ref_model is True and cfg.ref_model_sync_steps == 64 and cfg.ref_model_mixup_alpha == 0.6
    assert load_config(GRPOConfig, overrides=["sync_ref_model=true"]).ref_model_sync_steps == 512  # TRL's default
    with pytest.raises(ConfigError, match=r"ref_model_mixup_alpha=0.5 is used by TR-DPO's reference sync "
                                          r"\(sync_ref_model=true\) only"):
        load_config(GRPOConfig, overrides=["ref_model_mixup_alpha=0.5"])
    with pytest.raises(ConfigError, match="sync_ref_model -> nothing: KTO's reference stays the start model"):
        load_config(KTOConfig, overrides=["sync_ref_model=true"])

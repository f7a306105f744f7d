"""One meaning per config field, checked when the config is read (before any model loads)."""

import pytest
import yaml

from rlhfkit.methods.common import head
from rlhfkit.methods.dpo import DPOConfig
from rlhfkit.methods.grpo import GRPOConfig, run_grpo
from rlhfkit.methods.online_dpo import OnlineDPOConfig
from rlhfkit.methods.ppo import PPOConfig, run_ppo
from rlhfkit.methods.prm import PRMConfig
from rlhfkit.methods.rm import RMConfig
from rlhfkit.methods.sft import SFTConfig
from rlhfkit.train.config import ConfigError, load_config, plain_dict


def test_each_method_has_its_own_default_out_dir_even_with_train_overrides():
    for cls, name in ((SFTConfig, "sft"), (RMConfig, "rm"), (DPOConfig, "dpo"), (GRPOConfig, "grpo"),
                      (PPOConfig, "ppo"), (PRMConfig, "prm")):
        assert cls().train.out_dir == f"runs/{name}"
        assert load_config(cls, None, ["train.lr=1e-3"]).train.out_dir == f"runs/{name}"  # nested keys merge


def test_eval_limit_zero_means_all_rows():
    rows = list(range(7))
    assert head(rows, 0) == rows and head(rows, 3) == [0, 1, 2]


@pytest.mark.parametrize("cls, override, message", [
    (GRPOConfig, "loss_type=grpoo", "'loss_type' must be one of grpo, dapo, dr_grpo, cispo, sapo, luspo, rloo, vespo; got 'grpoo'"),
    (SFTConfig, "train.schedule=cosin", "'train.schedule' must be one of cosine, constant, linear; got 'cosin'"),
    (SFTConfig, "overlong=cut", "'overlong' must be one of error, truncate, skip; got 'cut'"),
    (GRPOConfig, "rewards=exact", "'rewards' must be one of exact_answer, contains_answer; got 'exact'"),
    (GRPOConfig, "process_reward=steps", "'process_reward' must be one of arithmetic_steps, prm:PATH; got 'steps'"),
    (GRPOConfig, "process_reward=prm:no/such", "'process_reward': folder not found: no/such"),
    (GRPOConfig, "rewards=exact_answer,rm:no/such:0.5", "'rewards': folder not found: no/such"),
    (GRPOConfig, "delta=1.1", "config key 'delta' must be > 1 + eps_high = 1.2"),
    (GRPOConfig, "scale_std=false", "renamed: scale_std -> scale_rewards (scale_std=true is scale_rewards=group"),
    (GRPOConfig, "scale_rewards=batch process_reward=arithmetic_steps", "scale_rewards=batch scales outcome advantages"),
    (GRPOConfig, "top_entropy_quantile=-0.1", "config key 'top_entropy_quantile' must be in [0, 1]; got -0.1"),
    (GRPOConfig, "loss_type=cispo delta=2", "delta caps the clipped ratio of the other loss types"),
    (GRPOConfig, "use_adaptive_entropy=true entropy_coef=2", "use_adaptive_entropy keeps entropy_coef, its starting value (2.0), within [entropy_coef_min, entropy_coef_max] = [0.0, 1.0]"),
    (OnlineDPOConfig, "loss_type=aot", "loss_type=aot (AOT) compares the distributions of a batch's pairs"),
    (GRPOConfig, "entropy_target=1.5", "entropy_target=1.5 is used by use_adaptive_entropy=true only"),
    (GRPOConfig, "use_adaptive_entropy=true entropy_coef_min=0.5 entropy_coef_max=0.1", "within [entropy_coef_min, entropy_coef_max] = [0.5, 0.1]"),
    (GRPOConfig, "use_adaptive_entropy=true top_entropy_quantile=0.2", "entropy_coef's bonus is over every answer token"),
    (GRPOConfig, "loss_type=vespo delta=2", "vespo has no clip to cap"),
    (GRPOConfig, "vespo_k_neg=2", "vespo_k_neg=2.0 is used by loss_type=vespo only"),
    (GRPOConfig, "loss_type=vespo vespo_lambda_pos=0", "config key 'vespo_lambda_pos' must be > 0; got 0"),
    (GRPOConfig, "loss_type=vespo eps_high=0.3", "eps_high=0.3 is used by a clipped loss_type (not sapo or vespo) only"),
    (GRPOConfig, "loss_type=vespo rollout.backend=generate", "loss_type=vespo puts the sampling weights pi_old / pi_sampler into each answer's ratio"),
    (GRPOConfig, "scale_rewards=false", "'scale_rewards' takes group, batch or none; TRL's false is none"),
    (GRPOConfig, "scale_rewards=grp", "'scale_rewards' must be one of group, batch, none; got 'grp'"),
    (SFTConfig, "train.router_aux_loss_coef=.inf", "'train.router_aux_loss_coef' must be finite"),
    (PRMConfig, "num_labels=3", "'num_labels' must be one of 1, 2; got 3"),
    (PPOConfig, "frozen_dtype=fp8", "'frozen_dtype' must be one of fp32, bf16; got 'fp8'"),
    (DPOConfig, "reference=nothing", "'reference' must be one of precompute, forward, none; got 'nothing'"),
    (DPOConfig, "loss_type=kto", "'loss_type' must be one of sigmoid, robust, exo_pair, ipo, sigmoid_norm, hinge, nca_pair, sppo_hard, bco_pair, apo_zero, apo_down, discopop, aot, aot_unpaired, simpo, orpo; got 'kto'"),
    (DPOConfig, "loss_type=aot_pair", "'loss_type': aot_pair is TRL's; its form is loss_type=aot_unpaired (TRL's later name)"),
    (DPOConfig, "loss_type=bco_pair reference=none", "loss_type=bco_pair (BCO) classifies each answer's reward"),
    (OnlineDPOConfig, "loss_type=bco_pair", "loss_type=bco_pair keeps a running reward shift across the steps"),
    (DPOConfig, "loss_type=aot reference=none", "loss_type=aot (AOT) sorts log-ratios to a reference, and reference=none has none"),
    (DPOConfig, "loss_type=sigmoid,aot_unpaired use_weighting=true", "use_weighting weighs each pair's loss, and loss_type=aot_unpaired (AOT) sorts the batch"),
    (DPOConfig, "loss_type=sigmoid,sft", "'loss_type': sft is TRL's; the chosen answers' NLL is rpo_alpha=WEIGHT here"),
    (DPOConfig, "loss_type=sigmoid:0.8,nca_pair:-1", "'loss_type': 'nca_pair:-1' must be name[:weight] with a weight > 0"),
    (DPOConfig, "loss_type=ipo,ipo:2", "'loss_type': 'ipo:2' must be name[:weight] with a weight > 0, each name once"),
    (DPOConfig, "loss_type=exo_pair", "loss_type=exo_pair needs label_smoothing > 0"),
    (DPOConfig, "discopop_tau=0.1", "discopop_tau=0.1 is used by loss_type=discopop only"),
    (DPOConfig, "label_smoothing=0.5", "'label_smoothing' must be in [0, 0.5) (0.5 ignores the labels); got 0.5"),
    (DPOConfig, "label_smoothing=-0.1", "'label_smoothing' must be in [0, 0.5)"),
    (DPOConfig, "label_smoothing=null", "config key 'label_smoothing' expects float, got None"),
    (DPOConfig, "label_smoothing=0.1 loss_type=ipo", "label_smoothing=0.1 is used by loss_type sigmoid or robust or exo_pair or simpo or aot or aot_unpaired only"),
    (PPOConfig, "ptx_max_length=64", "ptx_max_length=64 is used by PPO-ptx (ptx_data) only"),
    (SFTConfig, "train.dtype=fp8", "'train.dtype' must be one of fp32, bf16; got 'fp8'"),
    (GRPOConfig, "rollout.backend=vllm2", "'rollout.backend' must be one of sampler, generate, vllm; got 'vllm2'"),
    (SFTConfig, "eval_task=math", "'eval_task' must be one of auto, arithmetic, reference; got 'math'"),
    (SFTConfig, "train.batch_size=0", "'train.batch_size' must be >= 1; got 0"),
])
def test_enumerated_and_ranged_values_fail_in_one_line_when_read(cls, override, message):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, override.split())
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fields_grpo_and_ppo_would_ignore_are_refused(tmp_path):
    # train.batch_size counts offline rows; GRPO and PPO size their batches in prompts.
    for run, cfg in ((run_grpo, GRPOConfig(train=load_config(SFTConfig, None, ["train.batch_size=64"]).train)),
                     (run_ppo, PPOConfig(train=load_config(SFTConfig, None, ["train.batch_size=64"]).train))):
        with pytest.raises(ConfigError, match="train.batch_size does not apply"):
            run(cfg)


def test_an_online_methods_batch_size_set_in_a_file_or_override_is_refused_even_at_its_default(tmp_path):
    """From Python an explicit 32 (the default) cannot be told apart; a file or override that sets it
    can: every online method refuses it before anything loads, with the file's line."""
    from rlhfkit.methods.distill import DistillConfig
    from rlhfkit.methods.online_dpo import OnlineDPOConfig
    from rlhfkit.methods.rloo import RLOOConfig

    config = tmp_path / "run.yaml"
    config.write_text("model: m\ntrain:\n  lr: 1.0e-5\n  batch_size: 32\n")
    for cls in (GRPOConfig, RLOOConfig, PPOConfig, OnlineDPOConfig, DistillConfig):
        with pytest.raises(ConfigError, match=r"^config key 'train.batch_size' does not apply here \(it counts rows"):
            load_config(cls, None, ["train.batch_size=32"])
        with pytest.raises(ConfigError, match=rf"^{config}:4: config key 'train.batch_size' does not apply"):
            load_config(cls, config)
    assert load_config(SFTConfig, config, ["train.batch_size=32"]).train.batch_size == 32
    saved = tmp_path / "saved.yaml"  # a run's config.yaml leaves the key out: it loads back (--config runs/grpo/...)
    saved.write_text(yaml.safe_dump(plain_dict(GRPOConfig(model="m", group_size=4))))
    assert load_config(GRPOConfig, saved) == GRPOConfig(model="m", group_size=4)
    assert "batch_size" in plain_dict(SFTConfig())["train"]


def test_a_recorded_config_of_rows_passed_from_python_is_refused_when_read(tmp_path):
    """A run given a datasets object records it as a description; --config on that config.yaml is
    told so with its line, before any model loads (it failed later, as a file not found)."""
    import datasets

    saved = tmp_path / "config.yaml"
    rows = datasets.Dataset.from_list([{"prompt": "What is 1+2?", "answer": 3}] * 4)
    saved.write_text(yaml.safe_dump(plain_dict(GRPOConfig(model="m", train_data=rows))))
    with pytest.raises(ConfigError, match=rf"^{saved}:\d+: config key 'train_data' is '<datasets.arrow_dataset.Dataset, "
                                          "4 rows>', the record of rows passed from Python"):
        load_config(GRPOConfig, saved)
    assert load_config(GRPOConfig, saved, ["train_data=p.jsonl"]).train_data == "p.jsonl"


def test_a_label_smoothing_of_none_from_python_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'label_smoothing' must be in \[0, 0.5\)"):
        DPOConfig(label_smoothing=None)

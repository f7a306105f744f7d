"""A discoverable CLI and API, plots, tracking and model cards (issue #15, items 5-7)."""

import json
import os
from pathlib import Path

import pytest
from helpers import quiet_train
from test_cli import ENV, rlhfkit

import rlhfkit as api
from rlhfkit.cli.help import field_rows
from rlhfkit.train.config import ConfigError, TrainConfig


def test_sft_help_lists_every_config_field_with_type_default_and_description():
    out = rlhfkit("sft", "--help")
    assert out.returncode == 0, out.stderr
    rows = field_rows(api.SFTConfig)
    assert len(rows) >= 35  # the method's own fields, lora.* and train.*
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:] if line.startswith("  ") and
             line.split() and (line.split()[0].startswith(("train.", "lora.")) or line.split()[0] in
                               {r[0] for r in rows})}
    for name, kind, default, description in rows:
        line = lines[name]
        assert kind in line and f"= {default}" in line and description in line
    assert "train.epochs" in lines and "float" in lines["train.epochs"] and "= 0" in lines["train.epochs"]


def test_grpo_and_ppo_help_say_train_batch_size_is_not_theirs():
    from rlhfkit.cli.help import fields_help

    for cls in (api.GRPOConfig, api.PPOConfig, api.DistillConfig):
        (line,) = [x for x in fields_help(cls).splitlines() if x.split()[0] == "train.batch_size"]
        assert "not read by this method: prompts_per_step sizes its batches" in line
    (line,) = [x for x in fields_help(api.SFTConfig).splitlines() if x.split()[0] == "train.batch_size"]
    assert "not read" not in line


@pytest.mark.parametrize("method", ["sft", "rm", "dpo", "cpo", "orpo", "online_dpo", "kto", "grpo", "rloo", "ppo",
                                    "distill"])
def test_every_config_field_of_every_method_has_a_description(method):
    cls = {"sft": api.SFTConfig, "rm": api.RMConfig, "dpo": api.DPOConfig, "cpo": api.CPOConfig,
           "orpo": api.ORPOConfig, "online_dpo": api.OnlineDPOConfig, "kto": api.KTOConfig,
           "grpo": api.GRPOConfig, "rloo": api.RLOOConfig, "ppo": api.PPOConfig, "distill": api.DistillConfig}[method]
    missing = [name for name, _, _, description in field_rows(cls) if not description]
    assert missing == []


def test_configs_command_lists_the_shipped_configs():
    out = rlhfkit("configs")
    assert out.returncode == 0
    for name in ("sft_tiny", "rm_tiny", "dpo_tiny", "cpo_tiny", "orpo_tiny", "online_dpo_tiny", "kto_tiny",
                 "grpo_tiny", "rloo_tiny", "ppo_tiny", "prm_tiny", "distill_tiny"):
        assert f"rlhfkit {name.rsplit('_', 1)[0]} --config {name}" in out.stdout


def test_a_cards_base_model_is_a_hub_id_only():
    from rlhfkit.models.card import model_card

    front = lambda base: model_card("sft", {"model": base}, {}).split("---")[1]  # noqa: E731
    assert "base_model: Qwen/Qwen2-0.5B" in front("Qwen/Qwen2-0.5B") and "base_model: gpt2" in front("gpt2")
    # a model object passed from Python is recorded by its description: no Hub page to link
    assert "base_model" not in front("<transformers.models.llama.modeling_llama.LlamaForCausalLM>")


def test_every_shipped_config_saves_checkpoints_to_resume_from():
    import yaml

    folder = Path(api.__file__).parent / "configs"
    for path in sorted(folder.glob("*.yaml")):
        every = yaml.safe_load(path.read_text())["train"].get("save_every", 0)
        assert 50 <= every <= 200, path.name  # as the README says: a kill loses at most that many steps


def test_the_package_exports_every_method_config_and_the_loss_helpers():
    for name in ("SFTConfig", "RMConfig", "DPOConfig", "CPOConfig", "ORPOConfig", "OnlineDPOConfig", "KTOConfig",
                 "GRPOConfig", "RLOOConfig", "PPOConfig", "PRMConfig", "run_cpo", "run_orpo", "run_online_dpo",
                 "TrainConfig", "run_kto", "run_rloo", "kto_loss", "loo_advantages",
                 "LoraConfig", "run_sft", "run_rm", "run_dpo", "run_grpo", "run_ppo", "run_prm", "dpo_loss",
                 "grpo_loss", "gae", "step_bce_loss",
                 "ranking_loss", "sft_loss", "exact_answer", "plot_runs", "write_tiny_default"):
        assert name in api.__all__ and callable(getattr(api, name))
    from rlhfkit.methods.sft import run_sft

    assert api.run_sft is run_sft
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        api.nope


def test_epochs_replaces_max_steps(tiny, tmp_path, capfd):
    from rlhfkit.data.rows import read_rows

    rows = [r.data for r in read_rows(tiny["data"] / "sft_eval.jsonl")[:40]]
    summary = api.run_sft(api.SFTConfig(model=str(tiny["base"]), train_data=rows, max_length=64,
                                        train=quiet_train(tmp_path / "run", epochs=1.5, max_steps=1000, batch_size=16)))
    assert summary["steps"] == 4  # ceil(1.5 x 40 / 16)
    assert "train.epochs wins over train.max_steps=1000, which is not read" in capfd.readouterr().err
    with pytest.raises(ConfigError, match="train.epochs"):
        TrainConfig(epochs=-1)


def test_short_cli_run_writes_plots_and_a_model_card(tiny, tmp_path):
    data, run = tiny["data"], tmp_path / "run"
    out = rlhfkit("sft", "--config", "sft_tiny", f"model={tiny['base']}", f"train_data={data / 'sft_train.jsonl'}",
                  f"eval_data={data / 'sft_eval.jsonl'}", "eval_limit=20", f"train.out_dir={run}",
                  "train.max_steps=6", "train.batch_size=16", "train.eval_every=3", "train.progress=false",
                  "train.log_every=1", "train.report_to=none")
    assert out.returncode == 0, out.stderr
    for name in ("loss", "eval"):
        png = (run / "plots" / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert not (run / "plots" / "kl.png").exists()  # SFT logs no KL
    card = (run / "model" / "README.md").read_text()
    final_loss = json.loads((run / "result.json").read_text())["loss"]
    assert f"- base model: `{tiny['base']}`" in card and f"| loss | {final_loss:.4g} |" in card
    assert "base_model:" not in card  # a local folder: no Hub id to link
    assert "supervised fine-tuning" in card and "sft_train.jsonl" in card and "max_steps: 6" in card
    # each final number once: the summary's loss, accuracy and eval_loss are not repeated as train/ or eval/
    assert "| train/loss |" not in card and "| eval/accuracy |" not in card and "| eval/loss |" not in card
    assert "| eval/n | 20 |" in card and "- `eval/`: the last eval's (optimizer step 6)" in card
    assert not (run / "tensorboard").exists()

    second = tmp_path / "run2"  # `rlhfkit plot` overlays two runs
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={data / 'sft_train.jsonl'}", "max_length=64",
                  f"train.out_dir={second}", "train.max_steps=3", "train.batch_size=8", "train.progress=false",
                  "train.log_every=1", "train.report_to=none", "train.plots=false", "train.lr=1e-3")
    assert out.returncode == 0 and not (second / "plots").exists()
    out = rlhfkit("plot", run, second, "--out", tmp_path / "both")
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["eval.png", "loss.png"]
    from rlhfkit.train.plots import read_curves

    assert len(read_curves(second)["train/loss"][0]) == 3


def test_report_to_wandb_offline(tiny, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    env = {**ENV, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}
    out = rlhfkit("sft", f"model={tiny['base']}", f"train_data={tiny['data'] / 'sft_train.jsonl'}", "max_length=64",
                  f"train.out_dir={run}", "train.max_steps=2", "train.batch_size=8", "train.progress=false",
                  "train.log_every=1", "train.report_to=wandb", "train.plots=false", env=env)
    assert out.returncode == 0, out.stderr
    offline = list((run / "wandb").glob("offline-run-*/*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_report_to_is_checked_when_the_config_is_read():
    with pytest.raises(ConfigError, match="train.report_to' must be one of tensorboard, wandb, none; got 'mlflow'"):
        TrainConfig(report_to="mlflow")
    assert os.environ.get("WANDB_MODE") != "online"  # the suite never reaches the network


def test_the_shipped_configs_chain():
    """Each shipped config starts from a folder an earlier one writes: DPO, GRPO and PPO from the
    SFT snapshot (so sft_tiny must take one), PPO's reward model from rm_tiny's output."""
    from rlhfkit.cli.main import resolve_config
    from rlhfkit.methods.cpo import CPOConfig
    from rlhfkit.methods.dpo import DPOConfig
    from rlhfkit.methods.grpo import GRPOConfig
    from rlhfkit.methods.kto import KTOConfig
    from rlhfkit.methods.online_dpo import OnlineDPOConfig
    from rlhfkit.methods.orpo import ORPOConfig
    from rlhfkit.methods.ppo import PPOConfig
    from rlhfkit.methods.rloo import RLOOConfig
    from rlhfkit.methods.rm import RMConfig
    from rlhfkit.methods.sft import SFTConfig
    from rlhfkit.train.config import load_config

    sft, rm = (load_config(cls, resolve_config(name)) for cls, name in ((SFTConfig, "sft_tiny"), (RMConfig, "rm_tiny")))
    written = {f"{sft.train.out_dir}/model", f"{rm.train.out_dir}/model"}
    if sft.snapshot_at_accuracy is not None:
        written.add(f"{sft.train.out_dir}/snapshot")
    assert rm.model in written
    for cls, name in ((DPOConfig, "dpo_tiny"), (CPOConfig, "cpo_tiny"), (ORPOConfig, "orpo_tiny"), (KTOConfig, "kto_tiny"),
                      (OnlineDPOConfig, "online_dpo_tiny"),
                      (GRPOConfig, "grpo_tiny"), (RLOOConfig, "rloo_tiny"),
                      (PPOConfig, "ppo_tiny")):
        cfg = load_config(cls, resolve_config(name))
        assert cfg.model in written, name
    ppo = load_config(PPOConfig, resolve_config("ppo_tiny"))
    assert {ppo.critic, ppo.reward_model} <= written
    from rlhfkit.methods.distill import DistillConfig

    distill = load_config(DistillConfig, resolve_config("distill_tiny"))
    assert {distill.model, distill.teacher} <= written and distill.model != distill.teacher

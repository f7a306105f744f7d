"""The tokenizer folders rlhfkit writes load in transformers 4 as in 5 (models/tokenizer.py ``save_tokenizer``)."""

import json

from rlhfkit.models.load import load_tokenizer, save_model
from rlhfkit.models.tokenizer import build_char_tokenizer


def test_saved_folders_name_the_tokenizer_class_both_transformers_load(tiny, tmp_path):
    # transformers 5 writes "TokenizersBackend", which transformers 4's AutoTokenizer refuses ("does not exist");
    # "PreTrainedTokenizerFast" is 4's class and 5's old name for the same one
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert json.loads((tiny["base"] / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    save_model(model, load_tokenizer(tiny["base"]), tmp_path / "model")
    config = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == "<eos>"
    text = "What is 12+34-5? 12+34=46; 46-5=41; Answer: 41"
    built = build_char_tokenizer()
    assert AutoTokenizer.from_pretrained(tmp_path / "model")(text).input_ids == built(text).input_ids
    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template == built.chat_template


def test_a_tokenizer_without_pad_pads_with_eos_and_the_saved_config_says_so(tiny, tmp_path):
    """As TRL, a tokenizer with no pad token pads with its EOS; the saved config.json names that
    id, as generation_config.json does (it kept null while the other said the EOS)."""
    from rlhfkit.models.load import load_causal_lm

    folder = tmp_path / "nopad"
    model = load_causal_lm(str(tiny["base"]), load_tokenizer(str(tiny["base"])))
    model.config.pad_token_id = None
    model.save_pretrained(folder)
    tok = build_char_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    tok = load_tokenizer(str(folder))
    assert tok.pad_token == tok.eos_token
    save_model(load_causal_lm(str(folder), tok), tok, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert config["pad_token_id"] == generation["pad_token_id"] == tok.eos_token_id

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

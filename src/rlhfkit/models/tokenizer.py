"""The tiny default's tokenizer: one token per character, built with the `tokenizers` library.

Saved as an ordinary ``PreTrainedTokenizerFast`` folder with eos, pad and unk tokens and a
chat template, so ``AutoTokenizer.from_pretrained`` loads it anywhere. Two pitfalls are
handled here: a raw `tokenizers` model appends no EOS (the data layer appends it), and a
WordLevel model needs a Fuse decoder, or " 55" would decode as "  5 5".
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each message is "<|role|>content"; an assistant turn ends with EOS, which is what the model
# learns to emit, and a generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` over printable ASCII plus the specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def save_char_tokenizer(out_dir: str | Path):
    tokenizer = build_char_tokenizer()
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


# transformers 5 names the class of a tokenizer read from tokenizer.json alone "TokenizersBackend"
# in the folders it saves; transformers 4 does not know that name, while both load a folder naming
# it "PreTrainedTokenizerFast" (5: the same class, under its old name) to the same ids
PORTABLE_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(tokenizer, out_dir: str | Path) -> None:
    """``tokenizer.save_pretrained(out_dir)``, its class written by the name transformers 4 and 5
    both load (``PORTABLE_CLASS``): a model trained under transformers 5 and served where 4 is
    pinned (some vLLM releases) loads its tokenizer. Other class names are written as they are."""
    import json

    tokenizer.save_pretrained(str(out_dir))
    path = Path(out_dir) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") in PORTABLE_CLASS:
        config["tokenizer_class"] = PORTABLE_CLASS[config["tokenizer_class"]]
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

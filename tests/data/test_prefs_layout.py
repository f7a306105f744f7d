"""The shared-prompt layout of rankings (data/prefs.py), checked by hand on a tiny batch."""

import torch

from rlhfkit.data.prefs import RankingExample, collate_shared_prompt


def test_shared_prompt_layout_by_hand():
    pad = 9
    examples = [RankingExample([5, 6], [[7], [8, 3]], [0, 1]),  # K = 2, a two-token prompt
                RankingExample([4], [[1, 2], [3], [6]], [2, 0, 1]),  # K = 3
                RankingExample([], [[7, 7]], [0])]  # an empty prompt: its first token has no prediction
    b = collate_shared_prompt(examples, pad)
    width = 5  # 1 + 2 + 1 + 1 tokens in the second row
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 3], [4, 1, 2, 3, 6], [7, 7, pad, pad, pad]]
    assert b.position_ids.tolist() == [[0, 1, 2, 2, 3], [0, 1, 2, 1, 1], [0, 1, 0, 0, 0]]
    assert b.ranks.tolist() == [[0, 1, 3], [2, 0, 1], [0, 3, 3]]  # missing outputs ranked K, masked out
    assert b.mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert b.last.tolist() == [2, 4, width + 2, width + 3, width + 4, 2 * width + 1]
    assert b.slot.tolist() == [0, 1, 3, 4, 5, 6]
    assert b.lengths.tolist() == [1, 2, 2, 1, 1, 1]  # tokens with a log-prob: not the empty prompt's first
    from rlhfkit.data.prefs import collate_rankings
    assert collate_rankings(examples, pad).output_lengths().tolist() == b.lengths.tolist()  # the same counts
    # each output token, the flat position that predicts it, and its output
    assert b.predecessor.tolist() == [1, 1, 3, width, width + 1, width, width, 2 * width]
    assert b.targets.tolist() == [7, 8, 3, 1, 2, 3, 6, 7]
    assert b.owner.tolist() == [0, 1, 1, 2, 2, 3, 4, 5]
    assert all(t.dtype == torch.long and t.is_contiguous() for t in (b.predecessor, b.targets, b.owner, b.last))
    # output 2 of row 1 (token 3 at column 3) sees the prompt and itself, not output 1 (columns 1-2)
    assert b.attend[1, 0, 3].tolist() == [True, False, False, True, False]
    # padding sees itself only; the second output of row 0 sees the prompt and its own earlier token
    assert b.attend[2, 0, 3].tolist() == [False, False, False, True, False]
    assert b.attend[0, 0, 4].tolist() == [True, True, False, True, True]


def test_reference_grid_pads_missing_outputs_with_zero():
    examples = [RankingExample([5], [[7], [8]], [0, 1], ref_logps=(-1.5, -2.25)),
                RankingExample([4], [[1], [3], [6]], [2, 0, 1], ref_logps=(-0.5, -3.0, -4.0))]
    grid = collate_shared_prompt(examples, 0).ref_logps
    assert grid.dtype == torch.float32 and grid.tolist() == [[-1.5, -2.25, 0.0], [-0.5, -3.0, -4.0]]
    assert collate_shared_prompt([RankingExample([5], [[7]], [0])], 0).ref_logps is None  # not all precomputed


def test_an_rm_pairs_margin_reaches_both_layouts_and_is_checked():
    import pytest

    from rlhfkit.data.prefs import collate_rankings, encode_rankings
    from rlhfkit.data.rows import DataError, Row
    from rlhfkit.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    rows = [Row("p.jsonl:1", {"prompt": "1+1=", "chosen": "2", "rejected": "3", "margin": 2.5}),
            Row("p.jsonl:2", {"prompt": "2+2=", "chosen": "4", "rejected": "5"})]
    examples, _ = encode_rankings(rows, tok, 32, method="rm")
    assert collate_rankings(examples, 0).margins.tolist() == [2.5, 0.0]
    assert collate_shared_prompt(examples, 0).margins.tolist() == [2.5, 0.0]
    assert collate_rankings(encode_rankings(rows[1:], tok, 32, method="rm")[0], 0).margins is None
    as_csv = [Row("p.csv:2", {**rows[0].data, "margin": "2.5"})]  # a CSV cell is text
    assert collate_rankings(encode_rankings(as_csv, tok, 32, method="rm")[0], 0).margins.tolist() == [2.5]
    assert collate_rankings(encode_rankings(rows, tok, 32, method="dpo")[0], 0).margins is None  # TRL's DPO reads none
    for bad, message in (({"margin": "high"}, "must be a finite number, got 'high'"),
                         ({"completions": ["a", "b", "c"], "margin": 1.0}, "applies to .* pairs, not to a ranking of 3")):
        row = {"prompt": "q", "chosen": "a", "rejected": "b", **bad}
        if "completions" in bad:
            row = {"prompt": "q", **bad}
        with pytest.raises(DataError, match=rf"p.jsonl:1: field 'margin' {message}"):
            encode_rankings([Row("p.jsonl:1", row)], tok, 32, method="rm")

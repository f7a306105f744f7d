import json
import re

import datasets
import pytest

from rlhfkit.data.encode import collate_sft, encode_sft
from rlhfkit.data.rows import DataError, read_rows
from rlhfkit.models.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_field_names_line_and_field(tmp_path, tok):
    path = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    with pytest.raises(DataError) as e:
        encode_sft(read_rows(path), tok, 64)
    assert f"{path}:2" in str(e.value) and "'completion'" in str(e.value)


def test_empty_completion_and_wrong_type(tmp_path, tok):
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "  "}])
    with pytest.raises(DataError, match=r"a.jsonl:1: field 'completion' is empty"):
        encode_sft(read_rows(path), tok, 64)
    path = _jsonl(tmp_path / "b.jsonl", [{"prompt": 3, "completion": "x"}])
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'prompt' must be a string, got int"):
        encode_sft(read_rows(path), tok, 64)


def test_empty_file_and_bad_json(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "brace.jsonl").write_text('{"prompt": "a", "completion": "b"\n')  # no closing brace
    with pytest.raises(DataError, match=r"brace.jsonl:1: not valid JSON \(Expecting ',' delimiter at column 34\)"):
        read_rows(tmp_path / "brace.jsonl")  # the line's end, not "column 1" of the line after it


def test_overlong_policies(tmp_path, tok):
    rows = [{"prompt": "What is 1+1?", "completion": " 2"}, {"prompt": "What is 1+1?", "completion": " " + "9" * 40}]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match=r"long.jsonl:2: 54 tokens .* exceed max_length=20"):
        encode_sft(read_rows(path), tok, 20)
    examples, report = encode_sft(read_rows(path), tok, 20, overlong="skip")
    assert len(examples) == 1 and report.skipped == [f"{path}:2"]
    examples, report = encode_sft(read_rows(path), tok, 20, overlong="truncate")
    assert [len(e.input_ids) for e in examples] == [12 + 3, 20] and report.truncated == 1


def test_parquet_dataset_and_chat_rows(tmp_path, tok, monkeypatch):
    ds = datasets.Dataset.from_list([{"prompt": "What is 2+2?", "completion": " 4"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))

    def cached_copy(*args, **kwargs):  # datasets' reader writes an Arrow copy into its cache, with a progress bar
        raise AssertionError("a parquet file is read in place, through pyarrow")

    monkeypatch.setattr(datasets.Dataset, "from_parquet", cached_copy)
    from_parquet, _ = encode_sft(read_rows(tmp_path / "d.parquet"), tok, 64)
    from_dataset, _ = encode_sft(read_rows(ds), tok, 64)
    assert from_parquet == from_dataset
    chat = [{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": " 4"}]}]
    (example,), _ = encode_sft(read_rows(chat), tok, 64)
    text = tok.decode(example.input_ids)
    assert text == "<|user|>What is 2+2?<|assistant|> 4<eos>"
    assert tok.decode(example.input_ids[example.prompt_len:]) == " 4<eos>"


def test_json_arrays_csv_and_table_nulls(tmp_path):
    """What ``datasets.load_dataset`` reads: a JSON array (pretty-printed or on one line) and a csv
    with a header; a table's null (or a csv's empty cell) is a field the row does not have."""
    rows = [{"prompt": "What is 1+1?", "completion": " 2"}, {"prompt": "What is 2+2?", "completion": " 4", "answer": 4}]
    (tmp_path / "pretty.json").write_text(json.dumps(rows, indent=2))
    (tmp_path / "one.json").write_text(json.dumps(rows))
    for name in ("pretty.json", "one.json"):
        read = read_rows(tmp_path / name)
        assert [r.data for r in read] == rows and read[1].where == f"{tmp_path / name}:row 2"
    _jsonl(tmp_path / "lines.json", rows)  # JSON lines under a .json name, as before
    assert [r.data for r in read_rows(tmp_path / "lines.json")] == rows
    (tmp_path / "bad.json").write_text('[\n  {"prompt": "a"},\n  {"prompt": \n]')
    with pytest.raises(DataError, match=r"bad.json:4: not valid JSON"):
        read_rows(tmp_path / "bad.json")
    (tmp_path / "d.csv").write_text('prompt,completion,answer\n"What is 1+1?", 2,\n"What is 2+2?", 4,4\n')
    read = read_rows(tmp_path / "d.csv")
    assert [r.data for r in read] == [{"prompt": "What is 1+1?", "completion": " 2"},
                                      {"prompt": "What is 2+2?", "completion": " 4", "answer": "4"}]
    assert read[1].where == f"{tmp_path / 'd.csv'}:3"
    (tmp_path / "wide.csv").write_text("prompt,completion\na,b,c\n")
    with pytest.raises(DataError, match=r"wide.csv:2: more values than the header's 2 columns"):
        read_rows(tmp_path / "wide.csv")
    table = datasets.Dataset.from_list([{**rows[0], "answer": None}, rows[1]])  # row 0's answer: null in the table
    table.to_parquet(str(tmp_path / "d.parquet"))
    assert [r.data for r in read_rows(tmp_path / "d.parquet")] == rows
    assert [r.data for r in read_rows(table)] == rows  # a Dataset passed in Python: the same table


def test_chat_row_needs_an_assistant_turn(tok):
    bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}]
    with pytest.raises(DataError, match=r"row 1: field 'messages' has no assistant turn after the first message"):
        encode_sft(read_rows(bad), tok, 64)


def test_collate_masks_only_completion_and_eos(tok):
    examples, _ = encode_sft(read_rows([{"prompt": "ab", "completion": "c"}, {"prompt": "a", "completion": "bcd"}]), tok, 64)
    batch = collate_sft(examples, tok.pad_token_id)
    assert batch.completion_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.input_ids[0, 3].item() == tok.eos_token_id


def test_ranking_rows_are_validated(tok):
    from rlhfkit.data.prefs import encode_rankings

    cases = [
        ({"prompt": "p", "completions": ["a"]}, "field 'completions' needs at least 2 entries, got 1"),
        ({"prompt": "p", "completions": ["a", "b", "a"]}, "field 'completions' lists 'a' more than once"),
        ({"prompt": "p", "completions": ["a", 5]}, r"field 'completions\[1\]' must be a string, got int"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "'chosen' and 'rejected' are the same text"),
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ]
    for row, message in cases:
        with pytest.raises(DataError, match=message):
            encode_rankings(read_rows([{"prompt": "ok", "chosen": "x", "rejected": "y"}, row]), tok, 64)
    (ex,), _ = encode_rankings(read_rows([{"prompt": "p", "completions": ["a", "b", "c"], "ranks": [0, 1, 1]}]), tok, 64)
    assert ex.ranks == [0, 1, 1] and len(ex.completion_ids) == 3


def test_files_as_editors_and_tools_write_them_are_read_or_refused_by_name(tmp_path):
    """A byte-order mark (Excel's CSV, Notepad's jsonl) is dropped; an upper-case suffix is the
    same kind of file; a compressed, corrupt or unknown file is one line naming it; a byte that is
    not UTF-8 is named by line and column in every text format."""
    bom = tmp_path / "excel.csv"
    bom.write_bytes(b"\xef\xbb\xbfprompt,completion\r\n1+1=,2\r\n")
    assert [r.data for r in read_rows(bom)] == [{"prompt": "1+1=", "completion": "2"}]
    notepad = tmp_path / "notepad.jsonl"
    notepad.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert read_rows(notepad)[0].data == {"prompt": "a", "completion": "b"}
    upper = tmp_path / "DATA.PARQUET"
    datasets.Dataset.from_list([{"prompt": "a", "completion": "b"}]).to_parquet(str(upper))
    assert read_rows(upper)[0].data == {"prompt": "a", "completion": "b"}
    corrupt = tmp_path / "cut.parquet"
    corrupt.write_bytes(upper.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"cut.parquet: not a readable parquet file \(Arrow"):
        read_rows(corrupt)
    import gzip

    packed = tmp_path / "sft.jsonl.gz"
    packed.write_bytes(gzip.compress(notepad.read_bytes()))
    with pytest.raises(DataError, match=r"sft.jsonl.gz: a compressed file; decompress it first"):
        read_rows(packed)
    tsv = tmp_path / "rows.tsv"
    tsv.write_text("prompt\tcompletion\na\tb\n")
    with pytest.raises(DataError, match=r"rows.tsv: not a data file rlhfkit reads \(the suffix is .tsv"):
        read_rows(tsv)
    for name, text in (("bad.csv", b"prompt,completion\na,b\nc,\xff\n"),
                       ("bad.json", b'[{"prompt": "a",\n "completion": "\xff"}]')):
        (tmp_path / name).write_bytes(text)
        line = 3 if name == "bad.csv" else 2
        with pytest.raises(DataError, match=rf"{name}:{line}: not valid UTF-8 \(byte 0xff at column"):
            read_rows(tmp_path / name)


def test_a_dataframe_or_a_dict_of_columns_is_a_table(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"prompt": ["a", "b"], "completion": ["x", None]})
    assert [r.data for r in read_rows(frame)] == [{"prompt": "a", "completion": "x"}, {"prompt": "b"}]
    assert read_rows(frame)[1].where == "<DataFrame>:row 2"
    assert [r.data for r in read_rows({"prompt": ["a"], "completion": ["x"]})] == [{"prompt": "a", "completion": "x"}]
    with pytest.raises(DataError, match=r"<dict>: not a table of columns"):
        read_rows({"prompt": ["a", "b"], "completion": ["x"]})


def test_chat_messages_in_a_csv_cell_are_refused_not_trained_on_as_text(tmp_path):
    path = tmp_path / "chat.csv"
    path.write_text('prompt,completion\n"[{""role"": ""user"", ""content"": ""1+1""}]",'
                    '"[{""role"": ""assistant"", ""content"": ""2""}]"\n')
    with pytest.raises(DataError, match=r"chat.csv:2: field 'prompt' is chat messages written as text \(JSON, or"):
        read_rows(path)
    # pandas' to_csv of a list-of-dicts column writes Python's repr, single-quoted: refused too
    import pandas as pd

    pd.DataFrame([{"prompt": [{"role": "user", "content": "1+1"}], "completion": [{"role": "assistant", "content": "2"}]}]
                 ).to_csv(path, index=False)
    assert "[{'role': 'user'" in path.read_text()
    with pytest.raises(DataError, match=r"chat.csv:2: field 'prompt' is chat messages written as text"):
        read_rows(path)
    path.write_text('prompt,completion\n"[1, 2] is a list","[""role""] too"\n')  # text that only looks like it
    assert read_rows(path)[0].data == {"prompt": "[1, 2] is a list", "completion": '["role"] too'}


def test_a_tables_nulls_inside_messages_and_tool_calls_are_keys_the_row_does_not_have(tmp_path):
    """Arrow gives every message and tool call all the keys any row's has: a tool call's arguments
    {"city": "Paris"} came back as {"city": "Paris", "tz": None}, and a template rendered the null."""
    import datasets

    rows = [{"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}}]}]},
            {"messages": [{"role": "user", "content": "Time?"},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": "t", "arguments": {"tz": "UTC"}}}]}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "tools.parquet"))
    assert [r.data for r in read_rows(tmp_path / "tools.parquet")] == rows
    assert [r.data for r in read_rows(datasets.Dataset.from_list(rows))] == rows


def test_a_json_file_of_one_object_holds_its_rows_under_its_key_or_is_one_row(tmp_path):
    """{"data": [...]} (datasets' field="data") and a pretty-printed single row were "not valid
    JSON" at their second line: they were read as JSON lines."""
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    (tmp_path / "data.json").write_text(json.dumps({"data": rows}, indent=2))
    read = read_rows(tmp_path / "data.json")
    assert [r.data for r in read] == rows and read[1].where == f"{tmp_path / 'data.json'}:data[1]"
    (tmp_path / "one.json").write_text(json.dumps(rows[0], indent=2))
    assert [r.data for r in read_rows(tmp_path / "one.json")] == rows[:1]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # JSON lines still
    assert [r.data for r in read_rows(tmp_path / "lines.json")] == rows
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    for text in (json.dumps(chat), json.dumps(chat, indent=2)):  # one chat row, on one line or several
        (tmp_path / "chat.json").write_text(text)
        assert [r.data for r in read_rows(tmp_path / "chat.json")] == [chat]


def test_a_json_object_of_splits_names_one_and_a_table_written_by_columns_is_read_as_rows(tmp_path):
    """{"train": [...], "test": [...]} and a table written column by column (datasets' dict of
    lists, pandas' ``to_json()`` default) were read as one row, and refused field by field."""
    import pandas as pd

    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e", "completion": "f"}]
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"train": rows[:2], "test": rows[2:]}, indent=2))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: holds lists of rows under 'train', 'test'; "
                                        rf"name the one to read \({re.escape(str(path))}:train"):
        read_rows(path)
    test = read_rows(f"{path}:test")
    assert [r.data for r in test] == rows[2:] and test[0].where == f"{path}:test[0]"
    with pytest.raises(DataError, match=r"no split 'dev'; the lists of rows are under 'train', 'test'"):
        read_rows(f"{path}:dev")
    (tmp_path / "one.json").write_text(json.dumps(rows[0]))
    with pytest.raises(DataError, match=r"no split 'train' in it; pass the file alone"):
        read_rows(f"{tmp_path / 'one.json'}:train")

    (tmp_path / "columns.json").write_text(json.dumps({"prompt": ["a", "c", "e"], "completion": ["b", "d", "f"]}))
    read = read_rows(tmp_path / "columns.json")
    assert [r.data for r in read] == rows and read[2].where == f"{tmp_path / 'columns.json'}:row 3"
    frame = pd.DataFrame(rows * 4)  # 12 rows: the index keys "10" and "11" sort after "9", not after "1"
    frame.loc[11, "completion"] = None  # a missing cell is a field the row does not have
    frame.to_json(tmp_path / "pandas.json")
    read = read_rows(tmp_path / "pandas.json")
    assert [r.data for r in read] == (rows * 4)[:11] + [{"prompt": "e"}]

    chat = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}],
            "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "y"}]}
    (tmp_path / "pair.json").write_text(json.dumps(chat, indent=2))  # one chat pair: lists of messages, not splits
    assert [r.data for r in read_rows(tmp_path / "pair.json")] == [chat]


def test_a_field_given_twice_is_refused_not_read_as_its_last_value(tmp_path):
    """{"prompt": "a", "prompt": "b"} trained on "b" (Python's json keeps the last), and a CSV header
    naming a column twice kept only its last cell."""
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": "x"}\n{"prompt": "a", "completion": "x", "prompt": "b"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path / 'd.jsonl'))}:2: field 'prompt' is given twice"):
        read_rows(tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text('[{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}]')
    with pytest.raises(DataError, match=r"d.json: field 'role' is given twice in one object"):  # at any depth
        read_rows(tmp_path / "d.json")
    (tmp_path / "d.csv").write_text("prompt,completion,prompt\na,x,b\n")
    with pytest.raises(DataError, match=r"d.csv:1: the header names column 'prompt' twice"):
        read_rows(tmp_path / "d.csv")


def test_a_pattern_reads_every_shard_of_a_hub_snapshot_in_name_order(tmp_path):
    """A Hub snapshot keeps a split in shards (data/train-00000-of-00002.parquet, ...): the folder
    was refused and a pattern was "file not found", so one shard at a time lost the rest."""
    import datasets

    rows = [{"prompt": str(i), "completion": "x"} for i in range(6)]
    (tmp_path / "snap" / "data").mkdir(parents=True)
    for k in range(2):
        datasets.Dataset.from_list(rows[3 * k: 3 * k + 3]).to_parquet(
            str(tmp_path / "snap" / "data" / f"train-0000{k}-of-00002.parquet"))
    read = read_rows(str(tmp_path / "snap" / "data" / "train-*.parquet"))
    assert [r.data for r in read] == rows and read[3].where.endswith("train-00001-of-00002.parquet:row 1")
    with pytest.raises(DataError, match=r"snap: is a directory.*give a pattern, such as .*snap/data/\*\.parquet"):
        read_rows(tmp_path / "snap")
    with pytest.raises(DataError, match=r"test-\*\.parquet: no file matches"):
        read_rows(str(tmp_path / "snap" / "data" / "test-*.parquet"))

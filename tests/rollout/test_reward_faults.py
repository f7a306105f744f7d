"""Reward functions under faults: weights that do not match, numpy and torch scalars, hung calls,
and prompt rows checked against what the rewards read before any model loads (issue #17)."""

import math
import re
import time

import numpy as np
import pytest
import torch
from methods_setup import method_config

import rlhfkit.methods.grpo as grpo_module
from rlhfkit.data.rows import DataError
from rlhfkit.methods.grpo import run_grpo
from rlhfkit.rollout.rewards import RewardError, score_outcomes
from rlhfkit.train.config import ConfigError, replace


def test_weights_that_do_not_match_the_reward_functions_are_an_error(tiny, tmp_path):
    cfg = method_config("grpo", tiny, tmp_path / "w", 1)

    def one(prompts, completions, **_):
        return [1.0] * len(completions)

    def two(prompts, completions, **_):
        return [2.0] * len(completions)

    with pytest.raises(ConfigError, match="2 reward functions but 1 weights"):
        run_grpo(cfg, reward_fns=[one, two], weights=[1.0])
    assert not (tmp_path / "w").exists()


def test_rewards_get_the_arguments_they_name_trl_style_by_name_and_rlhfkits_first_two_by_position():
    from rlhfkit.rollout.rewards import reward_fields

    got = {}

    def trl(completions, solution, **kwargs):  # TRL's form: prompts come by name among the kwargs
        got["trl"] = (completions, solution, sorted(kwargs))
        return [1.0] * len(completions)

    def positional(p, c, answer):  # no **kwargs: only what it names
        got["positional"] = (p, c, answer)
        return [True, False]  # booleans count 1 and 0, as TRL casts them

    def length_only(completions, **kwargs):
        return [float(len(c)) for c in completions]

    def only_kwargs(**kwargs):  # TRL allows it: everything by name
        got["only_kwargs"] = sorted(kwargs)
        return [0.0, 0.0]

    def no_prompts(completions, answer):  # no **kwargs: prompts are not forced on it
        got["no_prompts"] = (completions, answer)
        return [0.0, 0.0]

    def renamed(prompts, responses, **kw):  # rlhfkit's earlier form, the first two by position
        got["renamed"] = (prompts, responses, sorted(kw))
        return [0.0, 0.0]

    assert reward_fields(trl) == ("solution",) and reward_fields(positional) == ("answer",)
    assert reward_fields(length_only) == () and reward_fields(renamed) == () and reward_fields(no_prompts) == ("answer",)
    score_outcomes([only_kwargs, no_prompts, renamed], [1.0] * 3, ["p1", "p2"], ["c1", "c2"], {"answer": [1, 2]},
                   completion_ids=[[5], [6]])
    assert got["only_kwargs"] == ["answer", "completion_ids", "completions", "prompts"]
    assert got["no_prompts"] == (["c1", "c2"], [1, 2])
    assert got["renamed"] == (["p1", "p2"], ["c1", "c2"], ["answer", "completion_ids"])
    scores = score_outcomes([trl, positional, length_only], [1.0, 1.0, 1.0], ["p1", "p2"], ["c1", "ccc2"],
                            {"solution": ["1", "2"], "answer": [1, 2]}, completion_ids=[[5], [6, 7]],
                            trainer_state="state")
    assert got["trl"] == (["c1", "ccc2"], ["1", "2"], ["answer", "completion_ids", "prompts", "trainer_state"])
    assert got["positional"] == (["p1", "p2"], ["c1", "ccc2"], [1, 2])
    assert scores.rewards.tolist() == [1.0 + 1.0 + 2.0, 1.0 + 0.0 + 4.0]


def test_a_reward_that_returns_no_list_or_takes_other_arguments_is_said_plainly():
    with pytest.raises(RewardError, match="'nothing' failed .*returned NoneType, not a list of one number"):
        def nothing(prompts, completions, **_):
            return None
        score_outcomes([nothing], [1.0], ["p"], ["c"], {})

    def wants(prompts, completions, extra_thing):
        return [1.0]

    with pytest.raises(RewardError, match="missing 1 required positional argument.*gets every argument by name, as in TRL"):
        score_outcomes([wants], [1.0], ["p"], ["c"], {})

    def buggy(prompts, completions, **_):
        return [int("x" * 0 or [])]  # a TypeError of its own, not of the call

    with pytest.raises(RewardError) as err:
        score_outcomes([buggy], [1.0], ["p"], ["c"], {})
    assert "int() argument must be" in str(err.value) and "as in TRL" not in str(err.value)


def test_numpy_and_zero_dim_torch_scalars_are_numbers():
    values = [np.float32(0.5), np.int64(2), np.float64(0.25), torch.tensor(1.5), np.array(3.0), None]
    scores = score_outcomes([lambda p, c, **_: values], [2.0], ["p"] * 6, ["c"] * 6, {})
    assert scores.rewards[:5].tolist() == [1.0, 4.0, 0.5, 3.0, 6.0]  # 2 x each
    assert math.isnan(scores.rewards[5])  # None abstains: the only function did, so the sample has no reward
    with pytest.raises(RewardError, match=r"returned tensor\(\[1., 2.\]\) for sample 0"):
        score_outcomes([lambda p, c, **_: [torch.tensor([1.0, 2.0])]], [1.0], ["p"], ["c"], {})
    with pytest.raises(RewardError, match="returned 'high' for sample 0"):
        score_outcomes([lambda p, c, **_: ["high"]], [1.0], ["p"], ["c"], {})


def test_a_hung_reward_becomes_a_named_error_after_reward_timeout_s():
    def hangs(prompts, completions, **_):
        time.sleep(30)
        return [0.0] * len(completions)

    start = time.time()
    with pytest.raises(RewardError, match=r"reward function 'hangs' failed .*no result within reward_timeout_s=0.2 s"):
        score_outcomes([hangs], [1.0], ["p"], ["c"], {}, timeout_s=0.2)
    assert time.time() - start < 5
    zero = score_outcomes([hangs], [1.0], ["p", "q"], ["c", "d"], {}, on_error="zero", timeout_s=0.2)
    assert zero.rewards.tolist() == [0.0, 0.0] and zero.errors == {"hangs": 2}
    fast = score_outcomes([lambda p, c, **_: [1.0]], [1.0], ["p"], ["c"], {}, timeout_s=5)
    assert fast.rewards.tolist() == [1.0]


def test_errors_zeroed_keep_the_first_ones_text_and_mark_the_samples():
    """Under on_error="zero": a call that raises zeroes (and marks) every sample, a value that is
    no number zeroes (and marks) its own; each function's first error's text is kept."""
    def raises(completions, **_):
        raise KeyError("solution")

    def two_bad(completions, **_):
        return [1.0, float("nan"), "x", 2.0]

    out = score_outcomes([raises, two_bad], [1.0, 1.0], ["p"] * 4, ["a", "b", "c", "d"], {}, on_error="zero")
    assert out.rewards.tolist() == [1.0, 0.0, 0.0, 2.0] and out.errors == {"raises": 4, "two_bad": 2}
    assert out.errored.tolist() == [True] * 4
    line = raises.__code__.co_firstlineno + 1  # the line that raised, in this file: where to look
    assert out.messages["raises"] == ("reward function 'raises' failed on the batch starting with prompt 'p': "
                                      f"KeyError: 'solution' ({__file__}:{line} in raises)")
    with pytest.raises(RewardError, match=rf"KeyError: 'solution' \({re.escape(__file__)}:{line} in raises\)$"):
        score_outcomes([raises], [1.0], ["p"], ["a"], {})  # the same text when it stops the run
    assert out.messages["two_bad"] == ("reward function 'two_bad' returned nan for sample 1 (prompt 'p', completion "
                                       "'b'); to abstain on a sample return None (TRL also reads NaN so; rlhfkit takes "
                                       "it for an error)")
    alone = score_outcomes([two_bad], [1.0], ["p"] * 4, ["a", "b", "c", "d"], {}, on_error="zero")
    assert alone.errored.tolist() == [False, True, True, False] and list(alone.messages) == ["two_bad"]


def _no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(grpo_module, "load_causal_lm", refuse)


def test_grpo_checks_every_prompt_row_for_the_rewards_fields_before_any_model_loads(tiny, tmp_path, monkeypatch):
    rows = (tiny["data"] / "prompts_train.jsonl").read_text().splitlines()[:300]
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("\n".join(rows + ['{"prompt": "What is 1+1?"}']) + "\n")
    _no_model_loads(monkeypatch)
    cfg = replace(method_config("grpo", tiny, tmp_path / "g", 100), train_data=str(bad), rewards="exact_answer")
    with pytest.raises(DataError, match=r"prompts.jsonl:301: missing field 'answer' \(a reward reads it\)"):
        run_grpo(cfg)  # before the fix: 63 steps of training, then int(None) inside the reward
    assert not (tmp_path / "g" / "metrics.jsonl").exists()


def test_grpo_refuses_a_rankings_file_whose_fields_collide_with_reward_arguments(tiny, tmp_path, monkeypatch):
    _no_model_loads(monkeypatch)
    cfg = replace(method_config("grpo", tiny, tmp_path / "g", 1), train_data=str(tiny["data"] / "rankings_train.jsonl"))
    with pytest.raises(DataError, match=r"rankings_train.jsonl:1: a ranking \(prompt, completions\) row is not grpo or "
                                        r"ppo data"):
        run_grpo(cfg)  # before: "got multiple values for argument 'completions'" in every reward call


def test_a_reward_file_imports_the_modules_beside_it_and_an_import_error_names_its_line(tmp_path):
    """``rewards=rw/rew.py:acc`` whose file imports ``helper`` beside it failed with "No module
    named 'helper'" (the file's folder was not searched, as ``python rw/rew.py`` would), and an
    error raised while importing named no file or line."""
    from rlhfkit.rollout.rewards import load_callable

    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "rlhfkit_test_helper_s37.py").write_text("def norm(s):\n    return s.strip()\n")
    (tmp_path / "rw" / "rew.py").write_text(
        "from rlhfkit_test_helper_s37 import norm\n\n\ndef acc(prompts, completions, **kw):\n"
        "    return [float(norm(c) == '4') for c in completions]\n")
    assert load_callable(f"{tmp_path / 'rw' / 'rew.py'}:acc")(["2+2="], [" 4 "]) == [1.0]
    (tmp_path / "bad.py").write_text("import math\n\nVALUE = 1 / 0\n")
    with pytest.raises(RewardError, match=rf"cannot be loaded: ZeroDivisionError: division by zero \(at "
                                          rf"{re.escape(str(tmp_path / 'bad.py'))}:3\)"):
        load_callable(f"{tmp_path / 'bad.py'}:acc")


def test_an_async_reward_is_awaited_as_trl_awaits_it_in_a_notebooks_loop_and_under_a_timeout():
    """TRL takes ``async def`` rewards (an LLM judge's calls); one returns its scores here too, also
    where the caller already runs an event loop (a notebook) and under reward_timeout_s, and state it
    binds to its loop lasts from call to call (one loop for the process, as TRL keeps one)."""
    import asyncio

    gate = {}  # a rate limit an API judge keeps across calls: bound to the loop of its first use

    async def judge(prompts, completions, answer, **_):
        async with gate.setdefault("limit", asyncio.Semaphore(2)):
            await asyncio.sleep(0)
        return [float(c.strip() == str(a)) for c, a in zip(completions, answer)]

    def scores(timeout_s=0.0):
        return score_outcomes([judge], [1.0], ["p"] * 3, [" 3", " 4", "3"], {"answer": [3, 3, 3]},
                              timeout_s=timeout_s).rewards.tolist()

    async def in_a_loop():
        return scores()

    assert scores() == scores(timeout_s=5.0) == asyncio.run(in_a_loop()) == [1.0, 0.0, 1.0]


def test_an_async_reward_that_hangs_is_a_named_timeout():
    import asyncio

    async def hangs(completions, **_):
        await asyncio.sleep(30)

    with pytest.raises(RewardError, match=r"'hangs' failed .*no result within reward_timeout_s=0.2 s"):
        score_outcomes([hangs], [1.0], ["p"], ["a"], {}, timeout_s=0.2)


def test_an_async_reward_that_raises_keyboard_interrupt_leaves_the_loop_serving():
    """asyncio lets a KeyboardInterrupt out of run_forever: it ended the reward loop's thread, its
    caller waited for ever (SIGTERM did not end the process), and every later async reward in the
    process timed out. It is raised in the caller's thread now, and the loop goes on."""
    import threading

    from rlhfkit.rollout.rewards import _LOOP, awaited

    async def interrupted():
        raise KeyboardInterrupt("from inside the reward")

    async def fine():
        return [1.0]

    with pytest.raises(KeyboardInterrupt, match="from inside the reward"):
        awaited(interrupted(), timeout_s=5)
    assert _LOOP["loop"].is_running()
    assert awaited(fine(), timeout_s=5) == [1.0]
    assert sum(t.name == "reward-async" for t in threading.enumerate()) == 1

"""models/script.py: each compiled function runs by the executor its switch names (the sampler's by
TorchScript's plain executor, whose plans held about 50 MB less at GRPO's peak; the training
node's optimised), and the process's setting is left as it was."""

import torch

from rlhfkit.models import script


def test_each_switch_runs_by_its_executor_and_leaves_the_setting_alone(monkeypatch):
    seen = []
    before = torch._C._get_graph_executor_optimize()
    for switch, optimised in ((script.DECODE, False), (script.LAYERS, True)):
        compiled = script.Compiled(lambda x: seen.append(torch._C._get_graph_executor_optimize()) or x + 1, switch)
        assert compiled(1) == 2
        assert seen[-1] is optimised
        assert torch._C._get_graph_executor_optimize() == before
    monkeypatch.setitem(script.OPTIMIZED, script.DECODE, True)  # read on every call
    script.Compiled(lambda: seen.append(torch._C._get_graph_executor_optimize()), script.DECODE)()
    assert seen[-1] is True


def test_a_scripted_function_gives_what_python_gives():
    def double_plus(x: torch.Tensor, k: int) -> torch.Tensor:
        return x * 2 + k

    compiled = script.scripted(double_plus)
    assert isinstance(compiled.script, torch.jit.ScriptFunction)
    x = torch.arange(5.0)
    assert torch.equal(compiled(x, 3), double_plus(x, 3))

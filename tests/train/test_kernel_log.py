import pytest

from rlhfkit.models.kernels import onednn_linear_available


@pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN in this PyTorch build")
def test_the_run_log_names_the_kernel_and_its_timings(fresh_choice, monkeypatch):
    from rlhfkit.train.run import kernel_line

    kernels = fresh_choice
    # forced (conftest): not timed; the layout's threshold is (a property of the host)
    monkeypatch.setattr(kernels, "time_layout", lambda: (6e-4, 8e-5))
    assert kernel_line().startswith("fp32 linear products through oneDNN, the sampler's through oneDNN on weights "
                                    "laid out from 8 new tokens a call;")
    kernels.linear_kernel.cache_clear()
    kernels.decode_kernel.cache_clear()
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "auto")
    monkeypatch.setattr(kernels, "time_products", lambda: (0.0031, 0.0024))
    monkeypatch.setattr(kernels, "time_decode_products", lambda: (0.0004, 0.0005))
    assert kernel_line().startswith("fp32 linear products through BLAS (timed here: oneDNN 3.10 ms, BLAS 2.40 ms), "
                                    "the sampler's through oneDNN (timed here: oneDNN 0.40 ms, BLAS 0.50 ms) on "
                                    "weights laid out from 8 new tokens a call;")
    kernels.layout_min_new_tokens.cache_clear()
    monkeypatch.setattr(kernels, "time_layout", lambda: (6e-4, -1e-6))
    assert "the sampler's through oneDNN (timed here: oneDNN 0.40 ms, BLAS 0.50 ms) on weights as they lie (a " \
           "layout saved nothing here);" in kernel_line()


@pytest.mark.skipif(not onednn_linear_available(), reason="no oneDNN in this PyTorch build")
def test_a_resumed_run_takes_the_kernels_of_the_run_it_resumes(fresh_choice, monkeypatch, tiny, tmp_path, capfd):
    """The two kernels' results differ in float rounding, and where their times are near the
    margin the timing of a new process can choose the other one: a resumed run takes the choices
    its checkpoint holds, and so logs the straight run's losses bit for bit."""
    from helpers import run_killed_in_step
    from methods_setup import RUNS, method_config

    from rlhfkit.train.config import replace
    from rlhfkit.train.logging import read_metrics

    kernels = fresh_choice
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "auto")
    monkeypatch.setattr(kernels, "time_decode_products", lambda: (2.0, 1.0))

    def new_process(onednn_s: float) -> None:  # a process whose timing says this
        kernels.pin_kernels({})
        monkeypatch.setattr(kernels, "time_products", lambda: (onednn_s, 1.0))

    def cfg(out, resume=False):
        return replace(method_config("sft", tiny, out, 4, log_every=1, save_every=2), train__resume=resume)

    new_process(0.5)  # oneDNN
    RUNS["sft"](cfg(tmp_path / "full"))
    full = [m["train/loss"] for m in read_metrics(tmp_path / "full") if "train/loss" in m]
    new_process(0.5)
    run_killed_in_step(monkeypatch, 3, lambda: RUNS["sft"](cfg(tmp_path / "cut")))
    new_process(2.0)  # this process's timing would take BLAS
    capfd.readouterr()
    RUNS["sft"](cfg(tmp_path / "cut", resume=True))
    assert kernels.linear_kernel()[0] == "onednn"
    assert "fp32 linear products through oneDNN (as the run resumed chose)" in capfd.readouterr().err
    cut = [m["train/loss"] for m in read_metrics(tmp_path / "cut") if "train/loss" in m]
    assert cut == full and len(full) == 4


def test_pinned_kernels_replace_the_timing_but_not_a_forced_switch(fresh_choice, monkeypatch):
    kernels = fresh_choice
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "auto")
    monkeypatch.setattr(kernels, "time_products", lambda: (0.5, 1.0))
    monkeypatch.setattr(kernels, "time_decode_products", lambda: (0.5, 1.0))
    monkeypatch.setattr(kernels, "time_layout", lambda: (6e-4, 8e-5))
    if not onednn_linear_available():
        assert kernels.kernel_choices() == {"linear": "blas", "decode": "blas"}
        return
    timed = kernels.kernel_choices()
    assert timed == {"linear": "onednn", "decode": "onednn", "layout_min_new_tokens": 8}
    kernels.pin_kernels({"linear": "blas", "decode": "onednn", "layout_min_new_tokens": 20})
    assert kernels.linear_kernel()[0] == "blas" and kernels.layout_min_new_tokens() == 20
    assert kernels.kernel_choices() == {"linear": "blas", "decode": "onednn", "layout_min_new_tokens": 20}
    monkeypatch.setenv("RLHFKIT_FAST_LINEAR", "1")
    kernels.linear_kernel.cache_clear()
    assert kernels.linear_kernel()[0] == "onednn"  # the switch forces oneDNN whatever was pinned

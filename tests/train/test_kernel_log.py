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

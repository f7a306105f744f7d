"""benchmarks/compare.py's reading of a target: the time it allows against rlhfkit's products at the ceiling."""

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("compare", Path(__file__).parents[2] / "benchmarks" / "compare.py")
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)


def summary(method: str, ours: float, theirs: float, gflop: float) -> dict:
    key = "hf_generate_sec_per_step" if method == "generate" else "trl_sec_per_step"
    return {"method": method, "rlhfkit_sec_per_step": {"median": ours}, key: {"median": theirs},
            "rlhfkit_gflop_per_step": gflop}


def test_a_target_below_the_products_floor_leaves_a_negative_allowance():
    # PPO: TRL 0.63 s / 5 = 0.126 s allowed; 51.75 GFLOP at 394.5 GFLOP/s = 0.13118 s of products
    r = compare.reach(summary("ppo", 0.25, 0.63, 51.75), 394.5)
    assert r["target"] == 5.0
    assert r["allowed_sec_per_step"] == pytest.approx(0.126)
    assert r["products_at_ceiling_sec"] == pytest.approx(0.1312, abs=1e-4)
    assert r["left_for_the_rest_sec"] == pytest.approx(-0.0052, abs=1e-4)
    assert r["the_rest_now_sec"] == pytest.approx(0.1188, abs=1e-4)


def test_generate_is_measured_against_plain_generate():
    # 0.083 s / 2.5 = 0.0332 s allowed; 4.56 GFLOP at 380 GFLOP/s = 0.012 s
    r = compare.reach(summary("generate", 0.043, 0.083, 4.56), 380.0)
    assert r["allowed_sec_per_step"] == pytest.approx(0.0332)
    assert r["left_for_the_rest_sec"] == pytest.approx(0.0212)
    assert r["the_rest_now_sec"] == pytest.approx(0.031)


def test_the_summary_counts_model_gflop_per_step_from_each_run():
    runs = [{"sec_per_step": s, "model_gflops_per_s": g, "peak_rss_mb": 400.0, "tokens_per_s": 1.0}
            for s, g in ((0.02, 150.0), (0.03, 100.0), (0.025, 130.0))]
    trl = [{"sec_per_step": 0.04, "peak_rss_mb": 500.0, "library": "trl"}] * 3
    out = compare.summarise("sft", {"rlhfkit": runs, "trl": trl})
    assert out["rlhfkit_gflop_per_step"] == pytest.approx(3.0)  # median of 3.0, 3.0, 3.25


def test_trl_under_rlhfkits_malloc_settings_and_the_precomputed_reference_with_its_one_off_pass():
    runs = [{"sec_per_step": 0.02, "model_gflops_per_s": 100.0, "peak_rss_mb": 400.0, "tokens_per_s": 1.0}] * 2
    trl = [{"sec_per_step": 0.06, "peak_rss_mb": 500.0, "library": "trl"}] * 2
    trl_malloc = [{"sec_per_step": 0.05, "peak_rss_mb": 520.0, "library": "trl"}] * 2
    pre = [{"sec_per_step": 0.015, "sec_per_step_including_reference": 0.025, "reference_precompute_s": 0.22,
            "model_gflops_per_s": 90.0}] * 2
    out = compare.summarise("dpo", {"rlhfkit": runs, "trl": trl, "trl_malloc": trl_malloc, "rlhfkit_precompute": pre})
    assert out["ratio"]["median"] == pytest.approx(3.0) and out["trl_malloc"]["ratio"]["median"] == pytest.approx(2.5)
    assert out["rlhfkit_precompute"]["ratio"]["median"] == pytest.approx(4.0)  # 0.06 / 0.015
    assert out["rlhfkit_precompute"]["ratio_with_one_off"]["median"] == pytest.approx(2.4)  # 0.06 / 0.025
    row = compare.table_row(out)
    assert "TRL with rlhfkit's malloc settings | 0.02 | 0.05 | **2.5x**" in row and "spread over the run's steps 2.4x" in row

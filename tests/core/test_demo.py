"""`mergelab demo --synthetic`: merges synthetic experts, loads with transformers, reports what was kept."""

from rich.console import Console

from mergelab.demo_synthetic import run_synthetic_demo


def test_demo_average_keeps_a_third_of_each_independent_expert(tmp_path):
    scores = run_synthetic_demo(tmp_path, "task_arithmetic", Console(file=open(tmp_path / "log.txt", "w")))
    s = scores["task_arithmetic"]
    # Independent experts: the average's task vector is (t1+t2+t3)/3, so <avg, t_i>/|t_i|^2 ~ 1/3
    # and its cosine to each ~ 1/sqrt(3).
    assert all(0.28 < x < 0.40 for x in s["share"])
    assert all(0.50 < c < 0.65 for c in s["cosine"])
    assert (tmp_path / "merged-task_arithmetic" / "config.json").exists()

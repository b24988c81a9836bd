"""The whole pipeline on a very small setting (a few steps per stage), so CI catches breakage between
stages: corpus -> Stage 1 -> Stage 2 (+ the ablation variants) -> evaluation of every checkpoint -> report;
a re-run continues."""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_pipeline(out, *extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "pipeline.py", "--quick", "--out", str(out), *extra], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=600)


def test_pipeline_quick_end_to_end(tmp_path):
    r = run_pipeline(tmp_path, "--ablations")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = (tmp_path / "report" / "REPORT.md").read_text()
    for table in ("Table 1", "Table 2", "Table 3", "Table 4"):
        assert table in report
    for name in ("untrained", "stage1_sta", "stage2_grpo", "sft_no_timestamps", "grpo_wo_grounding",
                 "grpo_wo_compaction"):
        assert f"| {name} |" in report
    assert (tmp_path / "sta_tiny" / "ckpt" / "latest" / "config.json").exists()
    assert (tmp_path / "grpo_tiny" / "ckpt" / "latest" / "config.json").exists()
    assert any(p.endswith(".png") for p in os.listdir(tmp_path / "report"))
    commands = (tmp_path / "commands.txt").read_text().splitlines()
    assert sum("data.py synth" in c for c in commands) == 2

    # a second run skips the corpus (its outputs exist) and the training scripts resume at their last step
    r = run_pipeline(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    commands = (tmp_path / "commands.txt").read_text().splitlines()
    assert sum("data.py synth" in c for c in commands) == 2

"""The whole method on the built-in default, in one command: corpus -> tokenizer + Stage 1 (STA) -> Stage 2
(GRPO) -> evaluation of the untrained, Stage 1 and Stage 2 checkpoints on held-out data from another seed ->
a report with the analogues of the paper's Tables 1-4, attention plots and a few grounded answers.

    python pipeline.py                    # ~23 min on 2 CPU cores; writes out/report/REPORT.md
    python pipeline.py --ablations        # + reasoning SFT without timestamps, GRPO w/o grounding, w/o compaction
    python pipeline.py --quick            # a few steps per stage (what the test runs): checks the wiring only

Every stage is a plain command of its own script (printed before it runs), so any one can be run alone;
a stage whose output already exists is skipped, and the training scripts resume from their last
checkpoint, so re-running the pipeline continues where it stopped.

Deviations from the paper: the paper fine-tunes released 7B LALMs on ~268k STA pairs and ~47k QA items;
the built-in default trains a tiny LALM from scratch on a synthetic espeak-ng corpus (see train_sta.py and
train_grpo.py for the details of each stage). The "untrained" row is the tiny model at initialisation,
the analogue of the paper's base model.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Overrides that shrink every stage to seconds: the test runs the full wiring with these.
QUICK_DATA = {"n": 24, "n_eval": 8}
QUICK_STA = ["--max_steps=6", "--batch_size=4", "--warmup_steps=1", "--eval_every=6", "--eval_n=4",
             "--save_every=6", "--enc_dim=32", "--enc_layers=1", "--enc_heads=2",
             "--dec_dim=32", "--dec_layers=1", "--dec_heads=2"]
QUICK_GRPO = ["--num_steps=2", "--group_size=2", "--device_batch_size=2", "--grad_accum=1",
              "--max_new_tokens=12", "--save_every=2", "--eval_n=4", "--dump_every=1"]
QUICK_EVAL = ["--limit=4", "--max-new-tokens=16"]


def run(cmd, log):
    """Run one stage's command, echoing it; the stage's own progress bar and log lines go to the terminal."""
    line = " ".join(cmd)
    print(f"\n$ {line}", flush=True)
    log.write(line + "\n")
    log.flush()
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=HERE)
    return time.time() - t0


def done(path):
    return os.path.exists(path)


def save_untrained(sta_ckpt, out):
    """The Stage 1 architecture and tokenizer at initialisation (same seed as Stage 1): the 'base' row."""
    import torch

    import model as model_lib
    with open(os.path.join(sta_ckpt, "config.json")) as f:
        config = json.load(f)
    torch.manual_seed(0)
    lalm = model_lib.build_lalm(config)
    model_lib.save_pretrained(lalm, out)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if os.path.exists(os.path.join(sta_ckpt, name)):
            shutil.copy(os.path.join(sta_ckpt, name), out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out", help="root of every output (corpus, checkpoints, report)")
    ap.add_argument("--n", type=int, default=2000, help="training clips to synthesise")
    ap.add_argument("--n-eval", type=int, default=200, help="held-out clips (seed 1)")
    ap.add_argument("--ablations", action="store_true", help="also run the paper's ablation variants")
    ap.add_argument("--quick", action="store_true", help="a few steps per stage (wiring check)")
    a = ap.parse_args(argv)
    py = sys.executable
    out = os.path.abspath(a.out)
    n, n_eval = (QUICK_DATA["n"], QUICK_DATA["n_eval"]) if a.quick else (a.n, a.n_eval)
    quick_sta, quick_grpo, quick_eval = (QUICK_STA, QUICK_GRPO, QUICK_EVAL) if a.quick else ([], [], [])
    train_dir, held_dir = f"{out}/synth/train", f"{out}/synth/heldout"
    report = f"{out}/report"
    os.makedirs(report, exist_ok=True)
    log = open(f"{out}/commands.txt", "a")
    times = {}
    t_start = time.time()

    # --- 1. corpus: training set (seed 0) and held-out set (seed 1)
    for d, seed, count in ((train_dir, 0, n), (held_dir, 1, n_eval)):
        if not done(f"{d}/qa.jsonl"):
            times[f"synth seed {seed}"] = run([py, "data.py", "synth", "--out", d, "--seed", str(seed),
                                               "--n", str(count)], log)

    # --- 2. Stage 1 (STA; trains the SentencePiece tokenizer on the corpus first)
    sta_out = f"{out}/sta_tiny"
    sta = [py, "train_sta.py", "--config", "configs/sta_tiny.json", f"--data_dir={train_dir}",
           f"--eval_data_dir={held_dir}", f"--out_dir={sta_out}"] + quick_sta
    times["stage 1"] = run(sta, log)
    sta_ckpt = f"{sta_out}/ckpt/latest"

    # --- 3. Stage 2 (GRPO from the Stage 1 checkpoint)
    def grpo(name, extra=()):
        o = f"{out}/{name}"
        times[name] = run([py, "train_grpo.py", "--config", "configs/grpo_tiny.json", f"--init_from={sta_ckpt}",
                           f"--train_data={train_dir}/qa.jsonl", f"--eval_data={held_dir}/qa.jsonl",
                           f"--out_dir={o}", *extra] + quick_grpo, log)
        return f"{o}/ckpt/latest"

    checkpoints = {"untrained": f"{out}/untrained", "stage1_sta": sta_ckpt, "stage2_grpo": grpo("grpo_tiny")}
    if not done(f"{out}/untrained/config.json"):
        save_untrained(os.path.realpath(sta_ckpt), f"{out}/untrained")

    # --- 4. ablations (paper Tables 2-3): reasoning SFT without timestamps, RL w/o grounding, w/o compaction
    if a.ablations:
        nots = f"{out}/sft_no_timestamps"
        times["sft_no_timestamps"] = run(
            [py, "train_sta.py", "--config", "configs/sta_tiny.json", f"--data_dir={train_dir}",
             f"--eval_data_dir={held_dir}", f"--out_dir={nots}", f"--tokenizer={sta_ckpt}",
             "--timestamps=false"] + quick_sta, log)
        checkpoints["sft_no_timestamps"] = f"{nots}/ckpt/latest"
        checkpoints["grpo_wo_grounding"] = grpo("grpo_wo_grounding", ["--compaction_weight=0"])
        checkpoints["grpo_wo_compaction"] = grpo("grpo_wo_compaction", ["--c_min=0.5"])

    # --- 5. evaluation: every checkpoint on the same held-out data, tables side by side, attention plots
    names = [f"{k}={os.path.realpath(v)}" for k, v in checkpoints.items()]
    times["evaluation"] = run([py, "eval.py", "tables", "--checkpoints", *names, "--sta", f"{held_dir}/sta.jsonl",
                               "--qa", f"{held_dir}/qa.jsonl", "--out", report, "--attention"] + quick_eval, log)

    # --- 6. the report
    write_report(report, checkpoints, times, time.time() - t_start, a)
    print(f"\nreport: {report}/REPORT.md  ({(time.time() - t_start) / 60:.1f} min)")


def write_report(report, checkpoints, times, total, args):
    with open(f"{report}/tables.md") as f:
        tables = f.read()
    lines = ["# Timestamp-grounded speech reasoning: the built-in default, end to end", "",
             f"Checkpoints: {', '.join(checkpoints)}. Held-out data: synthetic corpus, seed 1.", "",
             tables, "", "## Grounded answers (Stage 2, held-out)", ""]
    examples_file = f"{report}/examples.md"
    if os.path.exists(examples_file):
        with open(examples_file) as f:
            lines.append(f.read())
    plots = sorted(p for p in os.listdir(report) if p.endswith(".png"))
    if plots:
        lines += ["", "## Attention (paper Figures 3-4)", ""] + [f"![{p}]({p})" for p in plots]
    lines += ["", "## Time per stage", "", "| stage | minutes |", "|---|---|"]
    lines += [f"| {k} | {v / 60:.1f} |" for k, v in times.items()]
    lines += [f"| total (this run) | {total / 60:.1f} |", ""]
    with open(f"{report}/REPORT.md", "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()

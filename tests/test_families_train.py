"""The paper's base-model families through both training scripts: a tiny random Qwen2.5-Omni thinker and a
tiny random Audio Flamingo 3 (saved by transformers in their released layouts) take Stage 1 (train_sta.py)
and Stage 2 (train_grpo.py) steps on a tiny synthetic corpus, and the results load back."""
import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import data                                                        # noqa: E402
import model as M                                                  # noqa: E402
import tokenizer as T                                              # noqa: E402

transformers = pytest.importorskip("transformers")


VISION_TOKENS = ("<|IMAGE|>", "<|VIDEO|>", "<|vision_start|>")   # reserved ids text never produces


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    data.build_synth_corpus(str(root / "train"), seed=0, n=8, workers=1)
    data.build_synth_corpus(str(root / "heldout"), seed=1, n=4, workers=1)
    texts = [line for f in ("sta.jsonl", "qa.jsonl") for line in open(root / "train" / f)]
    # with the time pieces, so Stage 1 runs the grounding losses (train_sta's default) on these families too
    tok = T.train_sentencepiece(texts, str(root / "tok"), vocab_size=700, text_pieces=T.TIME_PIECES,
                                special_tokens=T.CHAT_SPECIAL_TOKENS + ("<sound>",) + VISION_TOKENS)
    return root, tok


def text_config(vocab):
    return dict(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6)


def omni_checkpoint(path, tok):
    ids = tok.special_tokens
    cfg = transformers.Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=4,
                          encoder_ffn_dim=48, output_dim=32),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        text_config={**text_config(tok.vocab_size), "rope_parameters": dict(
            rope_type="default", rope_theta=1e6, mrope_section=[2, 1, 1])},
        audio_token_index=ids["<|AUDIO|>"], audio_start_token_id=ids["<|audio_bos|>"],
        audio_end_token_id=ids["<|audio_eos|>"], image_token_index=ids["<|IMAGE|>"],
        video_token_index=ids["<|VIDEO|>"], vision_start_token_id=ids["<|vision_start|>"])
    transformers.Qwen2_5OmniThinkerForConditionalGeneration(cfg).save_pretrained(path)


def af3_checkpoint(path, tok):
    cfg = transformers.AudioFlamingo3Config(
        audio_config=dict(model_type="audioflamingo3_encoder", num_mel_bins=128, hidden_size=32, num_hidden_layers=1,
                          num_attention_heads=4, intermediate_size=48),
        text_config=text_config(tok.vocab_size), audio_token_id=tok.special_tokens["<sound>"])
    transformers.AudioFlamingo3ForConditionalGeneration(cfg).save_pretrained(path)


def run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, script, *args], cwd=HERE, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.parametrize("family,make", [("qwen2_5_omni", omni_checkpoint), ("audioflamingo3", af3_checkpoint)])
def test_family_trains_through_both_stages(corpus, tmp_path, family, make):
    root, tok = corpus
    base = tmp_path / "base"
    make(str(base), tok)
    tok_file = str(root / "tok" / "tokenizer.model")
    common = [f"--family={family}", "--pad_to_30s=true", "--dtype=float32"]
    out = run("train_sta.py", f"--init_from={base}", f"--tokenizer={tok_file}", f"--data_dir={root / 'train'}",
        f"--eval_data_dir={root / 'heldout'}", f"--out_dir={tmp_path / 'sta'}", "--synth_n=0", "--max_steps=2",
        "--batch_size=2", "--warmup_steps=1", "--eval_every=2", "--eval_n=2", "--save_every=2", "--lr=1e-4",
        "--max_new_tokens=8", *common)
    assert "step 2/2 | loss " in out
    rows = [json.loads(line) for line in open(tmp_path / "sta" / "metrics.jsonl")]
    assert all(r[f"{kind}_loss"] > 0 for r in rows for kind in ("ground", "digit", "mention"))   # targets found
    sta = tmp_path / "sta" / "ckpt" / "latest"
    out = run("train_grpo.py", f"--init_from={sta}", f"--train_data={root / 'train' / 'qa.jsonl'}",
              f"--eval_data={root / 'heldout' / 'qa.jsonl'}", f"--out_dir={tmp_path / 'grpo'}", "--num_steps=1",
              "--group_size=2", "--device_batch_size=2", "--grad_accum=1", "--rollout_prompts=1",
              "--max_new_tokens=8", "--eval_n=2", "--save_every=1", "--lr=1e-4", *common)
    assert "step 1/1" in out
    grpo = M.from_pretrained(str(tmp_path / "grpo" / "ckpt" / "latest"))
    start = M.from_pretrained(str(base))
    assert grpo.config["model_type"] == start.config["model_type"]
    moved = [n for (n, p), (_, q) in zip(grpo.named_parameters(), start.named_parameters())
             if not torch.equal(p, q)]
    assert moved, "no parameter changed through Stage 1 + Stage 2"

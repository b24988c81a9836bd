"""Stage 1, Supervised Timestamp Alignment (STA): fine-tune an audio-language model to say when a phrase
is spoken ("The segment <phrase> starts at X seconds and ends at Y seconds."), loss on answer tokens only.
The result is the reference policy that Stage 2 (train_grpo.py) starts from.

Built-in tiny default (CPU, no download):
    python train_sta.py                              # identical to: --config configs/sta_tiny.json
  Missing pieces are built first: the synthetic corpus (python data.py synth: out/synth/train seed 0,
  out/synth/heldout seed 1), a SentencePiece tokenizer trained on the corpus text (out/sta_tiny/tokenizer.model),
  and a tiny Qwen2-Audio-layout LALM from scratch (Whisper-style encoder, avg-pool to 25 audio tokens/s,
  linear projector, Qwen2 decoder; features not padded to 30 s). The checkpoint is out/sta_tiny/ckpt/latest:
  model.from_pretrained and tokenizer.load_tokenizer both load it (tokenizer.model is saved inside), and
  `python eval.py sta --checkpoint out/sta_tiny/ckpt/latest --manifest out/synth/heldout/sta.jsonl --out sta.json`
  scores it on the held-out pairs. Measured (2026-11-23 session 12, 2 CPU cores, 2 threads, the pipeline's run):
  1200 steps x 8 clips (~53 examples) in 13.9 min (median 0.67 s a step, ~80 examples/s, ~5,000 tokens/s;
  tokenizer and data loading included); held-out mean IoU 0.743 (800 pairs, seed 1; 71.9 % >= 0.7, 80.0 % >= 0.5,
  SED-F1 0.72; 0.740 in the prototype's run of 1300 steps; --seed=2: 0.739 in 12.4 min, 72.8 % >= 0.7).
  1300 steps took 14.0-16.9 min in sessions 10-12 as the host's speed varied (0.62-0.74 s a step), so the
  default stops at 1200. Session 11's recipe, without (h) and (e)'s digits and with ends read before them:
  0.67-0.68 (three runs); session 10's, without (g) as well: 0.60 (0.58-0.61 in three runs); session 6's,
  without (e), (f), (g): 0.48 (37 % >= 0.7, SED-F1 0.42); with 1100 steps 0.45, and 0.47 with --seed=2.
  Session 12 ((h), digits in (e), ends read after them in (f)): with the right time piece, the written
  hundredths had been a guess (exact 9-11 %, mean error 3.0 hundredths: chance), and 30 % of the start pieces
  were one off. Runs of 1300 steps, 800 pairs each: the audio tokens named to the hundredth, and both the piece
  and the digit read from the one token at t by the same head: 0.600 (digits exact 34 %, but 33 % of the starts
  more than 0.3 s off, mostly on another word's onset); the piece read from [t, t + 0.12 s) again: 0.683; the
  digit on a head of its own, (h): 0.706; and ends read from [t, t + 0.12 s) instead of the phrase's last
  tokens [t - 0.12 s, t), which start before t and name an earlier time: 0.740 (SED-F1 0.73, 72.9 % >= 0.7;
  starts within 0.02 s 68 % (23 % before), ends 62 % (17 %); by phrase length 0.68 / 0.73 / 0.75 / 0.79;
  the pipeline's run of 1200 steps: 0.743, ends 60 %, 0.68 / 0.71 / 0.76 / 0.80). "Before" is a run of session
  11's recipe with the audio attending both ways (below; 0.665). Phrases whose first word is spoken twice
  still score 0.48 (0.51 in the pipeline's run; the rest 0.80). Tried for them: the decoder's
  audio tokens of a clip attending to each other both ways (so the "the" of "the yellow horse" sees "yellow";
  a prefix-LM mask in the prototype, generation included): 0.665 overall, those phrases 0.456, no change.
  Session 10: (e) + (f) take the held-out IoU from 0.48 to 0.60-0.61 (three runs); each alone does not help:
  (e) alone (scale 10) 0.48 (800 pairs; 64-pair evaluations 0.32 / 0.38 / 0.39 / 0.48 after 325 / 650 / 975 /
  1300 steps, the old recipe 0.24 / 0.39 / 0.43 / 0.46, both together 0.33 / 0.45 / 0.45 / 0.55 and 0.29 / 0.35 /
  0.52 / 0.60 in two runs), (f) alone (weight 1) 0.29 / 0.31 after 325 / 650, (f) with (e) at scale 1 (the
  embedding then ~7 % of an audio token's norm: the projector's rows have RMS 1.7, the embeddings 0.13) 0.27 /
  0.36. Probed after 650 steps (teacher-forced, 400 held-out times): the supervised head's most attended audio
  token is within 0.15 s of the target 60 % of the time with (f) alone and 70 % with (e) + (f); the model
  trained with (e) + (f) starts its phrases with a median error of 0.08 s (0.18 s before), 21 % of the starts
  are more than 0.7 s off (24 % before), mostly on another word of the same kind ("sits" -> the clip's other
  verb "sleeps", "gold" -> "orange"); IoU by phrase length 0.42 / 0.56 / 0.64 / 0.74 for 1-4 words (0.26 / 0.43
  / 0.53 / 0.64 before) and by start second 0.73 / 0.61 / 0.37 / 0.26 for starts in [0,1) .. [3,4) s.
  Session 11: the audio rows of that model name their word through the LM head for 94 % of the held-out words
  (70 % of the frames), so the wrong starts were not misheard words: the head matched the phrase's place in
  the sentence, not its words. (g) takes the held-out IoU from 0.60 to 0.67 (0.6705 in the prototype's run,
  whose targets are the same as (g)'s on 400 checked clips; 64-pair evaluations 0.30 / 0.39 / 0.55 / 0.61; SED-F1
  0.71, 64.5 % >= 0.7, 78.8 % >= 0.5): starts more than 0.7 s off 13 % (21 %), median start error 0.06 s, IoU by
  phrase length 0.54 / 0.64 / 0.71 / 0.77, by start second 0.78 / 0.69 / 0.52 / 0.23. Variants, 800 pairs each:
  (g) in decoder layer 1 of 3 instead of the last 0.59; every word outside the templates, function words
  included, 0.61 at weight 1.0, and 0.65 at 0.5 with the answer's copy of the phrase also pointed at the
  occurrence it names (a repeated "the" included); that plus a training-only head predicting each audio
  token's next word from the encoder (so a "the" could carry "yellow" after it) 0.67. What is left: phrases
  whose first word is spoken twice in the clip (155 of 800: "the yellow horse", "has a purple table") score
  0.39-0.49 in every run of this session (0.45 in session 10), 37-43 % of their starts more than 0.5 s off,
  mostly on the other occurrence, against 0.72-0.74 for the rest with (g) (0.64 before). The decoder reads the
  audio causally, so the audio token of the right "the" cannot see the "yellow" after it, and neither naming
  the occurrence nor the encoder's next-word context taught the head to pick it in this budget.
  The corpus's word times are exact to ~10 ms: espeak's WORD events fall 8-15 ms before the acoustic onset
  of words spoken after a 300 ms pause (checked on two voices). The old recipe also underfits: on 800 of its
  training pairs it scores 0.54 (held-out 0.48).
  Time pieces (`time_pieces`, on in the tiny default): the tokenizer holds "0.0" .. "29.9" as one piece each, so
  a time is written "1.5" "5" instead of "1" "." "5" "5". Without them (1100 steps) 0.37 (SED-F1 0.17;
  0.35 with seed 2; sessions 2-4's recipe 0.41-0.43); with them the answers' durations are unbiased (mean
  predicted minus true duration 0.00 s, was +0.31 s) and the median start error is 0.20 s (was 0.29 s).
  Found with a decoder-only oracle (perfect audio: each 40 ms audio token is a learned embedding of the word
  spoken there, no encoder; 600 steps of 32 pairs, 400 held-out pairs): 0.29 IoU with digit tokens, 0.42 with
  time pieces; a time code in the oracle's audio tokens (sin/cos of periods 10 s, 1 s, 0.1 s) did not help
  (0.28), nor (+0.02) adding each audio token the embedding of its time piece. So with perfect word
  recognition the decoder is no better than the full model: the limit is the decoder finding the phrase in
  the audio and writing its time, not the encoder. Session 7, same oracle: 1500 steps 0.48 (0.38 at 600, 0.41
  at 900, 0.44 at 1200 of that schedule); at 300 steps (unchanged oracle: 0.30-0.34) no better with audio tokens equal
  to the text input embedding of their word's first piece (0.30; 0.33 added to the learned ones), learned
  onset/offset vectors on each word's first/last token (0.28), or half (0.19) or all (0.23) of the training
  pairs from word-shuffled clips (no sentence template to lean on; 0.28 and 0.26 vs 0.42 at 600 steps);
  6 layers x 128 wide (about the same FLOPs) 0.24 at 300, 0.38 at 600; the question before the audio (so each
  audio token can attend to the phrase) 0.42 at 600, the same as after it.
  By phrase length (1300 steps): IoU 0.26 / 0.44 / 0.53 / 0.64 for 1 / 2 / 3 / 4 words; 53 % of the one-word
  answers overlap the word at all, and a phrase whose first word occurs twice in the clip scores 0.37
  (unique first word 0.50).
  More steps and more data (session 8, on one H100, fp32, the default recipe with --max_steps and its cosine
  stretched; 64 held-out pairs per evaluation): 8,000 steps (248 s, 1,450-2,100 samples/s) give 0.39 / 0.45 /
  0.49 / 0.52 / 0.49 / 0.45 / 0.48 / 0.45 after 1,000 .. 8,000 steps, while the training loss falls from 0.66
  (step 1,300) to 0.25 and the alignment loss to 0.0006: past ~4,000 steps the model memorises its 2,000
  clips. 20,000 clips with a 5,000-step schedule: 0.39 / 0.45 / 0.52 after 1,000 / 2,000 / 3,000 steps, the
  same curve. So neither 6x the compute nor 10x the data takes this recipe near 0.7.
  Session 9: the start written right after the phrase's first word and the end right after its last ("The
  segment gold starts at gold 0.56 and ends at gold 0.88 seconds.", the transcripts' word-then-time order, so
  the query for each time is the word itself, one hop): 0.47 after 1300 steps (0.23 / 0.41 / 0.56 / 0.64 for 1-4
  words), no better; in the decoder-only oracle with each audio token also carrying its time piece's embedding,
  0.40 after 600 steps against 0.44 with the paper's wording, and with the audio tokens also holding their
  word's text embedding (so the word token's query meets its own embedding) 0.33 at 300 steps (paper wording
  without either: 0.30-0.34). The default checkpoint transcribing 200 held-out clips writes word onsets within 0.11 s
  (median; 3 % off by more than 0.5 s), so the model does know when words are spoken when it reads the audio in
  order; spans read off its transcripts (end = the next word's onset) by word index would score 0.66 (with the
  true end where the phrase ends the clip), but by finding the phrase's words in them only 0.36 (a recognition
  error anywhere in the phrase loses it), which bounds a transcribe-then-answer format.
  Before session 10 (the old recipe, in all of this paragraph) errors grew with the phrase's start: IoU 0.61 / 0.44
  / 0.30 / 0.25 for starts in [0,1) / [1,2) / [2,3) / [3,4) s, slope of predicted on true start 0.52; the start's
  second is right 65 % of the time, its tenth 20 % (within one tenth 45 %), and 24 % of the starts are off by more
  than 0.7 s (a wrong region). Earlier analysis (digit tokens, sessions 3-4): teacher-forced on 160 held-out
  answers, the model copies the phrase (99.5% of tokens) and names the right start second 60% of the time, but the
  tenth only 18% (chance 10%); a decimal time code in the encoder positions did not help (0.28 vs 0.38 IoU after 400
  steps of 16 clips), nor did (64 held-out pairs, default 0.37 at the end) 3 min of encoder-only alignment
  pre-training (the alignment loss then ends at 0.2 instead of 1.4, IoU 0.34: word recognition is not the limit), a
  decoder target naming each audio token's tenth of a second (0.31), a 4-layer decoder in the same time (0.26), or
  time markers ("0.2", "0.4", ...) among the audio placeholders on top of that pre-training (0.24). Held-out errors
  grow with the phrase's start time (median start error 0.14 s before 1 s, 0.97 s for starts in 2-3 s): predicted
  starts stop growing near 1.4 s (mean prediction 1.41 s for true starts in 1.5-2 s, 1.34 s for 2-2.5 s; slope of
  predicted on true start 0.40), so the model's reading of a late audio token's time saturates. Whisper sinusoids of
  the token index (amplitude 0.5) added to the projector output did not change that (session 4, 1100 steps: IoU 0.36
  on the 800 pairs, slope 0.37).
  QA answers: the synthetic reference answers end with the option's text ("Final answer: gold"), not its
  letter. With letters ("Final answer: (d) gold", sessions 1-4) the answers were at chance (26.5 %): teacher-
  forced on the reference reasoning the correct letter got p = 0.250 (200 held-out questions), i.e. the letter
  was never bound to the option it names, and 4 rotations of the options, 15 % of look-up questions
  ('Which option is "gold"?') or a sentence "So the answer is gold." before the final line did not change that.
  Text only, this decoder does not learn the look-up at all (also with 6 layers, or with 2 options), while it
  learns to copy the question's word in 250 steps: an induction-style circuit that does not form in this
  budget (numbers in data.py's docstring). Naming the option by its text, which reward.extract_choice and the
  official scorers read, removes the look-up; Stage 2 then has an answer to improve (train_grpo.py).
Paper runs (released 7B LALMs; 8 GPUs x per-GPU batch 8 x grad accumulation 4, lr 2e-5, bf16, FSDP2):
    # smoke tests: full fine-tuning keeps ~16 bytes per parameter (fp32 weights, gradients, AdamW moments), ~132 GB
    # for the Omni thinker: FSDP2 over several GPUs (~33 GB each on 4), or on one GPU the audio side only
    torchrun --standalone --nproc_per_node=4 train_sta.py --config configs/sta_qwen2_5_omni.json --max_steps=10
    python train_sta.py --config configs/sta_qwen2_5_omni.json --max_steps=10 --freeze_decoder=true
    torchrun --standalone --nproc_per_node=8 train_sta.py --config configs/sta_qwen2_5_omni.json \
        --init_from=/ckpt/Qwen2.5-Omni-7B --data_dir=/data/sta/train --eval_data_dir=/data/sta/heldout
    torchrun --standalone --nproc_per_node=8 train_sta.py --config configs/sta_audioflamingo3.json ...
    torchrun --standalone --nproc_per_node=8 train_sta.py --config configs/sta_qwen2_audio.json ...
  data_dir holds sta.jsonl (data.py sta builds it from word-timestamp files). Any key can be overridden with
  --key=value; unknown keys and wrong types are errors. Re-running the same command resumes from
  <out_dir>/ckpt/latest and reproduces the uninterrupted run's losses (weights, AdamW state, data position,
  RNG states are all in the checkpoint); a re-run that changes the recipe (lr, max_steps, a loss weight, ...)
  is refused with the list of changed settings (RESUME_FREE: the ones it may change). Multi-process runs
  shard each global batch deterministically (micro-batch j of a step goes to rank j % world), so 1 process x
  accumulation 2k gives the losses of 2 processes x accumulation k; rank 0 alone logs and saves.

Output: one greppable line per step (`step 120/1500 | loss 0.71 | lr 1.9e-03 | grad 0.66 | tok/s 2950 |
samples/s 18.1 | 160.3 s`), a tqdm bar on a terminal, <out_dir>/metrics.jsonl (one JSON line per step), and
every eval_every steps a greedy decode of eval_n held-out pairs scored by mean temporal IoU (spans parsed by
reward.extract_spans, shared with eval.py), with a few samples printed. A NaN/inf loss or gradient norm stops
the run naming the step and the batch, before the optimizer step, so the last checkpoint stays the last good one.

Deviations from the paper:
  * The paper fine-tunes released 7B LALMs (Qwen2.5-Omni, Audio Flamingo 3) on ~268k pairs from LibriSpeech,
    CoVoST 2, MELD, multi-speaker dialogue and YouTube-8M with whisper-timestamped word times. The tiny
    default trains a ~3M-parameter LALM from scratch on a synthetic espeak-ng corpus with exact word times,
    at lr 2e-3 (training from scratch, not fine-tuning), fp32, one process.
  * A released LALM already follows instructions and transcribes; ours starts from nothing. So the tiny
    default's Stage 1 mix also holds (a) the corpus's multiple-choice questions answered in the grounded
    reasoning format ("From X s to Y s, the speaker says ... Final answer: <option>"), a fraction
    reasoning_frac (0.15), so that Stage 2 (GRPO) starts from a policy that writes the format, and
    (b) word-timestamped transcripts ("anna 0.31 has 0.72 a 0.90 ..."), a fraction transcribe_frac (0.25):
    every word with its onset, a much denser alignment signal than one phrase per example, which a
    from-scratch model needs (held-out IoU 0.34 vs 0.20 without it at step 450, 32 pairs: noisy).
    The paper's Stage 1 is STA pairs only (both fractions 0 in the paper configs).
  * Two more aids of the tiny default, off in the paper configs: (c) `pack`: the examples of one clip share
    one row behind one copy of the audio (data.collate_packed; each branch sees the audio prefix and itself
    at its own positions, so the loss and gradients are exactly those of separate rows), ~2.2x the examples
    per second; batch_size then counts clips; (d) `align_weight`: a frame-word alignment loss, each audio token
    (projector output) read through the LM head must name the word spoken at its centre (word times from
    words.jsonl; align_labels), which gives a from-scratch encoder the word recognition a released LALM brings
    from pre-training. Neither changes the checkpoint layout; the alignment loss needs no extra parameters.
  * Two that find the phrase and read its time (session 10), off in the paper configs: (e) `audio_time_embedding`:
    each audio token's input also holds 10x the input embeddings of the time piece and the hundredths digit of
    its start ("0.5" + "6" for the token of 0.56-0.60 s; model.LALM.audio_time_rows; sessions 10-11: the piece
    of its centre only), so a decoder attending to an audio token can read its time from it (with RoPE the
    attention values carry no position); (f) `ground_weight`: a grounding attention loss, where the answer
    writes a time piece, one head of the last decoder layer (`ground_head`) is trained to put its attention on
    the audio of [t, t + 0.12 s) (ground_targets; sessions 10-11 read an end from [t - 0.12 s, t)), the loss
    being -log of that mass (weight 0.25 per time; 0.5 in sessions 10-11). (f) leaves the checkpoint as it is;
    (e) is one more key in config.json, which our model.py (so eval.py, train_grpo.py) honours and
    transformers' Qwen2-Audio would ignore. A released LALM would need neither in principle; the paper's
    Stage 1 has no such losses.
  * One that teaches which audio a word of the text is (session 11), off in the paper configs: (g)
    `mention_weight`: a mention grounding loss, every mention in a row's text (question or answer) of a content
    word spoken once in the clip trains the same head, from the mention's last token, to attend to that word's
    audio (mention_targets: "gold" in the question and in the answer's copy of the phrase, a transcript's words,
    a reasoning's quoted words; function and template words and words spoken twice are left out), the loss
    being -log of that mass (weight 0.5, per mention; ~190 mentions per batch of 8 clips, about as many as
    times). With (f) alone the head learned where the answer's phrase sits in the sentence more than which
    word it is ("sits" -> the clip's other verb); (g) asks for the word itself, at every mention. It leaves the
    checkpoint as it is.
  * One that reads a time to the hundredth (session 12), off in the paper configs: (h) `digit_weight`: where the
    answer writes a time's hundredths digit, a second head of the last layer (`digit_head`) is trained, from
    the piece before the digit, to attend to the one audio token at that time (audio_index(t), whose start is
    within 0.02 s of t, and whose time embedding names that start to the hundredth), the loss being -log of
    that attention (weight 0.25, per time). Before it the digit was a guess: with the piece right, the
    written hundredths were exact 9-11 % of the time (chance 10 %). On the same head as (f) it helped less
    (0.683 vs 0.706 held-out IoU): one head that both finds a word by its content and a token by its time
    finds the word less often. It leaves the checkpoint as it is.
  * Not in the paper (it gives only the lr, batch and accumulation): linear warmup + cosine decay to min_lr,
    AdamW betas and weight decay, gradient clipping at 1.0, one epoch (~1047 steps of 256) for the 7B runs.
    Loss = mean cross-entropy over all answer tokens of the global batch (not a mean of per-example means).
  * Released checkpoints are trained in fp32 master weights with bf16 autocast / FSDP2 bf16 compute and saved
    in fp32 (the release is bf16), so that resuming is exact.
"""
import collections
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import runlib
from audio_encoder import AUDIO_TOKENS_PER_SECOND, SECONDS_PER_AUDIO_TOKEN, encoder_config
from model import rotate_half

# ---------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # data
    data_dir: str = "out/synth/train"       # sta.jsonl (+ qa.jsonl); synthesised if missing and synth_n > 0
    eval_data_dir: str = "out/synth/heldout"  # held-out pairs (a different synth seed)
    synth_n: int = 2000                     # clips to synthesise when data_dir is missing (0: never synthesise)
    synth_seed: int = 0
    eval_synth_n: int = 100
    eval_synth_seed: int = 1
    reasoning_frac: float = 0.15            # fraction of training examples that are QA with a reasoning target
    transcribe_frac: float = 0.25           # fraction that are word-timestamped transcripts (words.jsonl)
    pack: bool = True                       # tiny default: one row per clip, its examples as branches behind one
                                            # copy of the audio (data.collate_packed); batch_size counts clips
    align_weight: float = 0.5               # tiny default: weight of the frame-word alignment loss (0: off; needs
                                            # words.jsonl word times; see align_labels)
    ground_weight: float = 0.25             # tiny default: weight of the grounding attention loss (0: off; needs
                                            # the time pieces; see ground_targets)
    ground_head: int = 0                    # the head of the last decoder layer that this loss supervises
    ground_seconds: float = 0.12            # ... to attend to the audio of [t, t + this) for a time t
    digit_weight: float = 0.25              # tiny default: weight of the digit grounding loss (0: off; needs
                                            # the time pieces)
    digit_head: int = 1                     # the head of the last layer that it supervises: each time's hundredths
                                            # digit read off its one audio token (see ground_targets)
    mention_weight: float = 0.5             # tiny default: weight of the mention grounding loss (0: off; needs
                                            # words.jsonl word times; see mention_targets)
    mention_layer: int = -1                 # the decoder layer whose head ground_head this loss supervises (-1:
                                            # the last, with the times; layer 1 of 3 measured 0.59, the last 0.67)
    audio_time_embedding: float = 10.0      # tiny model built from scratch: each audio token also gets this times
                                            # the embeddings of its time piece and hundredths digit
                                            # (model.LALM.audio_time_rows; 0: not)
    timestamps: bool = True                 # False: the "reasoning SFT without timestamps" ablation (no STA
                                            # pairs; QA reasoning and transcripts with every time removed)
    family: str = "qwen2_audio"             # chat template / architecture family
    pad_to_30s: bool = False                # pad features to one 30 s Whisper window (what released models saw)
    # model
    init_from: str = ""                     # released/our checkpoint dir; "" = build the tiny model from scratch
    tokenizer: str = ""                     # tokenizer path; "" = init_from's, or train one on the corpus
    vocab_size: int = 1024                  # SentencePiece vocab of the tiny default
    time_pieces: bool = True                # tiny default tokenizer: "0.0".."29.9" are one piece each
                                            # (tokenizer.TIME_PIECES), so a time is 2 tokens, not 4 digits
    n_mels: int = 80
    enc_dim: int = 128
    enc_layers: int = 2
    enc_heads: int = 4
    dec_dim: int = 192
    dec_layers: int = 3
    dec_heads: int = 4
    # optimisation
    max_steps: int = 1200
    batch_size: int = 8                     # per process, per micro-step (clips when pack, else examples)
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0
    dtype: str = "float32"                  # "bfloat16": autocast on GPU (fp32 master weights)
    activation_checkpointing: bool = False
    freeze_encoder: bool = False
    freeze_adapter: bool = False
    freeze_decoder: bool = False
    strategy: str = "ddp"                   # "ddp" (replicas) or "fsdp" (FSDP2 sharding, for 7B)
    # run
    out_dir: str = "out/sta_tiny"
    seed: int = 1337
    device: str = "auto"
    eval_every: int = 300
    eval_n: int = 64                        # held-out pairs decoded per evaluation
    eval_batch_size: int = 16
    max_new_tokens: int = 48
    save_every: int = 300
    keep_last: int = 2
    resume: bool = True                     # continue from out_dir/ckpt/latest when it exists
    stop_at: int = 0                        # stop after this step (0: max_steps) keeping the schedule of max_steps
    log_every: int = 1


# settings a run may change when it resumes: they do not change what is trained (greedy evaluation draws no
# random numbers); any other change is an error (runlib.check_resume)
RESUME_FREE = {"out_dir", "device", "resume", "stop_at", "log_every", "save_every", "keep_last", "eval_every",
               "eval_n", "eval_batch_size", "max_new_tokens", "eval_data_dir", "eval_synth_n", "eval_synth_seed"}


# ---------------------------------------------------------------------------
# Data: corpus (synthesised if missing), example mix, deterministic sharded batches


def ensure_corpus(data_dir, n, seed, dist):
    """Synthesise the tiny default's corpus on rank 0 when it is missing; other ranks wait."""
    if dist.is_main and not os.path.exists(os.path.join(data_dir, "sta.jsonl")):
        if n <= 0:
            raise FileNotFoundError(f"{data_dir}/sta.jsonl not found (set data_dir, or synth_n > 0 to synthesise)")
        here = os.path.dirname(os.path.abspath(__file__))
        cmd = [sys.executable, os.path.join(here, "data.py"), "synth", "--out", data_dir, "--seed", str(seed), "--n", str(n)]
        print("building corpus:", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    if dist.distributed:
        torch.distributed.barrier()


TRANSCRIBE_QUESTION = "Transcribe the audio with the start time of each word."


def transcripts(data_dir):
    """Word-timestamped transcripts ("i 0.35 see 0.50 a 0.78 ...") from the corpus's words.jsonl: a dense
    alignment signal (every word, every onset) that a from-scratch model learns STA from much faster."""
    path = os.path.join(data_dir, "words.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"transcribe_frac > 0 needs {path} (or set --transcribe_frac=0)")
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            answer = " ".join(f"{w['word']} {w['start']:.2f}" for w in r["words"])
            out.append({"audio": os.path.join(data_dir, r["audio"]), "question": TRANSCRIBE_QUESTION,
                        "answer": answer, "duration": r["duration"]})
    return out


def load_examples(data_dir, reasoning_frac, transcribe_frac, seed):
    """STA pairs, plus QA records answered with their grounded reasoning (a fraction reasoning_frac of the mix)
    and word-timestamped transcripts (transcribe_frac); extras are drawn without replacement while they last,
    deterministically in seed."""
    import data
    sta = data.load_examples(os.path.join(data_dir, "sta.jsonl"), kind="sta")
    if reasoning_frac < 0 or transcribe_frac < 0 or reasoning_frac + transcribe_frac >= 1:
        raise ValueError(f"need reasoning_frac, transcribe_frac >= 0 with a sum < 1, found {reasoning_frac}, "
                         f"{transcribe_frac}")
    n_total = len(sta) / (1 - reasoning_frac - transcribe_frac)
    rng = random.Random(seed)
    mix = sta
    for frac, what in ((reasoning_frac, "qa"), (transcribe_frac, "transcripts")):
        if frac == 0:
            continue
        if what == "qa":
            qa_path = os.path.join(data_dir, "qa.jsonl")
            if not os.path.exists(qa_path):
                raise FileNotFoundError(f"reasoning_frac > 0 needs {qa_path} (or set --reasoning_frac=0)")
            pool = [r for r in data.load_examples(qa_path, kind="qa") if r.get("reasoning")]
            if not pool:
                raise ValueError(f"{qa_path} has no record with a 'reasoning' target (set --reasoning_frac=0)")
        else:
            pool = transcripts(data_dir)
        n, picked = round(frac * n_total), []
        while len(picked) < n:
            picked += rng.sample(pool, min(len(pool), n - len(picked)))
        mix = mix + picked
    return mix


SPAN_PREFIX = re.compile(r"From \d+(?:\.\d+)?s to \d+(?:\.\d+)?s, ")   # the corpus's reasoning openers
WORD_TIME = re.compile(r" \d+\.\d\d(?= |$)")                           # "anna 0.31 has 0.72" -> "anna has"


def without_timestamps(examples):
    """The ablation's mix: STA pairs dropped (they are nothing but timestamps), grounded reasoning with its
    spans cut ("From 1.20s to 1.85s, the speaker says ..." -> "The speaker says ...") and transcripts
    without word times; the QA and transcripts are repeated to keep the number of examples."""
    kept = []
    for e in examples:
        if "choices" in e:
            text = re.sub(r"(^|\. )([a-z])", lambda m: m[1] + m[2].upper(), SPAN_PREFIX.sub("", e["reasoning"]))
            kept.append({**e, "reasoning": text})
        elif e.get("question") == TRANSCRIBE_QUESTION:
            kept.append({**e, "answer": WORD_TIME.sub("", e["answer"])})
    if not kept:
        raise ValueError("timestamps=false needs reasoning_frac or transcribe_frac > 0 (nothing left to train on)")
    return [kept[i % len(kept)] for i in range(len(examples))]


def word_times(data_dir, tok):
    """{absolute audio path: [(token ids of the word, start, end, word), ...]} from the corpus's words.jsonl
    (data.read_words_jsonl; malformed lines are counted and reported), tokenised once for align_labels and
    mention_targets."""
    import data
    path = os.path.join(data_dir, "words.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"align_weight or mention_weight > 0 needs word times in {path} (or set both to 0)")
    skips = data.Skips(path)
    out = {os.path.abspath(audio): [(tuple(tok.encode(" " + w.word)), w.start, w.end, w.word) for w in words]
           for audio, words in data.read_words_jsonl(path, skips)}
    skips.report()
    return out


def audio_index(t):
    """The first audio token whose centre (k + 0.5) x 0.04 s is at or after t seconds."""
    return math.ceil(round(t * AUDIO_TOKENS_PER_SECOND - 0.5, 6))


def audio_keys(audio_pos, a, z):
    """Positions [first, stop) of the audio tokens whose centres lie in [a, z) seconds (at least one), given the
    row's audio placeholder positions; None when a lies past the clip."""
    first = max(0, audio_index(a))
    if first >= len(audio_pos):
        return None
    return audio_pos[first], audio_pos[min(len(audio_pos), max(first + 1, audio_index(z))) - 1] + 1


def align_labels(examples, input_ids, audio_token_id, words_of):
    """Frame-word alignment targets for the audio rows of a batch (placeholder order): audio token k of a clip
    covers [k, k + 1) x 0.04 s; its target is the first token of the word spoken at the token's centre, -100
    (ignored) in silence or for clips without word times (words_of: word_times). The loss reads the
    projector's output through the LM head, so each audio token learns to look like the word it holds:
    what a from-scratch model lacks to find a phrase in the audio (a released LALM brings it from pre-training)."""
    labels = []
    for ex, n in zip(examples, (input_ids == audio_token_id).sum(-1).tolist()):
        row = [-100] * n
        for ids, start, end, _ in words_of.get(os.path.abspath(ex["audio"]), []):
            for k in range(max(0, audio_index(start)), min(n, audio_index(end))):
                row[k] = ids[0]                                       # centre (k + 0.5) * 0.04 in [start, end)
        labels += row
    return torch.tensor(labels, dtype=torch.long)


TIME_NUMBER = re.compile(r"\d+\.\d\d")                                # "0.56" in an answer


def ground_targets(groups, input_ids, loss_mask, audio_token_id, time_token_ids, seconds, skips):
    """Targets of the two time grounding attention losses, each (N, 4) long rows (batch row, query position,
    first audio key position, stop key position). Every timestamp t of an answer (a start, an end, a word
    onset) is written as a time piece and a digit ("0.5" "6"), and both are read off the audio from t on:
      times:  the position that predicts the piece (the token before it) should attend to the audio tokens
              whose centres lie in [t, t + seconds): where the phrase starts, or what follows its end;
      digits: the position that predicts the digit (the piece) should attend to the one audio token
              audio_index(t), whose start, within 0.02 s of t, the time embedding names to the hundredth
              (model.LALM.audio_time_rows): "0.5" "6" for the token of 0.56 s.
    An end is read after it, not from the phrase's last tokens, because those start before t and so name an
    earlier time (measured: 0.706 held-out IoU with ends read from [t - seconds, t), 0.740 from [t, t +
    seconds)). groups: the examples of each row (one each without packing), in the row's order. A row whose
    time pieces do not match its answers' times one to one is left out and counted in skips (data.Skips)."""
    import data
    times, digits = [], []
    for b, group in enumerate(groups):
        ids = input_ids[b]
        audio_pos = (ids == audio_token_id).nonzero().flatten().tolist()
        piece_pos = (torch.isin(ids, time_token_ids) & loss_mask[b]).nonzero().flatten().tolist()
        found = [float(t) for ex in group for t in TIME_NUMBER.findall(data.target_text(ex))]
        skips.total += 1
        if len(found) != len(piece_pos) or not audio_pos:
            skips.add("time pieces != answer times", f"{group[0]['audio']}: {len(piece_pos)} time pieces, "
                      f"{len(found)} times in the answers, {len(audio_pos)} audio tokens")
            continue
        for i, t in zip(piece_pos, found):
            # an end with no audio token from t on (a phrase that ends the clip) is read from the clip's last
            # tokens, and has no digit target
            keys = audio_keys(audio_pos, t, t + seconds) or audio_keys(audio_pos, t - seconds, t)
            if keys:
                times.append((b, i - 1, *keys))
            keys = audio_keys(audio_pos, t, t + SECONDS_PER_AUDIO_TOKEN)
            if keys:
                digits.append((b, i, *keys))
    return tuple(torch.tensor(rows, dtype=torch.long).reshape(-1, 4) for rows in (times, digits))


ENGLISH_FUNCTION_WORDS = ("a an the and or but of to in on at by for with from as than then so if not no is are was "
                          "were be been am do does did has have had i you he she it we they me him her us them my "
                          "your his its our their this that these those there here").split()


def stop_words():
    """Words whose mentions mention_targets leaves out: the words of the fixed question and answer templates
    (the STA pair's, the transcript's, the grounded reasoning's: "and" in "seconds and ends at" is no mention of
    a spoken "and") and function words, the corpus's (data.FUNCTION_WORDS) and English ones (a "the" or "has" in
    a question rarely points at one spoken word; measured: grounding every mention outside the templates 0.61-0.65
    held-out IoU, content words only 0.67)."""
    import data
    templates = (data.STA_QUESTION, data.STA_ANSWER, TRANSCRIBE_QUESTION, data.REASONING_CITE, "the speaker says",
                 data.FINAL_ANSWER)
    words = re.findall(r"[a-z]+", re.sub(r"\{[^}]*\}", " ", " ".join(templates)).lower())
    return frozenset(words + data.FUNCTION_WORDS + ENGLISH_FUNCTION_WORDS)


def mention_targets(groups, input_ids, audio_token_id, words_of, tok, stop=frozenset()):
    """Targets of the mention grounding loss, rows like ground_targets' (batch row, query position, first audio
    key position, stop key position): every mention in a row's text (question or answer) of a word spoken once
    in the clip should attend, from the mention's last token, to the audio tokens whose centres lie in that
    word's [start, end). A word spoken twice is ambiguous and left out, as are the words of `stop`
    (stop_words) and a match that goes on into a longer word ("red" in "reddish"). words_of: word_times."""
    out = []
    for b, group in enumerate(groups):
        ids = input_ids[b].tolist()
        audio_pos = [i for i, t in enumerate(ids) if t == audio_token_id]
        words = words_of.get(os.path.abspath(group[0]["audio"]), []) if audio_pos else []
        at = collections.defaultdict(list)                            # token id -> its positions in the text
        for i in range(audio_pos[-1] + 1 if audio_pos else len(ids), len(ids)):
            at[ids[i]].append(i)
        spoken = collections.Counter(w[0] for w in words)
        for seq, start, end, word in words:
            keys = audio_keys(audio_pos, start, end)
            if spoken[seq] > 1 or word.lower() in stop or keys is None:
                continue
            for i in at[seq[0]]:
                last = i + len(seq) - 1
                if tuple(ids[i:last + 1]) != seq:
                    continue
                after = tok.decode(ids[last:last + 2])[len(tok.decode(ids[last:last + 1])):]
                if after[:1].isalpha():
                    continue                                          # the word goes on ("red" + "dish")
                out.append((b, last, *keys))
    return torch.tensor(sorted(out), dtype=torch.long).reshape(-1, 4)


def cache_audio(examples, audio_cache):
    """Load each clip once (the tiny corpus fits in memory)."""
    import data
    for ex in examples:
        if ex["audio"] not in audio_cache:
            audio_cache[ex["audio"]] = data.load_audio(ex["audio"])


def epoch_order(n, seed, epoch):
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def global_batch(n, seed, position, size):
    """Example indices [position, position + size) of the endless stream of per-epoch shuffles."""
    out = []
    while len(out) < size:
        epoch, offset = divmod(position, n)
        order = epoch_order(n, seed, epoch)
        take = min(size - len(out), n - offset)
        out += order[offset:offset + take]
        position += take
    return out


def training_units(examples, pack):
    """What one batch slot holds: a single example, or with pack every example of one clip (their indices)."""
    if not pack:
        return [[i] for i in range(len(examples))]
    by_audio = {}
    for i, ex in enumerate(examples):
        by_audio.setdefault(ex["audio"], []).append(i)
    return list(by_audio.values())


def rank_micro_batches(indices, examples, batch_size, grad_accum, dist):
    """Split a global batch into world*accum micro-batches (similar audio lengths together); this rank's.

    Micro-batch j goes to rank j % world: one process with accum*world micro-steps sees exactly the same
    micro-batches as world processes with accum each, so their losses and gradients agree.
    """
    indices = sorted(indices, key=lambda i: (examples[i].get("duration") or 0.0, i))
    chunks = [indices[j * batch_size:(j + 1) * batch_size] for j in range(grad_accum * dist.world_size)]
    return chunks[dist.rank::dist.world_size]


# ---------------------------------------------------------------------------
# Model: tiny from scratch or a released checkpoint; the loss module that DDP/FSDP wrap


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json", "preprocessor_config.json")


def tiny_config(cfg, tok):
    """HF-style qwen2_audio config of the tiny default (architecture dims live in the checkpoint's config.json)."""
    return {
        "model_type": "qwen2_audio",
        "architectures": ["Qwen2AudioForConditionalGeneration"],
        "audio_token_index": tok.token_to_id("<|AUDIO|>"),
        "audio_config": {
            "model_type": "qwen2_audio_encoder", "num_mel_bins": cfg.n_mels, "d_model": cfg.enc_dim,
            "encoder_layers": cfg.enc_layers, "encoder_attention_heads": cfg.enc_heads,
            "encoder_ffn_dim": 4 * cfg.enc_dim, "max_source_positions": 1500, "activation_function": "gelu",
            "scale_embedding": False,
        },
        "text_config": {
            "model_type": "qwen2", "vocab_size": tok.vocab_size, "hidden_size": cfg.dec_dim,
            "intermediate_size": 4 * cfg.dec_dim, "num_hidden_layers": cfg.dec_layers,
            "num_attention_heads": cfg.dec_heads, "num_key_value_heads": cfg.dec_heads, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": True,
            "bos_token_id": None, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
        },
        "torch_dtype": "float32",
        **({"audio_time_embedding": time_embedding(tok, cfg.audio_time_embedding)} if cfg.audio_time_embedding else {}),
    }


def time_piece_ids(tok, option):
    """Token ids of the time pieces "0.0" .. "29.9" (tokenizer.TIME_PIECES), which `option` needs."""
    import tokenizer as tokenizer_lib
    ids = [tok.token_to_id(p) for p in tokenizer_lib.TIME_PIECES]
    if None in ids:
        raise ValueError(f"{option} > 0 needs a tokenizer holding the time pieces {tokenizer_lib.TIME_PIECES[0]!r} "
                         f".. {tokenizer_lib.TIME_PIECES[-1]!r} as tokens (the tiny default's, time_pieces=true): "
                         f"set --{option}=0")
    return ids


def time_embedding(tok, scale):
    """The tiny model's config audio_time_embedding (model.LALM.audio_time_rows): the tokenizer's time pieces
    must be consecutive ids, and each digit one token."""
    ids = time_piece_ids(tok, "audio_time_embedding")
    digits = [tok.token_to_id(str(d)) for d in range(10)]
    if ids != list(range(ids[0], ids[0] + len(ids))) or None in digits:
        raise ValueError("audio_time_embedding needs the time pieces as consecutive token ids and the digits as "
                         "tokens: set --audio_time_embedding=0")
    return {"first_token_id": ids[0], "num_tokens": len(ids), "seconds_per_token": 0.1, "scale": scale,
            "digit_token_ids": digits}


class SFTLoss(nn.Module):
    """Summed next-token cross-entropy over answer tokens, computed on the selected positions only, and the
    summed auxiliary losses: with align_labels the frame-word alignment cross-entropy of the audio rows; with
    targets {kind: (N, 4) rows} (ground_targets' times and digits, mention_targets' mentions) the grounding
    attention losses, each supervising one head of one decoder layer: heads {kind: (layer, head)}.

    Logits are formed for the answer positions alone (N x V instead of B x T x V: a 152k vocab at 1k
    tokens would otherwise dominate memory). Living inside one module lets DDP/FSDP2 wrap the whole step.
    """

    def __init__(self, model, heads=None):
        super().__init__()
        self.model, self.heads, self._targets, self._losses = model, dict(heads or {}), {}, {}
        layers = model.language_model.layers
        for kind, (layer, head) in self.heads.items():
            if not -len(layers) <= layer < len(layers):
                raise ValueError(f"{kind} layer {layer} not in [-{len(layers)}, {len(layers)})")
            if not 0 <= head < layers[0].self_attn.heads:
                raise ValueError(f"{kind} head {head} not in [0, {layers[0].self_attn.heads})")
            layers[layer].self_attn.register_forward_hook(partial(self._ground_hook, kind=kind))

    def _ground_hook(self, attn, args, output, kind):
        """Inside a decoder layer's forward (its weights are gathered there under FSDP2): the summed -log of the
        attention mass that the kind's head puts on each `kind` target's audio keys. Computes q and k of that
        one head again from the layer's input (a 1/heads slice of two projections). The targets stay set until
        the next forward, so an activation-checkpointing recompute in backward repeats the same ops (as it
        must); without gradients (generation) nothing is computed."""
        targets = self._targets.get(kind)
        if targets is None or not torch.is_grad_enabled():
            return
        x, cos, sin, mask = args[:4]
        rows, query, first, stop = targets.unbind(-1)
        d, h = attn.head_dim, self.heads[kind][1]
        kv = h // (attn.heads // attn.kv_heads)

        def part(lin, j):                                                                # head j's rows
            return lin.weight[j * d:(j + 1) * d], None if lin.bias is None else lin.bias[j * d:(j + 1) * d]
        q = F.linear(x[rows, query], *part(attn.q_proj, h))                             # (N, d)
        q = q * cos[rows, 0, query] + rotate_half(q) * sin[rows, 0, query]
        k = F.linear(x, *part(attn.k_proj, kv))                                          # (B, T, d)
        k = k * cos[:, 0] + rotate_half(k) * sin[:, 0]
        B, T = k.shape[:2]
        scores = (q @ k.reshape(B * T, d).t()).view(-1, B, T)[torch.arange(len(rows)), rows].float() * d ** -0.5
        keys = torch.arange(T, device=k.device)
        visible = mask[rows, 0, query] if mask is not None else keys <= query[:, None]  # (B, 1, T, T) or causal
        scores = scores.masked_fill(~visible, float("-inf"))
        on_target = (keys >= first[:, None]) & (keys < stop[:, None])
        log_p = scores.log_softmax(-1)
        self._losses[kind] = -log_p.masked_fill(~on_target, float("-inf")).logsumexp(-1).sum()

    def forward(self, input_ids, attention_mask, loss_mask, input_features=None, feature_attention_mask=None,
                align_labels=None, position_ids=None, targets=None):
        """-> (answer loss, {"align": ..., kind: ... for each kind of heads}), all sums (0 without targets)."""
        audio = None if input_features is None else self.model.encode_audio(input_features, feature_attention_mask)
        unknown = set(targets or {}) - set(self.heads)
        if unknown:
            raise ValueError(f"targets for {sorted(unknown)}, but SFTLoss supervises heads for {sorted(self.heads)}")
        self._targets = {kind: t for kind, t in (targets or {}).items() if t is not None and len(t)}
        self._losses = {}
        hidden = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids, audio_embeds=audio,
                            return_hidden=True)                       # (B, T, D)
        select = loss_mask[:, 1:]                                     # token t is predicted at t-1
        h = hidden[:, :-1][select]                                    # (N, D)
        weight = self.model.lm_head_weight()
        loss = F.cross_entropy((h @ weight.t()).float(), input_ids[:, 1:][select], reduction="sum")
        aux = {"align": loss.new_zeros(())}
        if align_labels is not None and audio is not None:
            keep = align_labels >= 0                                  # (N_audio,)
            aux["align"] = F.cross_entropy((audio[keep] @ weight.t()).float(), align_labels[keep], reduction="sum")
        aux.update({kind: self._losses.get(kind, loss.new_zeros(())) for kind in self.heads})
        return loss, aux


def freeze(model, cfg):
    """requires_grad=False on the chosen parts of the LALM; returns the number of frozen parameters."""
    parts = {"audio_tower": cfg.freeze_encoder, "multi_modal_projector": cfg.freeze_adapter,
             "language_model": cfg.freeze_decoder}
    frozen = 0
    for part, on in parts.items():
        if on:
            for p in getattr(model, part).parameters():
                p.requires_grad_(False)
                frozen += p.numel()
    return frozen


def enable_activation_checkpointing(model):
    """Recompute each transformer block in backward (every block of every nn.ModuleList)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                block.forward = partial(checkpoint, block.forward, use_reentrant=False)


# ---------------------------------------------------------------------------
# Held-out evaluation: decode greedily, parse the span, temporal IoU with the truth


@torch.no_grad()
def evaluate(model, step_module, tok, pairs, cfg, n_mels, dist, autocast, audio_cache):
    """Mean IoU and fraction >= 0.7 over `pairs`, plus a few decoded samples. Every rank decodes the same
    pairs (identical work, so FSDP2's collectives line up); rank 0 reports."""
    import data
    import model as model_lib
    import reward
    model.eval()
    if hasattr(step_module, "unshard"):                               # FSDP2: gather the root's own parameters
        step_module.unshard()
    ious, samples = [], []
    for i in range(0, len(pairs), cfg.eval_batch_size):
        chunk = pairs[i:i + cfg.eval_batch_size]
        batch = data.collate_prompts(chunk, tok, cfg.family, n_mels, cfg.pad_to_30s, audio_cache=audio_cache)
        batch = {k: v.to(dist.device) for k, v in batch.items() if torch.is_tensor(v)}
        with autocast:
            tokens, lengths, _ = model_lib.generate(
                model, batch["input_ids"], batch["attention_mask"], batch.get("input_features"),
                batch.get("feature_attention_mask"), max_new_tokens=cfg.max_new_tokens, temperature=0.0,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for ex, row, n in zip(chunk, tokens.tolist(), lengths.tolist()):
            text = tok.decode(row[:n], skip_special_tokens=True)
            spans = reward.extract_spans(text)
            iou = reward.temporal_iou(spans[0], (ex["start"], ex["end"])) if spans else 0.0
            ious.append(iou)
            if len(samples) < 3:
                samples.append({"truth": [ex["start"], ex["end"]], "pred": text, "iou": round(iou, 4)})
    if hasattr(step_module, "reshard"):
        step_module.reshard()
    model.train()
    return sum(ious) / max(1, len(ious)), sum(i >= 0.7 for i in ious) / max(1, len(ious)), samples


# ---------------------------------------------------------------------------
# Training


def main(argv=None):
    cfg = runlib.parse_config(Config, sys.argv[1:] if argv is None else argv)
    import data
    import model as model_lib
    import tokenizer as tokenizer_lib

    dist = runlib.setup_dist(cfg.device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    log = runlib.start_run(cfg, dist)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    # data (+ the tiny default's corpus and tokenizer, built once)
    ensure_corpus(cfg.data_dir, cfg.synth_n, cfg.synth_seed, dist)
    ensure_corpus(cfg.eval_data_dir, cfg.eval_synth_n, cfg.eval_synth_seed, dist)
    examples = load_examples(cfg.data_dir, cfg.reasoning_frac, cfg.transcribe_frac, cfg.seed)
    if not cfg.timestamps:
        examples = without_timestamps(examples)
    heldout = data.load_examples(os.path.join(cfg.eval_data_dir, "sta.jsonl"), kind="sta")[:cfg.eval_n]
    units = training_units(examples, cfg.pack)
    unit_info = [examples[u[0]] for u in units]                       # a unit's audio (duration) for bucketing
    latest = runlib.latest_checkpoint(ckpt_dir) if cfg.resume else None
    meta = runlib.load_meta(latest) if latest else None
    if latest:
        runlib.check_resume(latest, meta, cfg, RESUME_FREE)
    tok_path = cfg.tokenizer or (latest or cfg.init_from)
    if not tok_path:
        tok_path = os.path.join(cfg.out_dir, "tokenizer.model")
        if dist.is_main and not os.path.exists(tok_path):
            texts = [tokenizer_lib.build_prompt(cfg.family, data.prompt_text(e), 1) + data.target_text(e)
                     + tokenizer_lib.end_of_turn(cfg.family) for e in examples]
            tokenizer_lib.train_sentencepiece(texts, tok_path, cfg.vocab_size,
                                              text_pieces=tokenizer_lib.TIME_PIECES if cfg.time_pieces else ())
        if dist.distributed:
            torch.distributed.barrier()
    tok = tokenizer_lib.load_tokenizer(tok_path)
    words_of = word_times(cfg.data_dir, tok) if cfg.align_weight > 0 or cfg.mention_weight > 0 else None
    mention_stop = stop_words()
    # the checkpoint carries its tokenizer, so model.from_pretrained + tokenizer.load_tokenizer load it alone
    tok_files = [tok_path] if os.path.isfile(tok_path) else \
        [os.path.join(tok_path, f) for f in TOKENIZER_FILES if os.path.exists(os.path.join(tok_path, f))]

    # model: resume > released/our checkpoint > tiny from scratch
    if latest:
        model = model_lib.from_pretrained(latest)
    elif cfg.init_from:
        model = model_lib.from_pretrained(cfg.init_from)
    else:
        model = model_lib.build_lalm(tiny_config(cfg, tok))
    model.to(dist.device)
    n_mels = encoder_config(model.audio_tower.config)["num_mel_bins"]   # from the checkpoint, not cfg
    n_params = sum(p.numel() for p in model.parameters())
    n_frozen = freeze(model, cfg)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    use_bf16 = cfg.dtype == "bfloat16"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 and dist.device.type == "cuda" else nullcontext()
    ground_ids = torch.tensor(time_piece_ids(tok, "ground_weight" if cfg.ground_weight > 0 else "digit_weight")) \
        if cfg.ground_weight > 0 or cfg.digit_weight > 0 else None
    ground_skips = data.Skips("ground targets")
    # auxiliary losses: their weights, and the (decoder layer, head) that each grounding loss supervises
    weights = {"align": cfg.align_weight, "ground": cfg.ground_weight, "digit": cfg.digit_weight,
               "mention": cfg.mention_weight}
    aux = [kind for kind, weight in weights.items() if weight > 0]
    heads = {kind: head for kind, head in (("ground", (-1, cfg.ground_head)), ("digit", (-1, cfg.digit_head)),
                                           ("mention", (cfg.mention_layer, cfg.ground_head))) if kind in aux}

    def count(b, kind):                                               # a micro-batch's targets of one loss
        return int((b["align_labels"] >= 0).sum()) if kind == "align" else len(b["targets"][kind])
    step_module = runlib.wrap_model(SFTLoss(model, heads), dist, cfg.strategy,
                                    param_dtype=torch.bfloat16 if use_bf16 and cfg.strategy == "fsdp" else None)
    params = [p for p in step_module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=dist.device.type == "cuda")

    global_bs = cfg.batch_size * cfg.grad_accum * dist.world_size
    step, position = 0, 0
    if latest:
        step, position = meta["step"], meta["data_position"]
        runlib.load_optimizer(latest, step_module, optimizer, dist)
        runlib.restore_rng(meta, dist)
        log(f"resumed from {latest} at step {step} (data position {position})")
    log(f"world {dist.world_size} | device {dist.device} | params {n_params / 1e6:.2f}M ({n_frozen / 1e6:.2f}M frozen)"
        f" | examples {len(examples)} ({sum('choices' in e for e in examples)} reasoning, "
        f"{sum(e['question'] == TRANSCRIBE_QUESTION for e in examples)} transcripts) | held-out {len(heldout)}"
        f" | global batch {global_bs} {'clips' if cfg.pack else 'examples'} = {cfg.batch_size} x {cfg.grad_accum}"
        f" accum x {dist.world_size} procs | {cfg.max_steps} steps = {cfg.max_steps * global_bs / len(units):.1f} epochs")

    def save_weights(module, path, state_dict=None):
        inner = module.model                                          # SFTLoss -> the LALM
        if state_dict is not None:                                    # FSDP2: a CPU copy from the gathered state
            inner = runlib.unsharded_copy(model, state_dict, prefix="model.")
        model_lib.save_pretrained(inner, path)

    def save(step, position):
        runlib.save_checkpoint(ckpt_dir, step, step_module, optimizer,
                               {"config": runlib.config_dict(cfg), "data_position": position,
                                "global_batch": global_bs}, dist,
                               keep_last=cfg.keep_last, save_weights=save_weights, extra_files=tok_files)

    metrics = runlib.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=dist.is_main)
    audio_cache = None                                                # a real corpus does not fit in memory
    if not cfg.pad_to_30s:                                            # the tiny default's does (~0.5 GB)
        audio_cache = {}
        cache_audio(examples + heldout, audio_cache)
    last_step = cfg.stop_at if cfg.stop_at > 0 else cfg.max_steps
    bar = tqdm(total=last_step, initial=step, disable=None if dist.is_main else True,  # None: off when not a tty
               dynamic_ncols=True, leave=False)
    t_start = time.time()
    last_eval = None
    while step < last_step:
        t0 = time.time()
        lr = runlib.cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        indices = global_batch(len(units), cfg.seed, position, global_bs)
        micro = rank_micro_batches(indices, unit_info, cfg.batch_size, cfg.grad_accum, dist)
        if cfg.pack:
            batches = [data.collate_packed([[examples[i] for i in units[u]] for u in mb], tok, cfg.family, n_mels,
                                           cfg.pad_to_30s, audio_cache=audio_cache) for mb in micro]
        else:
            batches = [data.collate_sft([examples[units[u][0]] for u in mb], tok, cfg.family, n_mels,
                                        cfg.pad_to_30s, audio_cache=audio_cache) for mb in micro]
        for mb, b in zip(micro, batches):
            groups = [[examples[i] for i in units[u]] for u in mb]    # each row's examples
            if cfg.align_weight > 0:
                b["align_labels"] = align_labels([g[0] for g in groups], b["input_ids"], model.audio_token_id,
                                                 words_of)
            targets = {}
            if ground_ids is not None:
                times, digits = ground_targets(groups, b["input_ids"], b["loss_mask"], model.audio_token_id,
                                               ground_ids, cfg.ground_seconds, ground_skips)
                targets = {kind: rows for kind, rows in (("ground", times), ("digit", digits)) if kind in heads}
            if cfg.mention_weight > 0:
                targets["mention"] = mention_targets(groups, b["input_ids"], model.audio_token_id, words_of, tok,
                                                     mention_stop)
            b["targets"] = targets
        # normalise each loss by its count over the whole global batch (answer tokens, aligned audio tokens,
        # grounded times and digits, mentions): 1 and N processes agree
        counts = torch.tensor([float(sum(b["loss_mask"][:, 1:].sum() for b in batches))]
                              + [float(sum(count(b, kind) for b in batches)) for kind in aux],
                              dtype=torch.float64, device=dist.device)
        n_answer, *n_aux = runlib.all_reduce_sum(counts, dist).tolist()
        n_aux = dict(zip(aux, n_aux))
        loss_sum, aux_sums, n_tokens, bad_batch = 0.0, dict.fromkeys(aux, 0.0), 0, None
        for k, (mb, batch) in enumerate(zip(micro, batches)):
            targets = {kind: v.to(dist.device) for kind, v in batch["targets"].items()}
            batch = {key: v.to(dist.device) for key, v in batch.items() if torch.is_tensor(v)}
            runlib.set_grad_sync(step_module, k == len(batches) - 1)
            with autocast:
                loss, losses = step_module(
                    batch["input_ids"], batch["attention_mask"], batch["loss_mask"], batch.get("input_features"),
                    batch.get("feature_attention_mask"), batch.get("align_labels"), batch.get("position_ids"),
                    targets)
            # DDP/FSDP average gradients over ranks; scale so the result is the global-token mean
            total = loss / n_answer + sum(weights[kind] * losses[kind] / n_aux[kind] for kind in aux if n_aux[kind])
            (total * dist.world_size).backward()
            loss_sum += loss.item()
            values = {kind: losses[kind].item() for kind in aux}
            for kind in aux:
                aux_sums[kind] += values[kind]
            if not math.isfinite(loss.item() + sum(values.values())) and bad_batch is None:
                bad_batch = [examples[i].get("id", examples[i]["audio"]) for u in mb for i in units[u]]
            n_tokens += int(batch.get("token_mask", batch["attention_mask"]).sum())
        n_examples = sum(len(units[u]) for u in indices)
        stats = runlib.all_reduce_sum(torch.tensor([loss_sum, float(n_tokens), *aux_sums.values()],
                                                   dtype=torch.float64, device=dist.device), dist)
        loss_value = stats[0].item() / n_answer
        extra = {kind: stats[2 + i].item() / n_aux[kind] if n_aux[kind] else 0.0 for i, kind in enumerate(aux)}
        for kind, value in extra.items():
            runlib.check_finite(value, f"{kind} loss", step + 1, f"batch at data position {position}")
        runlib.check_finite(loss_value, "loss", step + 1,
                            f"batch at data position {position}" + (f", first bad micro-batch {bad_batch}" if bad_batch else ""))
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        runlib.check_finite(grad_norm, "grad norm", step + 1, f"batch at data position {position}")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        position += global_bs
        dt = time.time() - t0
        record = {"step": step, "loss": loss_value, **{f"{k}_loss": v for k, v in extra.items()},
                  "lr": lr, "grad_norm": grad_norm,
                  "tok_per_s": stats[1].item() / dt, "samples_per_s": n_examples / dt,
                  "elapsed": time.time() - t_start}
        bar.update(1)
        if step % cfg.log_every == 0 or step == last_step:
            line = runlib.step_line(step, cfg.max_steps, loss=loss_value, **extra,
                                    lr=lr, grad=grad_norm,
                                    **{"tok/s": f"{record['tok_per_s']:.0f}",
                                       "samples/s": f"{record['samples_per_s']:.1f}"}, elapsed=record["elapsed"])
            if dist.is_main:
                bar.write(line)
        if step % cfg.eval_every == 0 or step == last_step:
            iou, frac, samples = evaluate(model, step_module, tok, heldout, cfg, n_mels, dist, autocast, audio_cache)
            last_eval = {"mean_iou": iou, "iou_ge_0.7": frac}
            record.update(eval_mean_iou=iou, eval_iou_ge_07=frac, eval_samples=samples)
            if dist.is_main:
                bar.write(f"eval step {step} | mean IoU {iou:.4f} | IoU>=0.7 {frac:.3f} | n {len(heldout)}")
                for s in samples:
                    bar.write(f"  truth {s['truth']} | iou {s['iou']:.3f} | {s['pred']!r}")
        metrics.write(record)
        if step % cfg.save_every == 0 or step == last_step:
            save(step, position)
    bar.close()
    if dist.is_main:
        ground_skips.report()
    log(f"done: {step} steps in {time.time() - t_start:.1f} s | last eval {last_eval} | checkpoint "
        f"{os.path.join(ckpt_dir, runlib.LATEST)}")
    runlib.cleanup_dist(dist)
    return last_eval


if __name__ == "__main__":
    main()

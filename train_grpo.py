"""Stage 2: timestamp-grounded reasoning with GRPO, starting from the Stage 1 (STA) checkpoint.

For each multiple-choice QA prompt the policy samples a group of G completions (audio encoded and the prompt
prefilled once, its KV cache copied to G rows: model.generate(num_samples=G)), each is scored by
reward.total_reward (R = R_answer + R_tg by default), advantages are group-relative, and the policy takes
`mu` clipped-surrogate steps against those samples with a k3 KL penalty (beta) to the frozen Stage 1 model.

Built-in tiny default (CPU, ~6 min with 1 thread on a 2-core machine; needs the tiny Stage 1 checkpoint,
`python train_sta.py`):
    python train_grpo.py                                   # = --config configs/grpo_tiny.json
  starts from out/sta_tiny/ckpt/latest, trains on out/synth/train/qa.jsonl, evaluates greedy accuracy and
  R_tg on the held-out corpus (another synth seed, out/synth/heldout/qa.jsonl) before and after.
  Measured (2026-11-22 session 6, 1 thread, from the pipeline's Stage 1 checkpoint; seeds 1337 / 2 / 3): 150
  steps in 5.7 min alone (6.4-6.5 min with two runs sharing the 2 cores); held-out accuracy (200 questions,
  seed 1) 22.5 % -> 37.5 / 33.0 / 29.0 %, R_tg 0.393 -> 0.499 / 0.495 / 0.495 (spans per answer 2.04 -> 1.01 /
  1.03 / 1.06), answers naming one of the options 69 % -> 75.5 / 71 / 68.5 %. Session 5, from a Stage 1 trained
  with a digit tokenizer (see train_sta.py's time pieces), seeds 1337 / 2 / 3: 24.5 % -> 38.0 / 37.5 / 37.0 %,
  R_tg 0.406 -> 0.491 / 0.492 / 0.497. (Sessions 1-4, when the synthetic answers named the option's letter,
  accuracy stayed at chance: 26.5 -> 26.5 / 26.0 / 27.5 %; see train_sta.py.) From later Stage 1 recipes
  (pipeline runs, seed 1337): session 10's 27.5 % -> 43.5 %, session 11's (held-out STA IoU 0.67) 32.0 % -> 37.0 %
  (R_tg 0.389 -> 0.496, spans per answer 2.11 -> 1.04, 6.2 min), session 12's (STA IoU 0.74) 36.0 % -> 37.5 %
  (R_tg 0.404 -> 0.495, spans 1.96 -> 1.04, 7.3 min; the held-out STA IoU falls to 0.71 meanwhile).
  Rollouts on these ~3.5 s clips:
  ~2,000 generated tok/s with prefix sharing vs ~1,240 without (1 thread).
Paper runs (8 GPUs, per-GPU batch 8 completions, grad accumulation 4, G 8, lr 5e-6, beta 0.04, T 0.8, bf16):
    # smoke test: the decoder trains (fp32 weights, gradients, AdamW: ~16 bytes per parameter, ~125 GB for 7B,
    # sharded) beside a bf16 reference kept whole on every GPU (~17 GB): ~48 GB per GPU on 4
    torchrun --standalone --nproc_per_node=4 train_grpo.py --config configs/grpo_qwen2_5_omni.json --num_steps=5
    torchrun --standalone --nproc_per_node=8 train_grpo.py --config configs/grpo_qwen2_5_omni.json
    torchrun --standalone --nproc_per_node=8 train_grpo.py --config configs/grpo_audioflamingo3.json
    torchrun --standalone --nproc_per_node=8 train_grpo.py --config configs/grpo_qwen2_audio.json
  Any key can be overridden (--train_data=/data/qa.jsonl --init_from=out/sta_qwen2_5_omni/ckpt/latest).
  Re-running the same command resumes from <out_dir>/ckpt/latest and reproduces the uninterrupted run
  (rollout seeds are a function of (seed, step, prompt), the data order of (seed, step)); a re-run that
  changes the recipe is refused with the list of changed settings (resume_free: the ones it may change).

One step = `device_batch_size * grad_accum / group_size` prompts per process, rolled out, scored, then `mu`
optimizer steps over those completions in micro-batches of `device_batch_size`. Rollouts are sharded across
processes (whole groups per process, so advantages need no communication); the loss is normalised over the
global batch, so 1 process and N processes with the same global batch give the same loss and update.
Logged per step: reward and each component (mean/std), accuracy, spans per completion, KL, clip fractions,
completion length mean/max, truncated fraction, zero-spread fraction, grad norm, rollout vs update seconds,
generated tokens/s; a few completions every `dump_every` steps go to <out_dir>/completions.jsonl.
What prefix sharing saves: compare the logged tok/s of `--prefix_sharing=false --eval_data= --num_steps=5` with
the default (the same completions, every prompt then encoded and prefilled G times).

Deviations from the paper (which gives only: G 8, temperature 0.8, beta 0.04, lr 5e-6, per-GPU batch 8,
grad accumulation 4, 8 GPUs, R = R_answer + R_tg; the authors trained with ms-swift):
  * "per-GPU batch 8" is read as 8 completions per micro-batch (the TRL / ms-swift convention), so one step
    is 4 prompts x 8 completions per GPU, 32 prompts (256 completions) over 8 GPUs.
  * Loss aggregation: "grpo" (DeepSeekMath: per-sequence mean, then mean over sequences) by default, as the
    paper cites DeepSeekMath; "token" (DAPO) and "dr_grpo" are options. eps 0.2 on both sides (not given).
  * mu = 1 (one update per rollout batch, DeepSeekMath's setting); the ratio is then 1 in value and
    old_logp = logp.detach(), so no extra forward pass is made.
  * The audio encoder and projector are frozen by default (ms-swift's freeze_vit/freeze_aligner defaults,
    [inferred]); frozen audio is encoded once per prompt and reused by the policy and reference passes.
  * Schedule, AdamW betas / weight decay and clipping at 1.0 are our choices (constant lr after warmup).
  * k3 is computed in fp32 with ref - logp clamped to +-20 (avoids the exp overflow TRL users hit).
  * Rewards count distinct spans (reward.py; `--span_count=paper` for the authors' regex hit count).
  * The tiny default: a 2.9M-parameter LALM trained from scratch in Stage 1 on a synthetic espeak-ng corpus
    (with some reasoning-format QA in its Stage 1 mix); lr 1e-4 instead of 5e-6 (a from-scratch toy needs
    larger steps to move in minutes), beta 0.04, G 8, T 0.8 as in the paper; fp32 on CPU.
"""
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

import runlib
from audio_encoder import encoder_config

# ---------------------------------------------------------------------------
# Config


@dataclass
class Config:
    """Defaults: the built-in tiny default (= configs/grpo_tiny.json); the paper's runs: configs/grpo_<model>.json."""
    # model and data
    init_from: str = "out/sta_tiny/ckpt/latest"         # Stage 1 checkpoint: initial policy (and reference)
    ref_from: str = ""                                  # reference policy checkpoint; "" = init_from
    tokenizer: str = ""                                 # "" = the tokenizer saved in init_from
    family: str = "qwen2_audio"                         # chat template family (tokenizer.build_prompt)
    pad_to_30s: bool = False                            # pad features to one 30 s window (released models: True)
    train_data: str = "out/synth/train/qa.jsonl"        # QA records (SPEC schema)
    eval_data: str = "out/synth/heldout/qa.jsonl"       # held-out QA for greedy accuracy / R_tg ("" = none)
    eval_n: int = 0                                     # held-out records evaluated (0 = all)
    # rollouts
    group_size: int = 8                                 # G completions per prompt
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 96                            # the tiny model's reasoning: 25-95 tokens (1-3 spans)
    rollout_prompts: int = 4                            # prompts per generate call (x G rows)
    prefix_sharing: bool = True                         # False: prompts repeated G times (for benchmarks only)
    compile_rollout: bool = False                       # CPU: torch.compile each decoding step (model.compiled_step),
                                                        # ~1.2x faster rollouts after ~20-40 s of compiling
                                                        # (more when the batches' shapes vary)
    zero_spread: str = "keep"                           # groups with equal rewards: keep | drop | resample
    resample_rounds: int = 2                            # zero_spread=resample: re-roll with fresh prompts this often
    # reward (reward.RewardOptions)
    answer_weight: float = 1.0
    compaction_weight: float = 1.0
    k_ref: int = 1                                      # R_tg compaction: c_max up to k_ref spans,
    k_max: int = 5                                      # then linear down to c_min at k_max spans
    c_max: float = 0.5
    c_min: float = 0.1                                  # c_min = c_max: no compaction (ablation)
    span_count: str = "distinct"                        # "distinct" | "paper"
    grounding_weight: float = 0.0                       # beyond the paper: + w * IoU of cited spans with evidence
    hallucination_weight: float = 0.0                   # beyond the paper: - w * share of impossible spans
    # objective
    beta: float = 0.04                                  # k3 KL to the reference; 0 = no reference model at all
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_type: str = "grpo"                             # grpo | token | dr_grpo
    scale_rewards: bool = True                          # divide advantages by the group std (+1e-4)
    mu: int = 1                                         # policy updates per rollout batch
    # optimisation
    num_steps: int = 150                                # rollout steps
    device_batch_size: int = 32                         # completions per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-4                                    # paper: 5e-6 (7B); the from-scratch tiny model needs more
    warmup_steps: int = 5
    min_lr: float = -1.0                                # < 0: constant lr after warmup; else cosine down to it
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0
    freeze_audio: bool = True                           # audio encoder + projector frozen
    dtype: str = "float32"                              # "bfloat16": autocast on GPU (fp32 master weights)
    strategy: str = "ddp"                               # ddp | fsdp
    # run
    out_dir: str = "out/grpo_tiny"
    seed: int = 1337
    device: str = "auto"
    threads: int = 1                                    # CPU threads per process (0 = torch's default); one is
                                                        # fastest for the tiny model on a shared 2-core machine
    eval_every: int = 0                                 # 0: only before the first and after the last step
    eval_batch_size: int = 25
    eval_max_new_tokens: int = 0                        # 0 = max_new_tokens
    dump_every: int = 10                                # write a few completions to completions.jsonl
    dump_n: int = 4
    save_every: int = 50
    keep_last: int = 2
    resume: bool = True
    time_limit: float = 14.0                            # minutes; stop, evaluate and save after this (0 = none)
    log_every: int = 1


def resume_free(cfg) -> set:
    """Settings a run may change when it resumes (runlib.check_resume; any other change is an error): where
    it writes, how often it logs, evaluates (greedy), dumps and saves, its speed knobs, when it stops; and
    num_steps while the lr is constant after warmup (min_lr < 0), as nothing then depends on it."""
    free = {"out_dir", "device", "threads", "resume", "log_every", "save_every", "keep_last", "eval_every",
            "eval_data", "eval_n", "eval_batch_size", "eval_max_new_tokens", "dump_every", "dump_n", "time_limit",
            "compile_rollout"}
    return free | {"num_steps"} if cfg.min_lr < 0 else free


# ---------------------------------------------------------------------------
# The objective: pure functions (advantages, k3 KL, clipped surrogate with named aggregations)

KL_LOG_RATIO_CLIP = 20.0  # |ref - logp| cap before exp: k3 overflows to 1e6..1e9 otherwise (TRL #3015)
LOSS_TYPES = ("grpo", "token", "dr_grpo")


def group_advantages(rewards: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """rewards (B, G) -> advantages (B, G): r - mean over the group, divided by (std + 1e-4) when scale.

    std is the unbiased (n-1) estimate, as TRL's torch.std. A group whose rewards are all equal gets zeros.
    """
    rewards = rewards.float()
    assert rewards.dim() == 2, f"rewards must be (B, G), got {tuple(rewards.shape)}"
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        assert rewards.shape[1] >= 2, "scaled advantages need a group of at least 2 completions"
        adv = adv / (rewards.std(dim=1, keepdim=True) + 1e-4)
    return adv


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: exp(d) - d - 1 with d = ref - logp (fp32, >= 0).

    d is clamped to +-KL_LOG_RATIO_CLIP so a token the reference finds far likelier cannot overflow exp.
    """
    d = (ref_logp.float() - logp.float()).clamp(-KL_LOG_RATIO_CLIP, KL_LOG_RATIO_CLIP)
    return torch.exp(d) - d - 1.0


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.04, eps_low=0.2, eps_high=0.2,
              loss_type="grpo", max_len=None):
    """The clipped GRPO surrogate plus beta * k3, as one pure function.

    logp, old_logp, ref_logp: (N, T) per-token log-probs of the sampled tokens under the policy being trained
    (with grad), the policy that sampled them, and the frozen reference (ref_logp=None or beta=0: no KL term).
    advantages (N,), mask (N, T) bool/0-1 (True on completion tokens, the EOS included).
    Per token: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * k3, rho = exp(logp - old_logp).
    loss_type: "grpo"    mean over each sequence's valid tokens, then mean over sequences (DeepSeekMath);
               "token"   sum over all valid tokens / their count (DAPO);
               "dr_grpo" sum over all valid tokens / (N * max_len), max_len defaults to T (Dr. GRPO).
    Returns (loss, stats) with stats a dict of detached 0-d tensors (kl, clip fractions, ratio, ...).
    """
    assert loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}"
    n, t = logp.shape
    valid = mask.bool()
    logp = logp.float()
    adv = advantages.float().view(n, 1)                              # (N, 1) broadcast over tokens
    # masked positions may hold anything (pad targets, -inf): zero the log-ratio there so no nan leaks in
    log_ratio = torch.where(valid, logp - old_logp.float(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)                                     # (N, T), exactly 1 in value when mu = 1
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)               # (N, T)
    use_kl = ref_logp is not None and beta != 0
    if use_kl:
        kl = torch.where(valid, kl_k3(logp, ref_logp), torch.zeros_like(logp))
        per_token = per_token + beta * kl
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    n_tok = valid.sum(dim=1)                                         # (N,)
    if loss_type == "grpo":
        loss = (per_token.sum(dim=1) / n_tok.clamp(min=1)).mean()
    elif loss_type == "token":
        loss = per_token.sum() / n_tok.sum().clamp(min=1)
    else:
        loss = per_token.sum() / (n * (t if max_len is None else max_len))

    with torch.no_grad():
        count = n_tok.sum().clamp(min=1)
        vmean = lambda x: (x * valid).sum() / count                 # noqa: E731  mean over valid tokens
        low = ((ratio < 1.0 - eps_low) & (adv < 0) & valid).float()   # clipped from below, the min is active
        high = ((ratio > 1.0 + eps_high) & (adv > 0) & valid).float()
        stats = {
            "kl": vmean(kl) if use_kl else torch.zeros(()),
            "clip_low": vmean(low),
            "clip_high": vmean(high),
            "clip_frac": vmean(low + high),
            "ratio_mean": vmean(ratio),
            "ratio_max": ratio.masked_fill(~valid, 0.0).max(),
            "ratio_min": ratio.masked_fill(~valid, math.inf).min(),
            "tokens": n_tok.sum().float(),
        }
    return loss, stats


def completion_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(B*G,) completion lengths (the EOS included) -> (B*G, n) bool mask. Never derived from token values:
    when pad == eos, value masking would drop the EOS and the model would never learn to stop."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


# ---------------------------------------------------------------------------
# Rollouts: G completions per prompt, scored by reward.total_reward


def reward_options(cfg) -> dict:
    return dict(answer_weight=cfg.answer_weight, compaction_weight=cfg.compaction_weight, k_ref=cfg.k_ref,
                k_max=cfg.k_max, c_max=cfg.c_max, c_min=cfg.c_min, span_count=cfg.span_count,
                grounding_weight=cfg.grounding_weight, hallucination_weight=cfg.hallucination_weight)


def rollout_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of the prompts starting at global position `index` of step `step`: resumed and re-sharded
    runs draw the same completions."""
    return ((seed * 1_000_003 + step) * 1_000_033 + index) % (2 ** 63)


def global_batch(n: int, seed: int, position: int, size: int) -> list:
    """Indices [position, position + size) of an endless stream of per-epoch shuffles of range(n)."""
    out = []
    while len(out) < size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        take = min(size - len(out), n - offset)
        out += order[offset:offset + take]
        position += take
    return out


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}


@torch.no_grad()
def sample_groups(model, prompts, examples, tok, cfg, generator, opts) -> list:
    """One scored group of G completions per example. prompts: collate_prompts(examples) on the device.

    With prefix sharing the audio is encoded and each prompt prefilled once (generate(num_samples=G));
    without it every prompt is repeated G times (kept only to measure what sharing saves).
    """
    import model as model_lib
    import reward
    G = cfg.group_size
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    feats, fmask = prompts.get("input_features"), prompts.get("feature_attention_mask")
    if not cfg.prefix_sharing:
        assert feats is None or feats.shape[0] == ids.shape[0], "prefix_sharing=False needs one audio per prompt"
        ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
        feats = None if feats is None else feats.repeat_interleave(G, 0)
        fmask = None if fmask is None else fmask.repeat_interleave(G, 0)
    tokens, lengths, finished = model_lib.generate(
        model, ids, mask, feats, fmask, max_new_tokens=cfg.max_new_tokens, num_samples=G if cfg.prefix_sharing else 1,
        temperature=cfg.temperature, top_p=cfg.top_p, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        generator=generator, compile=cfg.compile_rollout)                          # (B*G, N), rows prompt-major
    groups = []
    for b, ex in enumerate(examples):
        rows = slice(b * G, (b + 1) * G)
        texts = [tok.decode(r[:n], skip_special_tokens=True)
                 for r, n in zip(tokens[rows].tolist(), lengths[rows].tolist())]
        scored = [reward.total_reward(t, ex, **opts) for t in texts]
        groups.append({"example": ex, "tokens": tokens[rows], "lengths": lengths[rows], "finished": finished[rows],
                       "texts": texts, "rewards": torch.tensor([v for v, _ in scored]),
                       "components": [c for _, c in scored]})
    return groups


def zero_spread(group) -> bool:
    r = group["rewards"]
    return bool(r.max() - r.min() < 1e-6)


# ---------------------------------------------------------------------------
# Log-probs of completions: the module DDP / FSDP2 wrap, audio encoded once per prompt


class CompletionLogprobs(nn.Module):
    """(prompt, completion) -> (N, C) fp32 log-probs of the completion tokens at `temperature`.

    Audio comes either as rows already encoded (frozen audio: encoded once per prompt per rollout batch and
    shared by the policy and reference passes) or as the features of the micro-batch's prompts, encoded here
    once per prompt (trainable audio); `audio_rows` picks the encoded rows for the G repeats of each prompt.
    Audio rows go into the prompt's placeholders only: a sampled token that happens to be the placeholder id is
    embedded as text, exactly as generate fed it back.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, prompt_ids, prompt_mask, targets, target_mask, temperature: float, audio_rows=None,
                audio_embeds=None, input_features=None, feature_attention_mask=None):
        import model as model_lib
        lm = model_lib.decoder_of(self.model)
        if audio_embeds is None and input_features is not None:
            audio_embeds = self.model.encode_audio(input_features, feature_attention_mask)    # (A_total, D)
        audio = {} if audio_embeds is None else {"audio_embeds": audio_embeds[audio_rows]}   # (sum over rows, D)
        h = torch.cat([self.model.embed(prompt_ids, **audio), lm.embed_ids(targets)], 1)     # (N, Tp + C, D)
        hidden = lm(torch.cat([prompt_ids, targets], 1), torch.cat([prompt_mask, target_mask.long()], 1),
                    return_hidden=True, inputs_embeds=h)                                    # (N, Tp + C, D)
        h = hidden[:, prompt_ids.shape[1] - 1:-1]                                           # position t predicts t+1
        return model_lib.token_logprobs(h, lm.lm_head_weight(), targets, temperature)


def audio_row_index(counts: torch.Tensor, prompts: list) -> torch.Tensor:
    """Indices into encoded audio rows (prompt after prompt, counts[b] rows each) for a list of prompt ids."""
    starts = counts.cumsum(0) - counts
    return torch.cat([torch.arange(int(starts[b]), int(starts[b] + counts[b])) for b in prompts]
                     + [torch.zeros(0, dtype=torch.long)]).to(counts.device)


def micro_batch(batch, rows: list, G: int, audio_token_id: int, encoded: bool):
    """Inputs of one micro-batch of completion rows (prompt-major row ids): prompts with the left-pad columns
    no row needs trimmed, completions cut to the longest, each completion's mask from its length (EOS
    included), never from token values."""
    p = [r // G for r in rows]
    pid, pmask = batch["input_ids"][p], batch["attention_mask"][p]                  # (N, Tp) left-padded
    first = int(pmask.any(0).float().argmax())
    lengths = batch["lengths"][rows]
    C = int(lengths.max())
    cmask = completion_mask(lengths, C)                                                # (N, C)
    inputs = dict(prompt_ids=pid[:, first:], prompt_mask=pmask[:, first:], targets=batch["tokens"][rows, :C],
                  target_mask=cmask)
    counts = (batch["input_ids"] == audio_token_id).sum(1)                            # audio rows per prompt
    if encoded:                                          # rows of the whole batch's encoded audio
        inputs["audio_rows"] = audio_row_index(counts, p)
    else:                                                # this micro-batch's prompts, encoded in forward
        uniq = sorted(set(p))
        assert batch["input_features"].shape[0] == counts.shape[0], "trainable audio needs one audio per prompt"
        inputs.update(input_features=batch["input_features"][uniq],
                      feature_attention_mask=batch["feature_attention_mask"][uniq],
                      audio_rows=audio_row_index(counts[uniq], [uniq.index(b) for b in p]))
    return inputs, cmask


# ---------------------------------------------------------------------------
# Evaluation: greedy decoding on held-out QA, scored by the same reward functions


@contextmanager
def full_parameters(model):
    """FSDP2: gather the full parameters once around generation (ranks decode different numbers of tokens, so
    per-layer all-gathers inside generate would not line up); a no-op for plain and DDP models.
    Generation calls the blocks, not the root's forward: FSDP2 names the root in its first forward and a block
    run before it would take itself for one, so the root is initialised here first (private call: FSDP2 has no
    public one)."""
    mods = [m for m in model.modules() if hasattr(m, "set_reshard_after_forward")]
    if mods:
        model._get_fsdp_state()._lazy_init()
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)


@torch.no_grad()
def evaluate(model, examples, collate, tok, cfg, dist, opts, autocast):
    """Greedy accuracy, mean R_tg and spans per answer on `examples` (sharded over ranks, summed)."""
    import model as model_lib
    import reward
    shard = examples[dist.rank::dist.world_size]
    sums = torch.zeros(6, dtype=torch.float64)          # n, answer, compaction, spans, parsed, length
    samples = []
    for i in range(0, len(shard), cfg.eval_batch_size):
        chunk = shard[i:i + cfg.eval_batch_size]
        b = to_device(collate(chunk), dist.device)
        with autocast:
            tokens, lengths, _ = model_lib.generate(
                model, b["input_ids"], b["attention_mask"], b.get("input_features"), b.get("feature_attention_mask"),
                max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens, temperature=0.0,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for ex, row, n in zip(chunk, tokens.tolist(), lengths.tolist()):
            text = tok.decode(row[:n], skip_special_tokens=True)
            _, c = reward.total_reward(text, ex, **opts)
            sums += torch.tensor([1.0, c["answer"], c["compaction"], c["n_spans"], c["parsed"], n], dtype=torch.float64)
            if len(samples) < 3:
                samples.append({"id": ex.get("id"), "answer": ex["answer"], "completion": text, "correct": c["answer"]})
    sums = runlib.all_reduce_sum(sums.to(dist.device), dist).cpu()
    n = max(1.0, sums[0].item())
    return {"accuracy": sums[1].item() / n, "r_tg": sums[2].item() / n, "spans": sums[3].item() / n,
            "parsed": sums[4].item() / n, "length": sums[5].item() / n, "n": int(sums[0].item())}, samples


# ---------------------------------------------------------------------------
# Training


def all_reduce_max(x: torch.Tensor, dist) -> torch.Tensor:
    if dist.distributed:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


def main(argv=None):
    cfg = runlib.parse_config(Config, sys.argv[1:] if argv is None else argv)
    import data
    import model as model_lib
    import tokenizer as tokenizer_lib

    assert cfg.loss_type in LOSS_TYPES, f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}"
    assert cfg.zero_spread in ("keep", "drop", "resample"), \
        f"zero_spread must be keep | drop | resample, got {cfg.zero_spread!r}"
    G = cfg.group_size
    assert (cfg.device_batch_size * cfg.grad_accum) % G == 0, \
        f"device_batch_size * grad_accum ({cfg.device_batch_size} x {cfg.grad_accum}) must be a multiple of group_size {G}"
    dist = runlib.setup_dist(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    log = runlib.start_run(cfg, dist)
    ckpt_dir = os.path.join(cfg.out_dir, "ckpt")

    # models: the policy (resumed or the Stage 1 checkpoint) and the frozen reference (none when beta = 0)
    if not os.path.exists(os.path.join(cfg.init_from, "config.json")):
        raise FileNotFoundError(f"init_from {cfg.init_from!r} has no config.json: train Stage 1 first "
                                f"(tiny default: python train_sta.py) or pass --init_from=<checkpoint dir>")
    latest = runlib.latest_checkpoint(ckpt_dir) if cfg.resume else None
    meta = runlib.load_meta(latest) if latest else None
    if latest:
        runlib.check_resume(latest, meta, cfg, resume_free(cfg))
    on_gpu = dist.device.type == "cuda"
    use_bf16 = cfg.dtype == "bfloat16" and on_gpu
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    policy = model_lib.from_pretrained(latest or cfg.init_from, device=dist.device)      # fp32 master weights
    ref_path = cfg.ref_from or cfg.init_from
    ref = None
    if cfg.beta != 0:
        ref = model_lib.from_pretrained(ref_path, dtype=torch.bfloat16 if use_bf16 else torch.float32,
                                        device=dist.device)
        ref.requires_grad_(False)
        ref = CompletionLogprobs(ref)
    audio_parts = ("audio_tower.", "multi_modal_projector.")
    if cfg.freeze_audio:
        for name, p in policy.named_parameters():
            if name.startswith(audio_parts):
                p.requires_grad_(False)
    # frozen audio of the same checkpoint is the same function for policy and reference: encode it once
    share_audio = cfg.freeze_audio and os.path.realpath(ref_path) == os.path.realpath(cfg.init_from)
    tok_path = cfg.tokenizer or cfg.init_from
    tok = tokenizer_lib.load_tokenizer(tok_path)
    tok_files = [tok_path] if os.path.isfile(tok_path) else [
        os.path.join(tok_path, f) for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")
        if os.path.exists(os.path.join(tok_path, f))]
    n_mels = encoder_config(policy.audio_tower.config)["num_mel_bins"]     # Omni nests audio_config deeper
    audio_cache = {}

    def collate(exs):
        return data.collate_prompts(exs, tok, cfg.family, n_mels, cfg.pad_to_30s, audio_cache=audio_cache)
    opts = reward_options(cfg)

    step_module = runlib.wrap_model(CompletionLogprobs(policy), dist, cfg.strategy,
                                    param_dtype=torch.bfloat16 if use_bf16 and cfg.strategy == "fsdp" else None)
    params = [p for p in step_module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                                  fused=on_gpu)

    train = data.load_examples(cfg.train_data, kind="qa")
    heldout = data.load_examples(cfg.eval_data, kind="qa") if cfg.eval_data else []
    heldout = heldout[:cfg.eval_n] if cfg.eval_n > 0 else heldout
    P = cfg.device_batch_size * cfg.grad_accum // G                                  # prompts per process per step
    global_P = P * dist.world_size
    step = 0
    if latest:
        step = meta["step"]
        runlib.load_optimizer(latest, step_module, optimizer, dist)
        runlib.restore_rng(meta, dist)
        log(f"resumed from {latest} at step {step}")
    n_params = sum(p.numel() for p in policy.parameters())
    log(f"world {dist.world_size} | device {dist.device} | params {n_params / 1e6:.2f}M "
        f"({sum(p.numel() for p in params) / 1e6:.2f}M trained) | train {len(train)} | held-out {len(heldout)} | "
        f"step = {P} prompts x G {G} per process = {global_P * G} completions in {cfg.grad_accum} micro-batches of "
        f"{cfg.device_batch_size} | reference {'none (beta 0)' if ref is None else ref_path} | {cfg.num_steps} steps "
        f"= {cfg.num_steps * global_P / max(1, len(train)):.2f} epochs")

    def save_weights(module, path, state_dict=None):
        inner = module.model
        if state_dict is not None:                                        # FSDP2: full state gathered on rank 0
            inner = runlib.unsharded_copy(policy, state_dict, prefix="model.")
        model_lib.save_pretrained(inner, path)

    def save(step, evals):
        runlib.save_checkpoint(ckpt_dir, step, step_module, optimizer,
                               {"config": runlib.config_dict(cfg), "data_position": step * global_P, "eval": evals},
                               dist, keep_last=cfg.keep_last, save_weights=save_weights, extra_files=tok_files)

    def run_eval(step):
        with full_parameters(step_module):
            policy.eval()
            result, samples = evaluate(policy, heldout, collate, tok, cfg, dist, opts, autocast)
            policy.train()
        if dist.is_main:
            tqdm.write(f"eval step {step} | accuracy {result['accuracy']:.4f} | R_tg {result['r_tg']:.4f} | "
                       f"spans {result['spans']:.3f} | parsed {result['parsed']:.3f} | length {result['length']:.1f} | "
                       f"n {result['n']}")
            for s in samples:
                tqdm.write(f"  [{s['id']}] truth {s['answer']!r} | correct {s['correct']:.0f} | {s['completion']!r}")
        return result

    metrics = runlib.MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), enabled=dist.is_main)
    dumps = runlib.MetricsLog(os.path.join(cfg.out_dir, "completions.jsonl"), enabled=dist.is_main)
    evals = meta.get("eval", {}) if latest else {}
    if heldout and step == 0:
        evals["before"] = run_eval(0)
        metrics.write({"step": 0, **{f"eval_{k}": v for k, v in evals["before"].items()}})
    bar = tqdm(total=cfg.num_steps, initial=step, disable=not dist.is_main, dynamic_ncols=True, leave=False)
    t_start = time.time()
    while step < cfg.num_steps:
        t0 = time.time()
        lr = cfg.lr if cfg.min_lr < 0 and step >= cfg.warmup_steps else \
            runlib.cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.num_steps, max(cfg.min_lr, 0.0))
        for group in optimizer.param_groups:
            group["lr"] = lr

        # --- rollouts: this process's prompts, G completions each, scored
        indices = global_batch(len(train), cfg.seed, step * global_P, global_P)[dist.rank * P:(dist.rank + 1) * P]
        policy.eval()

        def roll(exs, first):             # chunk c samples with a seed of (seed, step, first + c) only
            out = []
            for c in range(0, len(exs), cfg.rollout_prompts):
                chunk = exs[c:c + cfg.rollout_prompts]
                gen = torch.Generator(dist.device).manual_seed(rollout_seed(cfg.seed, step, first + c))
                out += sample_groups(policy, to_device(collate(chunk), dist.device), chunk, tok, cfg, gen, opts)
            return out
        with full_parameters(step_module), autocast:
            groups = roll([train[i] for i in indices], dist.rank * P)
            n_zero = sum(zero_spread(g) for g in groups)
            for rnd in range(cfg.resample_rounds if cfg.zero_spread == "resample" else 0):
                # DAPO-style dynamic sampling: re-roll the flat groups with fresh random prompts
                flat = [i for i, g in enumerate(groups) if zero_spread(g)]
                if not flat:
                    break
                first = (rnd + 1) * 10 ** 6 + dist.rank * P
                picks = torch.randint(len(train), (len(flat),),
                                      generator=torch.Generator().manual_seed(rollout_seed(cfg.seed, step, first)))
                for i, g in zip(flat, roll([train[j] for j in picks.tolist()], first)):
                    if not zero_spread(g):
                        groups[i] = g
        policy.train()
        t_rollout = time.time() - t0
        t1 = time.time()

        # --- advantages and the training batch (whole groups; "drop" removes flat ones)
        kept = [g for g in groups if not (cfg.zero_spread == "drop" and zero_spread(g))]
        live = len(kept)
        kept = kept or groups[:1]                     # every process runs >= 1 micro-batch (collectives line up)
        batch = to_device(collate([g["example"] for g in kept]), dist.device)
        N = max(int(g["tokens"].shape[1]) for g in kept)
        batch["tokens"] = torch.cat([nn.functional.pad(g["tokens"], (0, N - g["tokens"].shape[1]),
                                                       value=tok.pad_token_id) for g in kept])     # (B*G, N)
        batch["lengths"] = torch.cat([g["lengths"] for g in kept])                     # (B*G,)
        rewards = torch.stack([g["rewards"] for g in kept])                           # (B, G)
        advantages = group_advantages(rewards, cfg.scale_rewards).flatten().to(dist.device)
        n_rows = len(kept) * G
        bs = cfg.device_batch_size
        micro = [list(range(s, min(s + bs, n_rows))) for s in range(0, n_rows, bs)]
        n_micro = int(all_reduce_max(torch.tensor([len(micro)], device=dist.device), dist).item())
        weights = [1.0 if live else 0.0] * len(micro) + [0.0] * (n_micro - len(micro))  # padding micro-batches: 0
        micro += [micro[0]] * (n_micro - len(micro))
        lengths_f = batch["lengths"].float()
        # normaliser units: tokens ("token") or sequences; each micro-batch weighs units / global units
        units = [w * (float(lengths_f[m].sum()) if cfg.loss_type == "token" else len(m))
                 for w, m in zip(weights, micro)]
        units_global = runlib.all_reduce_sum(torch.tensor([sum(units)], device=dist.device), dist).item()

        has_audio = batch.get("input_features") is not None
        encoded = cfg.freeze_audio or not has_audio
        audio_token_id = policy.audio_token_id
        audio_policy = audio_ref = None
        with torch.no_grad(), autocast:
            if encoded and has_audio:             # once per prompt per rollout batch, reused by every pass below
                with full_parameters(step_module):
                    audio_policy = policy.encode_audio(batch["input_features"], batch["feature_attention_mask"])
            if ref is not None and has_audio:
                audio_ref = audio_policy if share_audio else ref.model.encode_audio(
                    batch["input_features"], batch["feature_attention_mask"])
            ref_logp, old_logp = [], []
            for m in micro:
                if ref is not None:
                    inputs, _ = micro_batch(batch, m, G, audio_token_id, encoded=True)
                    ref_logp.append(ref(**inputs, temperature=cfg.temperature, audio_embeds=audio_ref))
                if cfg.mu > 1:
                    inputs, _ = micro_batch(batch, m, G, audio_token_id, encoded)
                    old_logp.append(step_module(**inputs, temperature=cfg.temperature, audio_embeds=audio_policy))

        # --- mu policy updates on this rollout batch
        sums = {k: 0.0 for k in ("loss", "kl", "clip_low", "clip_high", "ratio_mean", "tokens")}
        grad_norm = 0.0
        for it in range(cfg.mu if units_global > 0 else 0):     # nothing to learn from (all groups dropped): skip
            for k, (m, w, u) in enumerate(zip(micro, weights, units)):
                runlib.set_grad_sync(step_module, k == n_micro - 1)
                inputs, cmask = micro_batch(batch, m, G, audio_token_id, encoded)
                with autocast:
                    logp = step_module(**inputs, temperature=cfg.temperature, audio_embeds=audio_policy)  # (N, C)
                old = logp.detach() if cfg.mu == 1 else old_logp[k]
                loss, st = grpo_loss(logp, old, ref_logp[k] if ref is not None else None, advantages[m], cmask,
                                     cfg.beta, cfg.eps_low, cfg.eps_high, cfg.loss_type,
                                     max_len=cfg.max_new_tokens if cfg.loss_type == "dr_grpo" else None)
                share = u / max(units_global, 1e-9)          # this micro-batch's part of the global-batch loss
                (loss * share * dist.world_size).backward()   # DDP / FSDP2 average gradients over processes
                if it == cfg.mu - 1:
                    t = st["tokens"].item() * w
                    sums["loss"] += loss.item() * share
                    for key in ("kl", "clip_low", "clip_high", "ratio_mean"):
                        sums[key] += st[key].item() * t
                    sums["tokens"] += t
            grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            runlib.check_finite(grad_norm, "grad norm", step + 1, f"prompts {[g['example'].get('id') for g in kept]}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_update = time.time() - t1
        step += 1

        # --- metrics: sums over this process's completions, then over processes
        comps = [c for g in groups for c in g["components"]]
        lens = torch.cat([g["lengths"] for g in groups]).float().cpu()
        local = {"n": len(comps), "groups": len(groups), "zero_spread": n_zero, "gen_tokens": float(lens.sum()),
                 "truncated": float(sum(int((~g["finished"]).sum()) for g in groups)), **sums,
                 "rollout_s": t_rollout}
        for key in ("reward", "answer", "compaction", "grounding", "hallucination", "n_spans", "parsed"):
            vals = [float(c[key]) for c in comps]
            local[key] = sum(vals)
            local[key + "_sq"] = sum(v * v for v in vals)
        keys = list(local)
        tot = runlib.all_reduce_sum(torch.tensor([float(local[k]) for k in keys], dtype=torch.float64,
                                                 device=dist.device), dist).tolist()
        tot = dict(zip(keys, tot))
        len_max = all_reduce_max(lens.max().to(dist.device), dist).item()
        runlib.check_finite(tot["loss"], "loss", step, f"prompts {[g['example'].get('id') for g in kept]}")
        n, ntok = max(tot["n"], 1), max(tot["tokens"], 1)
        mean = lambda k: tot[k] / n                                                  # noqa: E731
        std = lambda k: math.sqrt(max(tot[k + "_sq"] / n - mean(k) ** 2, 0.0))        # noqa: E731
        record = {"step": step, "loss": tot["loss"], "lr": lr, "grad_norm": grad_norm,
                  "reward": mean("reward"), "reward_std": std("reward"),
                  **{f"{k}_mean": mean(k) for k in ("answer", "compaction", "grounding", "hallucination")},
                  **{f"{k}_std": std(k) for k in ("answer", "compaction", "grounding", "hallucination")},
                  "accuracy": mean("answer"), "spans": mean("n_spans"), "parsed": mean("parsed"),
                  "kl": tot["kl"] / ntok, "clip_low": tot["clip_low"] / ntok, "clip_high": tot["clip_high"] / ntok,
                  "ratio_mean": tot["ratio_mean"] / ntok, "length_mean": tot["gen_tokens"] / n, "length_max": len_max,
                  "truncated": tot["truncated"] / n, "zero_spread": tot["zero_spread"] / max(tot["groups"], 1),
                  "rollout_s": t_rollout, "update_s": t_update,
                  "gen_tok_per_s": tot["gen_tokens"] / max(t_rollout, 1e-9),   # all processes' tokens / this one's time
                  "step_s": time.time() - t0, "elapsed": time.time() - t_start}
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.num_steps:
            tqdm.write(runlib.step_line(
                step, cfg.num_steps, loss=record["loss"], reward=record["reward"], acc=record["accuracy"],
                r_tg=record["compaction_mean"], spans=record["spans"], kl=record["kl"],
                clip=record["clip_low"] + record["clip_high"], len=record["length_mean"], trunc=record["truncated"],
                zero=record["zero_spread"], grad=record["grad_norm"], lr=lr, **{"tok/s": record["gen_tok_per_s"]},
                roll=t_rollout, upd=t_update)) if dist.is_main else None
        if cfg.dump_every and step % cfg.dump_every == 0:
            for g in groups[:cfg.dump_n]:
                dumps.write({"step": step, "id": g["example"].get("id"), "question": g["example"]["question"],
                             "answer": g["example"]["answer"], "rewards": g["rewards"].tolist(),
                             "completions": g["texts"]})
        out_of_time = cfg.time_limit > 0 and (time.time() - t_start) / 60 > cfg.time_limit
        out_of_time = bool(all_reduce_max(torch.tensor([float(out_of_time)], device=dist.device), dist).item())
        last = step == cfg.num_steps or out_of_time
        if heldout and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            evals["after"] = run_eval(step)
            record.update({f"eval_{k}": v for k, v in evals["after"].items()})
        metrics.write(record)
        if step % cfg.save_every == 0 or last:
            save(step, evals)
        if out_of_time:
            log(f"time limit {cfg.time_limit} min reached at step {step}")
            break
    bar.close()
    log(f"done: step {step} in {time.time() - t_start:.1f} s | eval {json.dumps(evals)} | checkpoint "
        f"{os.path.join(ckpt_dir, runlib.LATEST)}")
    runlib.cleanup_dist(dist)
    return evals


if __name__ == "__main__":
    main()

"""Benchmarks: our model.py against transformers on the same weights, inputs and machine, in one run.

Requires transformers (the reference; like the tests, bench.py is allowed to import it) and train_grpo.py
(the GRPO step is timed with its own functions). Prints a markdown table, writes out/bench.json.

    python bench.py                                  # CPU fp32, every section (~15 min on 2 cores)
    python bench.py --quick                          # smaller shapes, fewer repeats (development, ~4 min)
    python bench.py --only decoder,rollout           # any of: decoder, rollout, audio, grpo, gpu
    python bench.py --threads 1 --clock cpu          # a shared machine: CPU seconds of a 1-thread process
    python bench.py --device cuda [--compile]        # bf16, SDPA (flash), + the 7B MFU / decode-bandwidth rows

Sections (ratios are ours / reference; > 1 is better for tokens/s, < 1 is better for memory):
  decoder  forward and forward+backward tokens/s of CausalLM vs transformers' Qwen2ForCausalLM, on the tiny
           default decoder and a Qwen2.5-0.5B-shaped one (random weights saved by transformers'
           save_pretrained, loaded by our from_pretrained). Both sides: full (B, T, V) logits + cross-entropy.
  rollout  one GRPO group: 1 prompt with 30 s of audio, G = 8 completions of 128 tokens (eos never stops a
           row), temperature 0.8. Ours: model.generate(num_samples=G) (audio encoded and prompt prefilled once,
           static KV cache; each decoding step replayed as a CUDA graph on a GPU, torch.compile'd on the CPU,
           whose compilation falls in the warm-up; and a row of eager steps); ours without sharing (prompt
           repeated G times); transformers' Qwen2AudioForConditionalGeneration.generate on the prompt repeated
           G times (do_sample, top_k 0; eager, its default).
  audio    30 s of audio -> LLM rows: log-mel features, then encoder + adapter (ours: audio_encoder.features +
           LALM.encode_audio; transformers: WhisperFeatureExtractor + audio_tower + multi_modal_projector).
  grpo     one step of the tiny default GRPO run (configs/grpo_tiny.json: 4 prompts x G 8, 96 new tokens,
           micro-batches of 8, beta 0.04; train_grpo's CompletionLogprobs / micro_batch / grpo_loss) in
           phases: rollout, log-probs (audio encoded once, reference pass; mu = 1 needs no old-policy pass),
           update (policy forward + backward + AdamW step); and a plain SFT step (forward + cross-entropy +
           backward + AdamW) on the same tokens.
  gpu      (cuda only) ours on a Qwen2-7B-shaped decoder: training forward+backward tokens/s and MFU, and
           decode tokens/s (CUDA graph and eager) against the memory-bandwidth bound.

Results, machine and caveats: BENCHMARKS.md.
Method: models and inputs are built from fixed seeds; every timed function is warmed up, then the sides of a
comparison run interleaved in alternating order (A B, B A, ...) so machine noise hits both, and the median of
`--repeats` runs is reported. torch.set_num_threads(--threads) for both sides. Peak memory: on CPU the peak
RSS growth of one call in a fresh spawned process that builds only that side (warm-up call first, then the
kernel's high-water mark is reset through /proc/self/clear_refs; glibc's mmap threshold is pinned so freed
buffers go back to the OS); on CUDA torch.cuda.max_memory_allocated over one call. The GRPO section sizes
come from configs/grpo_tiny.json; every completion is max_new_tokens long; reward scoring and tokenizer
decoding are not timed (random models, random token ids).
"""
import argparse
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F

import model as M
from audio_encoder import N_SAMPLES, SAMPLE_RATE, features, num_audio_tokens

OUT_DIR = "out/bench"
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SECTIONS = ("decoder", "rollout", "audio", "grpo", "gpu")

# Shapes. The tiny default is read from configs/sta_tiny.json (train_sta.tiny_config): one place for it.
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6,
                  rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True)
QWEN2_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False)
QWEN2_AUDIO_ENCODER = dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=1280, encoder_layers=32,
                           encoder_attention_heads=20, encoder_ffn_dim=5120, max_source_positions=1500)
# Dense bf16 tensor-core FLOP/s and HBM bytes/s per GPU (vendor datasheets), matched on the device name.
GPU_PEAKS = {"H200": (989e12, 4.8e12), "H100 PCIe": (756e12, 2.0e12), "H100": (989e12, 3.35e12),
             "A100": (312e12, 2.0e12), "L40S": (362e12, 0.864e12)}


def tiny_lalm_config() -> dict:
    """The tiny default's qwen2_audio config: train_sta.tiny_config with configs/sta_tiny.json's dims."""
    import runlib
    import train_sta
    cfg = runlib.parse_config(train_sta.Config, ["--config", os.path.join(CONFIGS, "sta_tiny.json")])
    from tokenizer import TIME_PIECES
    ids = {p: 7 + i for i, p in enumerate(TIME_PIECES)}                       # "0.0" .. "29.9": 7 .. 306, as trained
    tok = SimpleNamespace(vocab_size=cfg.vocab_size, eos_token_id=2, pad_token_id=0,
                          token_to_id=lambda s: ids.get(s, cfg.vocab_size - 1))  # <|AUDIO|>: the last id
    return train_sta.tiny_config(cfg, tok)


def tiny_grpo_config():
    """train_grpo's Config as configs/grpo_tiny.json sets it (group size, tokens, batch, beta, temperature)."""
    import runlib
    import train_grpo
    return runlib.parse_config(train_grpo.Config, ["--config", os.path.join(CONFIGS, "grpo_tiny.json")])


# ---------------------------------------------------------------------------
# Measurement: interleaved medians, peak memory in fresh processes.
@dataclass
class Case:
    fn: Callable[[], object]      # one timed call
    tokens: int                   # tokens processed or generated per call (0: report seconds)


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def measure_time(cases: dict, args) -> dict:
    """Median seconds per call of each case; after warm-up the cases run interleaved, in alternating order
    (A B, B A, ...) so neither side always runs right after the other."""
    for case in cases.values():
        for _ in range(args.warmup):
            case.fn()
    # cpu: this process's CPU seconds, immune to time-slicing by other processes (exact with --threads 1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in cases}
    for i in range(args.repeats):
        for name, case in list(cases.items())[::1 if i % 2 == 0 else -1]:
            sync(args.device)
            t0 = clock()
            case.fn()
            sync(args.device)
            times[name].append(clock() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def _peak_child(builder, args, side, kwargs, queue):
    torch.set_num_threads(args.threads)
    case = builder(args, side, **kwargs)
    case.fn()                                                       # warm-up: lazy inits, optimizer state
    base = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:                   # reset the high-water mark VmHWM
        f.write("5")
    case.fn()
    queue.put((_rss_kb("VmHWM") - base) * 1024)


def cuda_peak(fn) -> int:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory(builder, args, side, kwargs, case) -> int:
    """Bytes of memory one call of `case` needs on top of what is already allocated."""
    if args.no_memory:
        return -1
    if args.device == "cuda":
        return cuda_peak(case.fn)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(builder, args, side, kwargs, queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"memory child for {builder.__name__}({side}, {kwargs}) exited with {proc.exitcode}")
    return queue.get()


def compare(builder, args, sides, **kwargs) -> dict:
    """{side: (seconds per call, tokens per call, peak bytes)} for the sides of one comparison."""
    torch.manual_seed(0)
    cases = {side: builder(args, side, **kwargs) for side in sides}
    seconds = measure_time(cases, args)
    out = {}
    for side, case in cases.items():
        out[side] = (seconds[side], case.tokens, peak_memory(builder, args, side, kwargs, case))
    return out


def row(section, case, ours, ref, ref_name="transformers", unit="tok/s", higher_is_better=True) -> dict:
    """One table row from two (seconds, tokens, peak bytes) results; ratio = ours / reference."""
    def value(r):
        return r[1] / r[0] if unit == "tok/s" else r[0]
    v_ours, v_ref = value(ours), value(ref)
    mb = lambda r: r[2] / 2 ** 20 if r[2] >= 0 else None                  # noqa: E731
    return dict(section=section, case=case, unit=unit, ours=v_ours, reference=ref_name, ref=v_ref,
                ratio=v_ours / v_ref, higher_is_better=higher_is_better, ours_mb=mb(ours), ref_mb=mb(ref))


# ---------------------------------------------------------------------------
# Checkpoints: random models written by transformers' save_pretrained, read by both sides.
def hf_checkpoint(name: str, config: dict, make) -> str:
    """out/bench/ckpt/<name>-<hash of config>, written by make(config) -> transformers model when missing."""
    digest = hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    path = os.path.join(OUT_DIR, "ckpt", f"{name}-{digest}")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        make(config).save_pretrained(path)
    return path


def decoder_checkpoint(shape: str, layers: int) -> str:
    import transformers
    config = dict(tiny_lalm_config()["text_config"] if shape == "tiny" else QWEN25_05B, num_hidden_layers=layers)
    config = {k: v for k, v in config.items() if k not in ("model_type", "bos_token_id", "eos_token_id")}
    return hf_checkpoint(f"{shape}_{layers}l", config,
                         lambda c: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**c)))


def lalm_checkpoint(name: str, audio_config: dict | None = None) -> str:
    """The tiny default LALM, optionally with another audio encoder (e.g. Qwen2-Audio-shaped)."""
    import transformers
    tiny = tiny_lalm_config()
    config = dict(audio_config=audio_config or tiny["audio_config"], text_config=tiny["text_config"],
                  audio_token_index=tiny["audio_token_index"])
    return hf_checkpoint(name, config, lambda c: transformers.Qwen2AudioForConditionalGeneration(
        transformers.Qwen2AudioConfig(**c)))


def load_pair(path: str, hf_class: str, side: str, args):
    """Our model (from_pretrained) or transformers' (from_pretrained, SDPA attention) from one directory."""
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if side.startswith("ours"):
        model = M.from_pretrained(path, dtype=dtype, device=args.device)
    else:
        import transformers
        model = getattr(transformers, hf_class).from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        model = model.to(args.device)
    model.eval()
    # generate() needs the plain modules; compile only the decoder section's forward/backward, both sides
    return torch.compile(model) if args.compile and hf_class == "Qwen2ForCausalLM" else model


def audio_prompt(vocab: int, audio_token: int, n_audio: int, n_text=(24, 32), seed=0) -> torch.Tensor:
    """(T,) ids: text, n_audio placeholders, text, as the chat template lays out an audio question."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(4, vocab - 1, (n,), generator=g)                  # noqa: E731
    return torch.cat([text(n_text[0]), torch.full((n_audio,), audio_token), text(n_text[1])])


def left_pad(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


def noise_audio(seconds: float, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(int(seconds * SAMPLE_RATE), generator=g) * 0.1


# ---------------------------------------------------------------------------
# 1. Decoder forward and forward+backward.
def decoder_case(args, side, shape, layers, batch, seq, backward) -> Case:
    model = load_pair(decoder_checkpoint(shape, layers), "Qwen2ForCausalLM", side, args)
    V = model.config["vocab_size"] if side == "ours" else model.config.vocab_size
    ids = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(1)).to(args.device)

    def logits():
        return model(ids) if side == "ours" else model(input_ids=ids, use_cache=False).logits    # (B, T, V)

    def fwd():
        with torch.no_grad():
            logits()

    def fwd_bwd():
        out = logits()
        F.cross_entropy(out[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        model.zero_grad(set_to_none=True)
    return Case(fwd_bwd if backward else fwd, batch * seq)


def bench_decoder(args) -> list:
    shapes = [("tiny", tiny_lalm_config()["text_config"]["num_hidden_layers"], 8, 256),
              ("qwen2.5-0.5b", 4 if args.quick else QWEN25_05B["num_hidden_layers"], 1, 128 if args.quick else 256)]
    rows = []
    for shape, layers, batch, seq in shapes:
        full = shape == "tiny" or layers == QWEN25_05B["num_hidden_layers"]
        label = f"{shape}{'' if full else f' ({layers} of 24 layers)'} B{batch} T{seq}"
        for backward in (False, True):
            r = compare(decoder_case, args, ("ours", "transformers"), shape=shape, layers=layers, batch=batch,
                        seq=seq, backward=backward)
            rows.append(row("decoder", f"{label} {'fwd+bwd' if backward else 'fwd'}", r["ours"], r["transformers"]))
            print_row(rows[-1])
    return rows


# ---------------------------------------------------------------------------
# 2. Group rollout: prefix-shared generate vs the prompt repeated G times.
def rollout_case(args, side, G, new_tokens, audio_seconds, temperature=0.8) -> Case:
    model = load_pair(lalm_checkpoint("tiny_lalm"), "Qwen2AudioForConditionalGeneration", side, args)
    cfg = tiny_lalm_config()
    feats, fmask = features([noise_audio(audio_seconds)], cfg["audio_config"]["num_mel_bins"], pad_to_30s=True)
    ids = audio_prompt(cfg["text_config"]["vocab_size"], cfg["audio_token_index"],
                       num_audio_tokens(int(fmask.sum())))[None]                        # (1, T)
    mask = torch.ones_like(ids)
    dev, dtype = args.device, (torch.bfloat16 if args.device == "cuda" else torch.float32)
    feats, fmask, ids, mask = feats.to(dev, dtype), fmask.to(dev), ids.to(dev), mask.to(dev)
    gen = torch.Generator(dev).manual_seed(0)
    rep = lambda x: x.repeat_interleave(G, 0)                                         # noqa: E731

    def ours():                              # decoding steps as a CUDA graph (GPU) or compiled (CPU)
        return M.generate(model, ids, mask, feats, fmask, max_new_tokens=new_tokens, num_samples=G,
                          temperature=temperature, eos_token_id=None, generator=gen, compile=True)

    def ours_eager():                        # every decoding step run op by op
        return M.generate(model, ids, mask, feats, fmask, max_new_tokens=new_tokens, num_samples=G,
                          temperature=temperature, eos_token_id=None, generator=gen, cuda_graph=False)

    def ours_repeat():
        return M.generate(model, rep(ids), rep(mask), rep(feats), rep(fmask), max_new_tokens=new_tokens,
                          temperature=temperature, eos_token_id=None, generator=gen, compile=True)

    def transformers():
        model.generation_config.eos_token_id = None                # no row ever stops early, as ours
        return model.generate(input_ids=rep(ids), attention_mask=rep(mask), input_features=rep(feats),
                              feature_attention_mask=rep(fmask), do_sample=True, temperature=temperature, top_k=0,
                              top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return Case(dict(ours=ours, ours_eager=ours_eager, ours_repeat=ours_repeat, transformers=transformers)[side],
                G * new_tokens)


def bench_rollout(args) -> list:
    G, N = 8, 128
    cuda = args.device == "cuda"
    r = compare(rollout_case, args, ("ours", "ours_eager", "ours_repeat", "transformers"),
                G=G, new_tokens=N, audio_seconds=30.0)
    label = f"tiny LALM, 30 s audio, G{G} x {N} tokens"
    rows = [row("rollout", f"{label}, prefix-shared", r["ours"], r["transformers"]),
            row("rollout", f"{label}, prefix-shared, eager steps", r["ours_eager"], r["transformers"]),
            row("rollout", f"{label}, prompt repeated G times", r["ours_repeat"], r["transformers"]),
            row("rollout", f"{label}: prefix-sharing gain", r["ours"], r["ours_repeat"], "ours, repeated"),
            row("rollout", f"{label}: {'CUDA-graph' if cuda else 'compiled-step'} gain", r["ours"],
                r["ours_eager"], "ours, eager")]
    for x in rows:
        print_row(x)
    return rows


# ---------------------------------------------------------------------------
# 3. Audio path: 30 s waveform -> features -> encoder + adapter rows.
def encode_audio_hf(model, feats, fmask) -> torch.Tensor:
    """transformers' Qwen2AudioModel.forward audio branch (v5), up to the rows scattered into the prompt."""
    from transformers.masking_utils import create_bidirectional_mask
    m = model.model
    enc_len, out_len = m.audio_tower._get_feat_extract_output_lengths(fmask.sum(-1))
    n = (feats.shape[-1] - 2) // 2 + 1
    valid = (torch.arange(n, device=feats.device)[None] < enc_len[:, None]).long()
    mask = create_bidirectional_mask(config=m.audio_tower.config, attention_mask=valid,
                                     inputs_embeds=torch.zeros(feats.shape[0], n, 1, dtype=feats.dtype,
                                                               device=feats.device))
    h = m.multi_modal_projector(m.audio_tower(feats, attention_mask=mask).last_hidden_state)
    return h[torch.arange(h.shape[1], device=h.device)[None] < out_len[:, None]]


def audio_case(args, side, encoder, part) -> Case:
    import transformers
    path = lalm_checkpoint("tiny_lalm") if encoder == "tiny" else lalm_checkpoint(f"audio_{encoder}",
                                                                                  audio_encoder_config(encoder))
    model = load_pair(path, "Qwen2AudioForConditionalGeneration", side, args)
    n_mels = model.config["audio_config"]["num_mel_bins"] if side == "ours" else model.config.audio_config.num_mel_bins
    wav = noise_audio(N_SAMPLES / SAMPLE_RATE)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if side == "ours":
        feats_fn = lambda: features([wav], n_mels, pad_to_30s=True)                            # noqa: E731
        encode = model.encode_audio
    else:
        extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)

        def feats_fn():
            x = extractor(wav.numpy(), sampling_rate=SAMPLE_RATE, return_attention_mask=True,
                          padding="max_length", return_tensors="pt")
            return x["input_features"], x["attention_mask"]
        encode = lambda f, m: encode_audio_hf(model, f, m)                                     # noqa: E731
    feats, fmask = (t.to(args.device) for t in feats_fn())
    feats = feats.to(dtype)

    @torch.no_grad()
    def total():
        f, m = feats_fn()
        return encode(f.to(args.device, dtype), m.to(args.device))
    fn = {"features": feats_fn, "encoder": torch.no_grad()(lambda: encode(feats, fmask)), "total": total}[part]
    return Case(fn, 0)


def audio_encoder_config(encoder: str) -> dict:
    """'qwen2-audio-<k>l': Qwen2-Audio's encoder width with k of its 32 layers (per-layer cost is the real one)."""
    return dict(QWEN2_AUDIO_ENCODER, encoder_layers=int(encoder.split("-")[-1].rstrip("l")))


def bench_audio(args) -> list:
    rows = []
    for encoder in ["tiny"] + ([] if args.quick else ["qwen2-audio-4l"]):
        for part in ("features", "encoder", "total"):
            r = compare(audio_case, args, ("ours", "transformers"), encoder=encoder, part=part)
            rows.append(row("audio", f"30 s, {encoder} encoder: {part}", r["ours"], r["transformers"], unit="s",
                            higher_is_better=False))
            print_row(rows[-1])
    return rows


# ---------------------------------------------------------------------------
# 4. One GRPO step of the tiny default, in phases, and an SFT step on the same tokens.
def grpo_case(args, side) -> Case:
    """One phase of a GRPO step shaped like configs/grpo_tiny.json, every completion max_new_tokens long."""
    import train_grpo as T
    g = tiny_grpo_config()
    G, N, micro = g.group_size, g.max_new_tokens, g.device_batch_size
    prompts = micro * g.grad_accum // G
    torch.manual_seed(0)
    cfg = tiny_lalm_config()
    dev = args.device
    policy = M.build_lalm(cfg).to(dev)
    ref = T.CompletionLogprobs(M.build_lalm(cfg).to(dev).requires_grad_(False).eval())
    ref.model.load_state_dict(policy.state_dict())
    for name, p in policy.named_parameters():                         # freeze_audio, as the tiny default
        p.requires_grad_(not (g.freeze_audio and name.startswith(("audio_tower.", "multi_modal_projector."))))
    step_module = T.CompletionLogprobs(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=g.lr, fused=dev == "cuda")

    # prompts as the tiny default batches them: clips of 4..7 s, features padded to the longest (not 30 s)
    clips = [noise_audio(4 + b % 4, seed=b) for b in range(prompts)]
    feats, fmask = features(clips, cfg["audio_config"]["num_mel_bins"], pad_to_30s=False)
    ids, mask = left_pad([audio_prompt(cfg["text_config"]["vocab_size"], cfg["audio_token_index"],
                                       num_audio_tokens(int(n)), seed=b) for b, n in enumerate(fmask.sum(-1))])
    batch = {k: v.to(dev) for k, v in dict(input_ids=ids, attention_mask=mask, input_features=feats,
                                           feature_attention_mask=fmask).items()}
    gen = torch.Generator(dev).manual_seed(0)
    # as train_grpo on a GPU: fp32 master weights, bf16 autocast
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")

    @amp
    def rollout():
        policy.eval()
        out = []
        for s in range(0, prompts, g.rollout_prompts):
            p = slice(s, s + g.rollout_prompts)
            out.append(M.generate(policy, batch["input_ids"][p], batch["attention_mask"][p],
                                  batch["input_features"][p], batch["feature_attention_mask"][p],
                                  max_new_tokens=N, num_samples=G, temperature=g.temperature, eos_token_id=None,
                                  generator=gen))
        return [torch.cat(x) for x in zip(*out)]
    batch["tokens"], batch["lengths"], _ = rollout()
    advantages = T.group_advantages(torch.randn(prompts, G, generator=torch.Generator().manual_seed(0)),
                                    g.scale_rewards).flatten().to(dev)
    rows = [list(range(s, s + micro)) for s in range(0, prompts * G, micro)]
    inputs = [T.micro_batch(batch, m, G, policy.audio_token_id, encoded=True) for m in rows]
    state = {}

    @amp
    @torch.no_grad()
    def logprobs():              # audio encoded once for policy and reference; the reference pass (mu = 1)
        state["audio"] = policy.encode_audio(batch["input_features"], batch["feature_attention_mask"])
        state["ref"] = [ref(**x, temperature=g.temperature, audio_embeds=state["audio"]) for x, _ in inputs]
    logprobs()

    @amp
    def update():
        policy.train()
        for (x, cmask), m, ref_logp in zip(inputs, rows, state["ref"]):
            logp = step_module(**x, temperature=g.temperature, audio_embeds=state["audio"])      # (N, C)
            loss, _ = T.grpo_loss(logp, logp.detach(), ref_logp, advantages[m], cmask, g.beta, g.eps_low,
                                  g.eps_high, g.loss_type)
            (loss / len(rows)).backward()
        torch.nn.utils.clip_grad_norm_(params, g.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @amp
    def sft():                   # the same rows: prompt + completion, cross-entropy on the completion tokens
        policy.train()
        lm = policy.language_model
        for x, cmask in inputs:
            ids = torch.cat([x["prompt_ids"], x["targets"]], 1)                                   # (N, T)
            att = torch.cat([x["prompt_mask"], cmask.long()], 1)
            h = torch.cat([policy.embed(x["prompt_ids"], audio_embeds=state["audio"][x["audio_rows"]]),
                           lm.embed_ids(x["targets"])], 1)        # sampled tokens are text, as in generate
            hidden = lm(ids, att, return_hidden=True, inputs_embeds=h)                           # (N, T, D)
            select = F.pad(cmask, (x["prompt_ids"].shape[1], 0))[:, 1:]                          # t predicted at t-1
            logits = hidden[:, :-1][select] @ policy.lm_head_weight().T                          # (n, V)
            (F.cross_entropy(logits.float(), ids[:, 1:][select]) / len(inputs)).backward()
        torch.nn.utils.clip_grad_norm_(params, g.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return Case(dict(rollout=rollout, logprobs=logprobs, update=update, sft=sft)[side], prompts * G * N)


def bench_grpo(args) -> list:
    g = tiny_grpo_config()
    r = compare(grpo_case, args, ("rollout", "logprobs", "update", "sft"))
    label = (f"tiny default, {g.device_batch_size * g.grad_accum // g.group_size} prompts x G{g.group_size} x "
             f"{g.max_new_tokens} tokens")
    step = sum(r[p][0] for p in ("rollout", "logprobs", "update"))
    alone = dict(reference="-", ref=None, ratio=None, ref_mb=None)                # phases: no reference
    rows = [dict(row("grpo", f"{label}: {phase}", r[phase], r[phase], unit="s", higher_is_better=False), **alone)
            for phase in ("rollout", "logprobs", "update")]
    rows.append(dict(row("grpo", f"{label}: whole step (sum of phases)", (step, 0, -1), (step, 0, -1), unit="s",
                         higher_is_better=False), **alone))
    rows.append(row("grpo", f"{label}: update vs SFT step, same tokens", r["update"], r["sft"], "SFT step",
                    unit="s", higher_is_better=False))
    for x in rows:
        print_row(x)
    return rows


# ---------------------------------------------------------------------------
# 5. GPU only: a 7B-shaped decoder, training MFU and decode bandwidth.
def gpu_peaks(args) -> tuple[float, float]:
    if args.peak_tflops and args.peak_gbps:
        return args.peak_tflops * 1e12, args.peak_gbps * 1e9
    name = torch.cuda.get_device_name()
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return peaks
    raise ValueError(f"unknown GPU {name!r}: pass --peak_tflops and --peak_gbps (bf16 dense, HBM)")


def random_decoder(config: dict, device, dtype) -> M.CausalLM:
    with torch.device("meta"):
        lm = M.CausalLM(config)
    return M.init_weights(lm.to_empty(device=device)).to(dtype)


def train_flops_per_token(c: dict, seq: int) -> float:
    """6 x matmul parameters (lm_head included, embedding lookup not) + causal attention 6 L T H hd."""
    per_layer = c["dim"] * (c["heads"] + 2 * c["kv_heads"]) * c["head_dim"] + c["heads"] * c["head_dim"] * c["dim"] \
        + 3 * c["dim"] * c["ffn"]
    return 6 * (c["layers"] * per_layer + c["dim"] * c["vocab"]) + 6 * c["layers"] * seq * c["heads"] * c["head_dim"]


def bench_gpu(args, config=QWEN2_7B) -> list:
    dev, dtype = args.device, torch.bfloat16
    flops, bandwidth = gpu_peaks(args) if dev == "cuda" else (1e12, 1e11)       # CPU: a smoke test of the code
    lm = random_decoder(config, dev, dtype)
    c = lm.c
    train = lm if not args.compile else torch.compile(lm)
    seq = 512 if args.quick else 2048
    ids = torch.randint(0, c["vocab"], (1, seq), device=dev)

    def fwd_bwd():
        hidden = train(ids, return_hidden=True)
        (-M.token_logprobs(hidden[:, :-1], lm.lm_head_weight(), ids[:, 1:]).mean()).backward()
        lm.zero_grad(set_to_none=True)
    t = measure_time({"train": Case(fwd_bwd, seq)}, args)["train"]
    tok_s = seq / t
    mfu = tok_s * train_flops_per_token(c, seq) / flops
    mb = lambda fn: cuda_peak(fn) / 2 ** 20 if dev == "cuda" and not args.no_memory else None     # noqa: E731
    rows = [dict(section="gpu", case=f"7B-shaped fwd+bwd T{seq} bf16{' compiled' if args.compile else ''}",
                 unit="tok/s", ours=tok_s, reference="MFU", ref=None, ratio=mfu, higher_is_better=True,
                 ours_mb=mb(fwd_bwd), ref_mb=None)]
    print_row(rows[-1])
    del train

    G, N, prompt = 8, 128, 782                          # 30 s of audio (750 tokens) + a question
    ids = torch.randint(0, c["vocab"], (1, prompt), device=dev)
    # one generate = prefill + N sampled tokens; decode rate = the N - 1 decoding steps' tokens over (full - prefill)
    gen = lambda n, graph=True: M.generate(lm, ids, max_new_tokens=n, num_samples=G, temperature=0.8,  # noqa: E731
                                           cuda_graph=graph)
    secs = measure_time({"graph": Case(lambda: gen(N), 0), "eager": Case(lambda: gen(N, False), 0),
                         "prefill": Case(lambda: gen(1), 0)}, args)
    param_bytes = sum(p.numel() for n, p in lm.named_parameters() if "embed_tokens" not in n or c["tie"]) * 2
    kv_bytes = 2 * c["layers"] * c["kv_heads"] * c["head_dim"] * G * (prompt + N / 2) * 2     # mean context
    bound = G * bandwidth / (param_bytes + kv_bytes)
    for mode in ("graph", "eager"):
        decode_tok_s = G * (N - 1) / (secs[mode] - secs["prefill"])
        rows.append(dict(section="gpu", case=f"7B-shaped decode G{G}, prompt {prompt}, {N} tokens, "
                         f"{'CUDA graph' if mode == 'graph' else 'eager'}", unit="tok/s", ours=decode_tok_s,
                         reference="bandwidth bound", ref=bound, ratio=decode_tok_s / bound, higher_is_better=True,
                         ours_mb=mb(lambda: gen(N, mode == "graph")), ref_mb=None))
        print_row(rows[-1])
    return rows


# ---------------------------------------------------------------------------
# Report.
def fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"


def print_row(r: dict):
    print(f"  {r['section']:8s} | {r['case']:58s} | {fmt(r['ours'])} vs {fmt(r['ref'])} {r['unit']} "
          f"({r['reference']}) | ratio {fmt(r['ratio'])} | MB {fmt(r['ours_mb'])} / {fmt(r['ref_mb'])}", flush=True)


def markdown(rows: list) -> str:
    lines = ["| section | case | unit | ours | reference | ref | ours/ref | peak MB ours | peak MB ref | MB ours/ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mem = r["ours_mb"] / r["ref_mb"] if r["ours_mb"] and r["ref_mb"] else None
        lines.append(f"| {r['section']} | {r['case']} | {r['unit']} | {fmt(r['ours'])} | {r['reference']} | "
                     f"{fmt(r['ref'])} | {fmt(r['ratio'])} | {fmt(r['ours_mb'])} | {fmt(r['ref_mb'])} | {fmt(mem)} |")
    return "\n".join(lines)


def check_targets(rows: list) -> list:
    """The team's targets, as (description, holds) for the rows this run measured."""
    out = []
    for r in rows:
        if r["section"] == "decoder" and r["case"].endswith("fwd+bwd"):
            out.append((f"decoder fwd+bwd >= 1.0x transformers ({r['case']}): {r['ratio']:.2f}x", r["ratio"] >= 1.0))
        if r["section"] == "rollout" and r["case"].endswith("prefix-shared"):
            lower = r["ours_mb"] is None or r["ours_mb"] < r["ref_mb"]
            out.append((f"group rollout >= 3x transformers tok/s with lower peak memory: {r['ratio']:.2f}x, "
                        f"{fmt(r['ours_mb'])} vs {fmt(r['ref_mb'])} MB", r["ratio"] >= 3.0 and lower))
        if r["section"] == "grpo" and r["reference"] == "SFT step":
            out.append((f"GRPO update within 1.5x of an SFT step: {r['ratio']:.2f}x", r["ratio"] <= 1.5))
    return out


def machine(args) -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        cpu = re.search(r"Model name:\s+(.*)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        cpu = platform.processor()
    import transformers
    info = dict(cpu=cpu, cores=os.cpu_count(), threads=args.threads, torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                load_avg=os.getloadavg(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)} (default: all)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="smaller shapes, 1 warm-up + 3 repeats")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=None, help="default 1 (quick) / 2")
    p.add_argument("--repeats", type=int, default=None, help="default 3 (quick) / 7")
    p.add_argument("--clock", default="wall", choices=("wall", "cpu"),
                   help="cpu: process CPU time, for a shared machine (use with --threads 1)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--compile", action="store_true", help="torch.compile our models (forward/backward)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="GPU bf16 dense peak (default: by name)")
    p.add_argument("--peak_gbps", type=float, default=0.0, help="GPU memory bandwidth (default: by name)")
    p.add_argument("--out", default="out/bench.json")
    args = p.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    only = [s for s in args.only.split(",") if s] or [s for s in SECTIONS if s != "gpu" or args.device == "cuda"]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.clock == "cpu" and (args.device == "cuda" or args.threads != 1):
        raise SystemExit("--clock cpu needs --device cpu --threads 1 (CPU time of several threads or of a GPU "
                         "run is not its duration)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    torch.set_num_threads(args.threads)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"     # memory children: freed buffers return to the OS
    info = machine(args)
    print(f"bench: {json.dumps(info)} | sections {only} | warm-up {args.warmup} | repeats {args.repeats}", flush=True)
    t0 = time.time()
    rows = []
    for section in only:
        rows += {"decoder": bench_decoder, "rollout": bench_rollout, "audio": bench_audio, "grpo": bench_grpo,
                 "gpu": bench_gpu}[section](args)
    table = markdown(rows)
    print(table)
    targets = check_targets(rows)
    for text, holds in targets:
        print(f"target {'HOLDS' if holds else 'MISSED'}: {text}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": info, "args": vars(args), "rows": rows, "targets": targets,
                   "seconds": time.time() - t0}, f, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return rows


if __name__ == "__main__":
    main()

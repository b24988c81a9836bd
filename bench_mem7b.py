"""Peak RSS of model.from_pretrained on a random Qwen2.5-Omni-7B-shaped checkpoint in the released full layout.

  python bench_mem7b.py write DIR    # bf16 shards written one at a time (meta shapes, <= 2 GB in memory)
  python bench_mem7b.py load DIR     # from_pretrained(DIR, dtype=bfloat16) in a fresh process: time, peak RSS
"""
import json
import os
import resource
import sys
import time

import torch

import model as M


def hub_config():
    import transformers                        # only for the real default sizes and the vision key names
    thinker = transformers.Qwen2_5OmniThinkerConfig().to_dict()
    thinker["text_config"]["tie_word_embeddings"] = False
    return {"architectures": ["Qwen2_5OmniModel"], "model_type": "qwen2_5_omni", "enable_audio_output": True,
            "thinker_config": thinker, "talker_config": {"model_type": "qwen2_5_omni_talker"},
            "token2wav_config": {"model_type": "qwen2_5_omni_token2wav"}}, thinker


def write(out, shard_bytes=2 * 10**9):
    import transformers
    cfg, thinker = hub_config()
    with torch.device("meta"):
        ours = M.LALM(cfg)
        hf = transformers.Qwen2_5OmniThinkerForConditionalGeneration(transformers.Qwen2_5OmniThinkerConfig(**thinker))
    shapes = {M._released_name("qwen2_5_omni", n): tuple(p.shape) for n, p in ours.named_parameters()}
    shapes.update({"thinker." + k.removeprefix("model."): tuple(v.shape) for k, v in hf.state_dict().items()
                   if k.startswith("model.visual.")})               # the vision tower, skipped on load
    shapes.update({"talker.model.embed_tokens.weight": (8448, 3584), "token2wav.dummy.weight": (1024, 1024)})
    os.makedirs(out, exist_ok=True)
    shards, size = [[]], 0
    for k in sorted(shapes):
        n = torch.Size(shapes[k]).numel() * 2
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: torch.empty(shapes[k], dtype=torch.bfloat16).normal_(0, 0.02) for k in keys}
        M._atomic_save(tensors, os.path.join(out, name))
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
        print(f"wrote {name} ({len(keys)} tensors)", flush=True)
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(out, "model.safetensors.index.json"), "w"))
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))


def rss_gb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 2**20


def load(path):
    with open("/proc/self/oom_score_adj", "w") as f:    # if memory runs out, this process is the one to go
        f.write("1000")
    avail = int(next(l for l in open("/proc/meminfo") if l.startswith("MemAvailable")).split()[1]) / 2**20
    need = 8.26e9 * 2 / 2**30                               # the thinker's audio + text weights in bf16
    if avail < need + 0.5:   # bf16 -> bf16 maps the files: pages are reclaimable page cache
        sys.exit(f"only {avail:.1f} GiB available, {need:.1f} GiB of weights + 0.5: not loading on a shared machine")
    # safety net on a shared 24 GiB machine: fail with MemoryError instead of waking the OOM killer
    limit = int((rss_gb("VmSize") + 21) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.time()
    m = M.from_pretrained(path, dtype=torch.bfloat16)
    dt = time.time() - t
    lazy = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t = time.time()
    with torch.no_grad():                        # read every page of every weight (safetensors maps them lazily)
        touched = sum(float(p.view(-1)[::2048].float().sum()) for p in m.parameters())
    dt_touch = time.time() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    weights = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**30
    files = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    print(json.dumps({"files_GiB": round(files / 2**30, 2), "params_B": round(sum(p.numel() for p in m.parameters())
                      / 1e9, 3), "weights_in_memory_GiB": round(weights, 2), "rss_before_load_GiB": round(base, 2),
                      "peak_rss_after_load_GiB": round(lazy, 2), "load_s": round(dt, 1),
                      "peak_rss_after_reading_all_weights_GiB": round(peak, 2), "read_s": round(dt_touch, 1),
                      "rss_file_backed_GiB": round(rss_gb("RssFile"), 2), "rss_anon_GiB": round(rss_gb("RssAnon"), 2),
                      "checksum": touched}))


if __name__ == "__main__":
    {"write": write, "load": load}[sys.argv[1]](sys.argv[2])

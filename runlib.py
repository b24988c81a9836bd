"""Run plumbing shared by train_sta.py and train_grpo.py: config, processes, checkpoints, logging.

Small on purpose: each training script stays readable top to bottom and calls these few functions.

API (stable; the training scripts import exactly these names)
  Config
    parse_config(cls, argv=None) -> cls instance
        `--config file.json` (or `--config=file.json`) first, then `--key=value` overrides, both checked
        against the dataclass `cls`: an unknown key or a value of the wrong type raises ValueError naming
        the key, the expected type and what was found. Types: int, float, bool, str, `X | None`, list, dict.
    config_dict(cfg) -> dict                         resolved config, JSON-ready (saved with run and checkpoints)
  Processes (one code path for 1..N; torchrun's RANK/LOCAL_RANK/WORLD_SIZE, read when called)
    setup_dist(device="auto") -> Dist                init the process group if launched by torchrun (any
                                                     world size; nccl on CUDA, gloo on CPU);
                                                     Dist(rank, local_rank, world_size, device, is_main,
                                                     distributed)
    cleanup_dist(dist)                               destroy the process group
    start_run(cfg, dist) -> log                      print + save the resolved config; log prints on rank 0 only
    wrap_model(model, dist, strategy, param_dtype=None) -> model
                                                     "ddp": DistributedDataParallel; "fsdp": FSDP2
                                                     fully_shard on every block of every nn.ModuleList and
                                                     on the root; a no-op outside torchrun
    unwrap(model) -> nn.Module                       the module under DDP (FSDP2 shards in place: itself)
    set_grad_sync(model, enabled)                    skip the gradient all-reduce on accumulation micro-steps
    all_reduce_sum(tensor, dist) -> tensor           in-place sum over ranks (no-op when alone)
  Schedule
    cosine_lr(step, lr, warmup_steps, total_steps, min_lr) -> float   linear warmup then cosine decay
  Checkpoints (dir/step_000120/{weights..., config.json, meta.json, optim.pt}; dir/latest -> step_000120)
    save_checkpoint(ckpt_dir, step, model, optimizer, meta, dist, keep_last=3, save_weights=None,
                    extra_files=()) -> path       (every rank calls it; rank 0 writes)
        rank 0 writes into dir/.tmp-step_XXXXXX, then renames it and repoints `latest` atomically, then
        deletes all but the newest keep_last; a crash at any moment leaves the previous `latest` intact.
        save_weights(module, path, state_dict=None) writes the weights (model.save_pretrained); under
        FSDP2 it receives the gathered full state dict.
        meta gets "step", "rng" (every rank's RNG states) and "time" added.
    unsharded_copy(model, state_dict, prefix="") -> nn.Module
                                                     a plain copy of model holding that gathered state
    latest_checkpoint(ckpt_dir) -> str | None        resolved path of `latest`, None if there is none
    load_meta(path) -> dict                          meta.json of a checkpoint
    check_resume(path, meta, cfg, free)              ValueError naming every setting outside `free` that
                                                     differs from the config the checkpoint was saved with
    load_optimizer(path, model, optimizer, dist)     restore optimizer state (DDP/single: optim.pt; FSDP2: full
                                                     state dict scattered to the shards)
    rng_state() -> dict / set_rng_state(state)       python, numpy, torch CPU (+CUDA) generators
    restore_rng(meta, dist)                          set this rank's RNG state from a checkpoint's meta
  Logging
    step_line(step, total, **metrics) -> str         "step 120/2000 | loss 1.2340 | lr 1.00e-03 | ..."
    MetricsLog(path)                                 .write(dict) appends one JSON line (rank 0 only)
    check_finite(value, what, step, detail="")       raise NonFiniteError naming step and batch
    NonFiniteError
"""
import dataclasses
import json
import math
import os
import random
import shutil
import time
import types
import typing
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

# ---------------------------------------------------------------------------
# Config: one typed dataclass, overridable from a JSON file and --key=value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp)


def _coerce(key: str, tp, value, from_cli: bool):
    """Return value converted to type tp; ValueError naming key, expected and found otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):                     # X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_cli and str(value).lower() in ("none", "null")):
            return None
        if len(args) == 1:
            return _coerce(key, args[0], value, from_cli)
        raise ValueError(f"config key {key!r}: unsupported type {tp}")
    bad = ValueError(f"config key {key!r}: expected {_type_name(tp)}, found {value!r} ({type(value).__name__})")
    if from_cli:
        s = str(value)
        if tp is bool:
            if s.lower() in ("true", "1", "yes"):
                return True
            if s.lower() in ("false", "0", "no"):
                return False
            raise bad
        if tp is int:
            try:
                return int(s)
            except ValueError:
                raise bad from None
        if tp is float:
            try:
                return float(s)
            except ValueError:
                raise bad from None
        if tp is str:
            return s
        if origin in (list, dict) or tp in (list, dict):              # --key='[1, 2]' as JSON
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                raise bad from None
            return _coerce(key, tp, value, from_cli=False)
        raise ValueError(f"config key {key!r}: unsupported type {tp}")
    # from a JSON file: the JSON type must already match (an int is accepted where a float is expected)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if (origin or tp) in (list, dict):
        if isinstance(value, origin or tp):
            return value
        raise bad
    raise ValueError(f"config key {key!r}: unsupported type {tp}")


def parse_config(cls, argv=None):
    """Build cls from defaults, then `--config file.json`, then `--key=value` arguments (in that order)."""
    argv = list(argv or [])
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {}
    config_files, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file: --config path/to/config.json")
            config_files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            config_files.append(arg.split("=", 1)[1])
        elif arg.startswith("--") and "=" in arg:
            overrides.append(arg[2:].split("=", 1))
        else:
            raise ValueError(f"cannot parse argument {arg!r}: expected --key=value or --config file.json")
        i += 1
    for path in config_files:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of config keys, found {type(data).__name__}")
        for key, value in data.items():
            if key.startswith("_"):                                   # "_comment" keys document the file
                continue
            if key not in fields:
                raise ValueError(f"{path}: unknown config key {key!r}; valid keys: {sorted(fields)}")
            values[key] = _coerce(key, hints[key], value, from_cli=False)
    for key, value in overrides:
        key = key.replace("-", "_")
        if key not in fields:
            raise ValueError(f"unknown config key --{key}; valid keys: {sorted(fields)}")
        values[key] = _coerce(key, hints[key], value, from_cli=True)
    return cls(**values)


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------
# Processes: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; a plain `python` run is rank 0 of 1


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_dist(device: str = "auto") -> Dist:
    """Initialise the process group when launched by torchrun (with any number of processes, 1 too: a one-GPU
    FSDP2 run is the 8-GPU run's code path); pick this process's device."""
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device(device)
    if distributed and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, local_rank, world_size, dev, distributed)


def start_run(cfg, dist):
    """Print the resolved config and save it as <out_dir>/config.json (rank 0); returns a print that only rank 0
    prints with."""
    log = print if dist.is_main else (lambda *a, **k: None)
    os.makedirs(cfg.out_dir, exist_ok=True)
    log("config:", json.dumps(config_dict(cfg)))
    if dist.is_main:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(config_dict(cfg), f, indent=1)
    return log


def cleanup_dist(dist: Dist):
    if dist.distributed and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def wrap_model(model: nn.Module, dist: Dist, strategy: str = "ddp", param_dtype=None) -> nn.Module:
    """DDP (a full replica per process) or FSDP2 (parameters sharded; for 7B models); unchanged outside
    torchrun.

    FSDP2 shards each block of every nn.ModuleList (encoder and decoder layers) and then the root, so one
    block's full parameters exist at a time. param_dtype (e.g. torch.bfloat16) makes FSDP2 compute in that
    dtype with fp32 master weights and fp32 gradient reduction.
    """
    if not dist.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    raise ValueError(f"strategy must be 'ddp' or 'fsdp', found {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "require_backward_grad_sync") and hasattr(model, "module") else model


def _is_fsdp(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def set_grad_sync(model: nn.Module, enabled: bool):
    """Gradient accumulation: only the last micro-step of an optimizer step all-reduces gradients."""
    if _is_fsdp(model):
        model.set_requires_gradient_sync(enabled)
    elif hasattr(model, "require_backward_grad_sync"):
        model.require_backward_grad_sync = enabled


def all_reduce_sum(tensor: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.distributed:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


# ---------------------------------------------------------------------------
# Learning-rate schedule


def cosine_lr(step: int, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """lr at optimizer step `step` (0-based): linear warmup to lr, then cosine decay to min_lr at total_steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ---------------------------------------------------------------------------
# RNG state (so a resumed run draws exactly what the uninterrupted run would have)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_json(state: dict) -> dict:
    py = state["python"]
    out = {"python": [py[0], list(py[1]), py[2]],
           "numpy": [state["numpy"][0], state["numpy"][1].tolist(), *[x for x in state["numpy"][2:]]],
           "torch": state["torch"].tolist()}
    if "cuda" in state:
        out["cuda"] = [s.tolist() for s in state["cuda"]]
    return out


def _rng_from_json(d: dict) -> dict:
    py = d["python"]
    np_state = d["numpy"]
    state = {"python": (py[0], tuple(py[1]), py[2]),
             "numpy": (np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]),
             "torch": torch.tensor(d["torch"], dtype=torch.uint8)}
    if "cuda" in d:
        state["cuda"] = [torch.tensor(s, dtype=torch.uint8) for s in d["cuda"]]
    return state


def restore_rng(meta: dict, dist: Dist):
    """Set this rank's RNG state from a checkpoint (rank 0's if the world size changed)."""
    states = meta["rng"]
    set_rng_state(_rng_from_json(states[dist.rank] if dist.rank < len(states) else states[0]))


# ---------------------------------------------------------------------------
# Checkpoints: weights in the released layout + meta.json + optim.pt, written atomically

LATEST = "latest"


def _full_state_dicts(model: nn.Module, optimizer):
    """Full (unsharded) model and optimizer state dicts on rank 0 (FSDP2 gathers them to CPU)."""
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_state_dict(model, optimizer, options=opts)
    return None, optimizer.state_dict()


def unsharded_copy(model: nn.Module, state_dict: dict, prefix: str = "") -> nn.Module:
    """A plain copy of `model` (type(model)(model.config), built on meta) holding the full state dict FSDP2
    gathered (_full_state_dicts), whose keys start with `prefix` (the wrapper's attribute holding model)."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items()}, assign=True)
    return copy


def save_checkpoint(ckpt_dir: str, step: int, model: nn.Module, optimizer, meta: dict, dist: Dist,
                    keep_last: int = 3, save_weights=None, extra_files=()) -> str:
    """Write ckpt_dir/step_XXXXXX atomically and point ckpt_dir/latest at it. Returns the final path.

    Every rank must call it (FSDP2 gathers the full state dict, RNG states are gathered); rank 0 writes.
    save_weights(module, path, state_dict=None) writes the weights in the released layout (a thin wrapper
    around model.save_pretrained); under FSDP2 it gets the gathered full state dict as `state_dict`.
    extra_files: paths copied into the checkpoint (e.g. the tokenizer.model).
    """
    rngs = [None] * dist.world_size
    if dist.distributed:
        torch_dist.all_gather_object(rngs, _rng_to_json(rng_state()))
    else:
        rngs = [_rng_to_json(rng_state())]
    model_sd, optim_sd = _full_state_dicts(model, optimizer)  # collective under FSDP2: every rank calls it
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    if dist.is_main:
        os.makedirs(ckpt_dir, exist_ok=True)
        tmp = os.path.join(ckpt_dir, f".tmp-step_{step:06d}")
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        if model_sd is None:
            save_weights(unwrap(model), tmp)
        else:
            save_weights(unwrap(model), tmp, state_dict=model_sd)
        torch.save(optim_sd, os.path.join(tmp, "optim.pt"))
        for path in extra_files:
            shutil.copy(path, os.path.join(tmp, os.path.basename(path)))
        meta = dict(meta, step=step, rng=rngs, time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        _fsync_dir(tmp)
        if os.path.exists(final):                                     # re-saving a step (e.g. after resume)
            shutil.rmtree(final)
        os.rename(tmp, final)
        link_tmp = os.path.join(ckpt_dir, f".{LATEST}.tmp")
        if os.path.lexists(link_tmp):
            os.remove(link_tmp)
        os.symlink(os.path.basename(final), link_tmp)
        os.replace(link_tmp, os.path.join(ckpt_dir, LATEST))          # atomic switch of the pointer
        _prune(ckpt_dir, keep_last)
    if dist.distributed:
        torch_dist.barrier()
    return final


def _fsync_dir(path: str):
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())


def _prune(ckpt_dir: str, keep_last: int):
    steps = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_"))
    current = os.path.basename(os.path.realpath(os.path.join(ckpt_dir, LATEST)))
    for d in steps[:-keep_last] if keep_last > 0 else []:
        if d != current:
            shutil.rmtree(os.path.join(ckpt_dir, d))
    for d in os.listdir(ckpt_dir):                                    # leftovers of an interrupted save
        if d.startswith(".tmp-step_"):
            shutil.rmtree(os.path.join(ckpt_dir, d))


def latest_checkpoint(ckpt_dir: str):
    path = os.path.join(ckpt_dir, LATEST)
    if not os.path.exists(os.path.join(path, "meta.json")):
        return None
    return os.path.realpath(path)


def load_meta(path: str) -> dict:
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


def check_resume(path: str, meta: dict, cfg, free) -> None:
    """A run resumes only under the recipe it was saved with, so that it repeats the uninterrupted run.
    `free` names the settings that do not change what is trained (where to write, how often to log, evaluate
    or save); any other difference, a setting added or removed since the save included, is a ValueError that
    lists them all, before anything is loaded."""
    saved, now = meta.get("config", {}), json.loads(json.dumps(config_dict(cfg)))   # both as JSON values
    absent = "(absent)"
    changed = [f"{key}: {saved.get(key, absent)!r} -> {now.get(key, absent)!r}"
               for key in sorted(set(saved) | set(now))
               if key not in free and saved.get(key, absent) != now.get(key, absent)]
    if changed:
        raise ValueError(f"{path} was saved by a run with other settings; resuming it would not repeat that "
                         "run:\n  " + "\n  ".join(changed) + "\nRun again with the saved settings (they are in "
                         "its meta.json), or start a new run in another --out_dir.")


def load_optimizer(path: str, model: nn.Module, optimizer, dist: Dist):
    state = torch.load(os.path.join(path, "optim.pt"), map_location="cpu", weights_only=False)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


# ---------------------------------------------------------------------------
# Logging: one greppable line per step, JSON lines for plots, a loud stop on NaN/inf


def step_line(step: int, total: int, **metrics) -> str:
    parts = [f"step {step}/{total}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            if key == "lr":
                parts.append(f"{key} {value:.2e}")
            elif key in ("time", "elapsed"):
                parts.append(f"{value:.1f} s")
            elif abs(value) >= 1000:
                parts.append(f"{key} {value:.0f}")
            else:
                parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


class MetricsLog:
    """Append-only JSON lines; only the main process writes."""

    def __init__(self, path: str, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class NonFiniteError(RuntimeError):
    pass


def check_finite(value: float, what: str, step: int, detail: str = ""):
    if not math.isfinite(value):
        raise NonFiniteError(f"non-finite {what} ({value}) at step {step}" + (f", {detail}" if detail else "")
                             + "; stopping. The last good checkpoint is untouched.")

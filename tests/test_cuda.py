"""GPU checks, skipped without CUDA (CI has no GPU; they run when one is lent: BENCHMARKS.md, "GPU").

- bf16 numerics against transformers on the same GPU: logits of bf16 weights, and gradients of fp32 master
  weights under bf16 autocast (the training path), each measured against an fp64 CPU reference. The same
  algorithm in the same dtype must land as close to fp64 as transformers does (within 1.5x of its error);
  fp32 on the GPU (TF32 off) must match to fp32 rounding.
- SDPA's flash kernel on the paths that claim it (unpadded forward and backward, generate's prefill): run
  under sdpa_kernel(FLASH_ATTENTION) alone, which raises if any call there cannot use it.
- generation on the device: greedy == full forwards; CUDA-graph decoding (the default) == eager decoding ==
  the prompt repeated G times, sampled, in fp32; under bf16 autocast every greedy pick of the graph is the
  eager forward's best to within bf16 rounding.
- short bf16 runs of train_sta.py and train_grpo.py on the GPU, alone and as one-process FSDP2 under torchrun
  (nccl, MixedPrecisionPolicy bf16): the code path of the paper's 8-GPU runs, on one GPU.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
import model as M                                                  # noqa: E402
from parity import redraw                                          # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
transformers = pytest.importorskip("transformers")
from test_grpo import _metrics, _run_config, tiny                 # noqa: E402,F401  (tiny: a fixture)
from test_model import TINY, greedy_reference, left_padded, tiny_batch  # noqa: E402
from test_train_sta import args as sta_args, losses as sta_losses  # noqa: E402

CUDA = torch.device("cuda")
# big enough that bf16 rounding accumulates over layers, small enough for an fp64 CPU reference in seconds
QWEN2 = dict(vocab_size=2048, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 on the GPU means fp32 here: TF32 matmuls (10-bit mantissa) would blur the fp32 comparisons."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def rel_err(x, ref, mask=None) -> float:
    """||x - ref|| / ||ref|| in fp64, over the positions where mask is true when given."""
    d, r = x.detach().double().cpu() - ref.detach().double().cpu(), ref.detach().double().cpu()
    if mask is not None:
        d, r = d[mask.bool().cpu()], r[mask.bool().cpu()]
    return (d.norm() / r.norm()).item()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A random Qwen2 (GQA 8/2, untied head) saved by transformers; every parameter redrawn."""
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    redraw(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2)), 1, scale=0.05).save_pretrained(path)
    return str(path)


def hf(path, dtype, device):
    return transformers.Qwen2ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa") \
        .to(device).eval()


# ---------------------------------------------------------------------------
# bf16 numerics against transformers
def test_bf16_logits_as_close_to_fp64_as_transformers(qwen):
    ids, mask = left_padded(QWEN2["vocab_size"], [200, 131, 64], seed=0)           # row 0 unpadded
    pos = M.positions_from_mask(mask)
    with torch.no_grad():
        ref = hf(qwen, torch.float64, "cpu")(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        theirs = hf(qwen, torch.bfloat16, CUDA)(input_ids=ids.cuda(), attention_mask=mask.cuda(),
                                                position_ids=pos.cuda()).logits
        ours16 = M.from_pretrained(qwen, dtype=torch.bfloat16, device="cuda")
        ours = ours16(ids.cuda(), mask.cuda())
        ours_unpadded = ours16(ids[:1].cuda())                                       # is_causal path
        ours32 = M.from_pretrained(qwen, device="cuda")(ids.cuda(), mask.cuda())
    e_ours, e_theirs = rel_err(ours, ref, mask), rel_err(theirs, ref, mask)
    e_unpadded, e32 = rel_err(ours_unpadded, ref[:1]), rel_err(ours32, ref, mask)
    print(f"logits rel. error vs fp64: ours bf16 {e_ours:.2e} (unpadded row {e_unpadded:.2e}), transformers "
          f"bf16 {e_theirs:.2e}, ours fp32 {e32:.2e}")
    assert e32 < 1e-5
    assert e_ours < 2e-2 and e_ours <= 1.5 * e_theirs
    assert e_unpadded < 2e-2 and e_unpadded <= 1.5 * rel_err(theirs[:1], ref[:1])


def test_autocast_gradients_as_close_to_fp64_as_transformers(qwen):
    """The training path: fp32 master weights, bf16 autocast forward, backward, every parameter's gradient."""
    ids = torch.randint(0, QWEN2["vocab_size"], (4, 128), generator=torch.Generator().manual_seed(2))

    def grads(model, logits_of, device, autocast):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = logits_of(model, ids.to(device))
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(device)).backward()
        return {n.removeprefix("model."): p.grad for n, p in model.named_parameters()}
    hf_logits = lambda m, x: m(input_ids=x).logits                                   # noqa: E731
    ref = grads(hf(qwen, torch.float64, "cpu").train(), hf_logits, "cpu", False)
    theirs = grads(hf(qwen, torch.float32, CUDA).train(), hf_logits, CUDA, True)
    ours = grads(M.from_pretrained(qwen, device="cuda").train(), lambda m, x: m(x), CUDA, True)
    assert ours.keys() == ref.keys()
    flat = lambda g: torch.cat([g[k].double().cpu().flatten() for k in sorted(ref)])  # noqa: E731
    e_ours, e_theirs = rel_err(flat(ours), flat(ref)), rel_err(flat(theirs), flat(ref))
    worst = max(rel_err(ours[k], ref[k]) / max(rel_err(theirs[k], ref[k]), 1e-4) for k in ref)
    print(f"gradient rel. error vs fp64: ours {e_ours:.2e}, transformers {e_theirs:.2e}; worst per-parameter "
          f"ratio {worst:.2f}")
    assert e_ours < 5e-2 and e_ours <= 1.5 * e_theirs


# ---------------------------------------------------------------------------
# Flash attention
def test_unpadded_paths_run_on_flash_attention(qwen):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    ids = torch.randint(0, QWEN2["vocab_size"], (2, 512), generator=torch.Generator().manual_seed(3)).cuda()
    bf16 = M.from_pretrained(qwen, dtype=torch.bfloat16, device="cuda")
    master = M.from_pretrained(qwen, device="cuda")                                    # fp32 + autocast

    def run():
        with torch.no_grad():
            logits = bf16(ids)
            tokens, _, _ = M.generate(bf16, ids[:1, :100], max_new_tokens=16, num_samples=4, temperature=1.0,
                                      generator=torch.Generator(CUDA).manual_seed(0))
        master.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(master(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        return logits, tokens, master.layers[0].self_attn.q_proj.weight.grad.clone()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):                    # raises if a call here cannot use flash
        flash = run()
    with sdpa_kernel(SDPBackend.MATH):
        math = run()
    assert flash[1].shape == (4, 16) and flash[1].max() < QWEN2["vocab_size"]
    e_logits, e_grad = rel_err(flash[0], math[0]), rel_err(flash[2], math[2])
    print(f"flash vs math SDPA: logits {e_logits:.2e}, q_proj grad {e_grad:.2e}")
    assert e_logits < 2e-2 and e_grad < 5e-2


# ---------------------------------------------------------------------------
# Generation on the device
def test_generate_on_the_gpu_matches_full_forwards_and_repeats():
    torch.manual_seed(0)
    lalm = redraw(M.build_lalm(TINY), 7, scale=0.3).eval().to(CUDA)
    ids, mask, feats, fmask = (x.cuda() for x in tiny_batch())
    with torch.no_grad():
        ref = greedy_reference(lalm, ids, mask, feats, fmask, 12)
    tokens, lengths, _ = M.generate(lalm, ids, mask, feats, fmask, max_new_tokens=12, temperature=0,
                                    eos_token_id=None)
    assert torch.equal(tokens, ref) and (lengths == 12).all()
    G, kw = 3, dict(max_new_tokens=10, temperature=1.3, top_p=0.9, top_k=20, eos_token_id=[7, 8])
    shared = M.generate(lalm, ids, mask, feats, fmask, num_samples=G,
                        generator=torch.Generator(CUDA).manual_seed(11), **kw)
    rep = lambda x: x.repeat_interleave(G, 0)                     # noqa: E731
    repeated = M.generate(lalm, rep(ids), rep(mask), rep(feats), rep(fmask), num_samples=1,
                          generator=torch.Generator(CUDA).manual_seed(11), **kw)
    eager = M.generate(lalm, ids, mask, feats, fmask, num_samples=G, cuda_graph=False,
                       generator=torch.Generator(CUDA).manual_seed(11), **kw)
    for a, b, c in zip(shared, repeated, eager):                  # CUDA graph (default) == eager, shared == repeated
        assert torch.equal(a, b) and torch.equal(a, c)
    assert len({tuple(r.tolist()) for r in shared[0]}) > 1


def test_cuda_graph_decoding_under_autocast(qwen):
    """The GRPO rollout's setting: fp32 master weights under bf16 autocast, GQA, left-padded prompts, decoded
    greedily through the CUDA graph. Each token it picked must be the eager full forward's best token to within
    bf16 rounding: its logit at most twice the autocast-vs-fp32 logit error below the best (a stale or wrong
    graph input would pick tokens far below)."""
    lm = M.from_pretrained(qwen, device="cuda")
    ids, mask = (x.cuda() for x in left_padded(QWEN2["vocab_size"], [40, 23], seed=4))
    G, N = 3, 24
    with torch.autocast("cuda", dtype=torch.bfloat16):
        tokens, _, _ = M.generate(lm, ids, mask, max_new_tokens=N, num_samples=G, temperature=0)
    full = torch.cat([ids.repeat_interleave(G, 0), tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(G, 0), torch.ones_like(tokens)], 1)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = lm(full, full_mask)[:, ids.shape[1] - 1:-1].float()                  # (B*G, N, V)
        err = (logits - lm(full, full_mask)[:, ids.shape[1] - 1:-1]).abs().max().item()
    gap = (logits.max(-1).values - logits.gather(-1, tokens[..., None])[..., 0]).max().item()
    print(f"graph greedy tokens: largest gap below the eager best {gap:.3g} (autocast logit error {err:.3g})")
    assert gap <= 2 * err + 1e-4


# ---------------------------------------------------------------------------
# Training scripts in bf16 on the GPU: alone, and one-process FSDP2 under torchrun
def torchrun(script, argv, timeout=300):
    path = [ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))              # keeps the caller's PYTHONPATH
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(ROOT, script), *argv]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import data
    out = str(tmp_path_factory.mktemp("corpus"))
    data.build_synth_corpus(out, seed=0, n=5, workers=1)
    return out


def test_train_sta_bf16_alone_and_fsdp(corpus, tmp_path):
    import runlib
    from safetensors import safe_open
    common = ["--device=cuda", "--dtype=bfloat16", "--max_steps=14", "--batch_size=4", "--eval_every=14",
              "--save_every=14"]
    import train_sta
    alone, fsdp = str(tmp_path / "alone"), str(tmp_path / "fsdp")
    train_sta.main(sta_args(corpus, alone, *common))
    printed = torchrun("train_sta.py", sta_args(corpus, fsdp, *common, "--strategy=fsdp"))
    assert "world 1 | device cuda:0" in printed
    _, loss_alone, rows = sta_losses(alone)
    _, loss_fsdp, rows_fsdp = sta_losses(fsdp)
    print("losses alone", [round(x, 4) for x in loss_alone], "\nlosses fsdp ", [round(x, 4) for x in loss_fsdp])
    assert torch.isfinite(torch.tensor(loss_alone + loss_fsdp)).all()
    assert sum(loss_alone[-3:]) / 3 < sum(loss_alone[:3]) / 3 - 0.3
    # autocast (fp32 master, bf16 matmuls) vs FSDP2 param_dtype bf16 (every op in bf16): same start, bf16 apart
    assert loss_fsdp[0] == pytest.approx(loss_alone[0], rel=2e-2)
    assert sum(loss_fsdp[-3:]) / 3 < sum(loss_fsdp[:3]) / 3 - 0.3
    assert "eval_mean_iou" in rows[-1] and "eval_mean_iou" in rows_fsdp[-1]
    for run in (alone, fsdp):                                        # checkpoints: fp32 master weights, loadable
        latest = os.path.join(run, "ckpt", "latest")
        with safe_open(os.path.join(latest, "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
        M.from_pretrained(latest)
        assert runlib.load_meta(latest)["step"] == 14


def test_train_grpo_bf16_alone_and_fsdp(tiny, tmp_path):
    import train_grpo
    common = _run_config(init_from=tiny["policy"], ref_from=tiny["ref"], train_data=tiny["qa"], num_steps=2,
                         device_batch_size=4, grad_accum=2, device="cuda", dtype="bfloat16", save_every=2)
    train_grpo.main(common + [f"--out_dir={tmp_path / 'alone'}"])
    torchrun("train_grpo.py", common + [f"--out_dir={tmp_path / 'fsdp'}", "--strategy=fsdp"])
    for run in ("alone", "fsdp"):
        rows = [r for r in _metrics(tmp_path / run) if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2], run
        for r in rows:                   # the reference is another random model: a KL term and a gradient
            assert all(math.isfinite(r[k]) for k in ("loss", "kl", "grad_norm"))
            assert r["kl"] > 0 and r["grad_norm"] > 0, (run, r)
        with open(tmp_path / run / "ckpt" / "latest" / "meta.json") as f:
            assert json.load(f)["step"] == 2
        M.from_pretrained(str(tmp_path / run / "ckpt" / "latest"))

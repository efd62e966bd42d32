"""Throughput of the CSMN model at paper size (V = 40K, D = 60, 16 steps; pool5, optionally
res5c), on CPU or CUDA. Not a test: it prints figures.

- training examples/s and tokens/s (forward + backward + Adam step), and the achieved FLOP/s
  (3 x the forward FLOPs of the efficient form, ``csmn.core.model.flops_per_token``) as a share of
  this machine's own matmul peak, measured in the same run;
- the speed-up of the parallel teacher-forced pass over a loop over time (step by step with
  the cached memories) and over the literal memory CNN of eq. 9-10 (forward + backward);
- training examples/s of ``CSMN.training_loss`` (h_t, W_o and W_f at real targets only, W_f
  fused with the cross-entropy) against the padded form (logits at all 16 steps, then
  ``sequence_loss``), on posts of 2-16 targets (about 40% padding), both timed in turns in
  the same run (docs/method.md, "Where the time goes", has the profile);
- batched greedy decoding (posts/s) against one post at a time.

    python bench/model.py                 # CPU, about 2-3 minutes on 2 cores
    python bench/model.py --quick         # CPU, a small model (V = 4K), seconds
    python bench/model.py --device cuda   # bf16 autocast, batch 200 (the paper's per GPU)
    python bench/model.py --device cuda --compile   # and torch.compile

``--device cuda`` without a visible GPU says so and runs the CPU settings instead.

Only torch and csmn.model/csmn.core.decoding are imported (no Ray), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import matmul_peak, synchronize, timed  # noqa: E402
from csmn.core.decoding import greedy_decode  # noqa: E402
from csmn.core.model import (  # noqa: E402
    CSMN,
    ModelConfig,
    count_parameters,
    flops_per_token,
    sequence_loss,
)
from csmn.core.tokens import EOS_ID, GO_ID, PAD_ID  # noqa: E402


@dataclass
class BenchSettings:
    batch_size: int
    steps: int
    baseline_steps: int  # for the slow baselines (literal form, loop over time)
    decode_posts: int
    single_posts: int


# --quick: a model small enough for seconds per section; its W_f is a smaller share of the
# work than at paper size, so its real-token speed-up is smaller too.
QUICK_MODEL = {"vocab_size": 4000, "embed_dim": 128, "memory_dim": 256, "cnn_depth": 64}


def settings_for(args: argparse.Namespace) -> BenchSettings:
    if args.device == "cuda":
        defaults = BenchSettings(200, 20, 5, 1000, 20)
    elif args.quick:
        defaults = BenchSettings(16, 8, 1, 16, 2)
    else:
        defaults = BenchSettings(32, 3, 2, 64, 4)
    return BenchSettings(
        batch_size=args.batch_size or defaults.batch_size,
        steps=args.steps or defaults.steps,
        baseline_steps=args.baseline_steps or defaults.baseline_steps,
        decode_posts=args.decode_posts or defaults.decode_posts,
        single_posts=args.single_posts or defaults.single_posts,
    )


def synthetic_batch(config: ModelConfig, batch: int, device: torch.device,
                    seed: int = 0, ragged: bool = False) -> tuple[torch.Tensor, ...]:
    """Full-length posts (16 targets: 15 words and _EOS), users with 50-60 context words.
    ``ragged``: 2-16 targets (uniform), 0-padded to 16 steps, about 45% padding."""
    gen = torch.Generator().manual_seed(seed)
    steps = config.max_length
    shape = (batch, config.image_feature_dim) if config.image_layer == "pool5" else (
        batch, config.image_slots, config.image_feature_dim)
    image = torch.rand(shape, generator=gen)
    context = torch.randint(4, config.vocab_size, (batch, config.context_size), generator=gen)
    known = torch.randint(50, config.context_size + 1, (batch, 1), generator=gen)
    context[torch.arange(config.context_size).unsqueeze(0) >= known] = PAD_ID
    targets = torch.randint(4, config.vocab_size, (batch, steps), generator=gen)
    lengths = (torch.randint(2, steps + 1, (batch,), generator=gen) if ragged
               else torch.full((batch,), steps))
    position = torch.arange(steps).unsqueeze(0)
    targets[position == lengths.unsqueeze(1) - 1] = EOS_ID
    targets[position >= lengths.unsqueeze(1)] = PAD_ID
    inputs = torch.cat([torch.full((batch, 1), GO_ID), targets[:, :-1]], dim=1)
    inputs[position >= lengths.unsqueeze(1)] = PAD_ID  # as the training collate pads them
    return tuple(t.to(device) for t in (image, context, inputs, targets))


def loop_over_time_logits(model: CSMN, image: torch.Tensor, context: torch.Tensor,
                          inputs: torch.Tensor) -> torch.Tensor:
    """The same teacher-forced logits with the memory network run one step at a time, the
    output layer W_f applied once to all steps afterwards (as the authors' while loop)."""
    state = model.start_decoding(image, context)
    hidden = []
    for step in range(inputs.shape[1]):
        step_hidden, _, state = model.decode_step_hidden(state, inputs[:, step])
        hidden.append(step_hidden)
    return model.logits(torch.stack(hidden, dim=1))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                device: torch.device) -> dict[str, tuple[float, float]]:
    """(wall, CPU) seconds per call of each function, each the best of ``repeats``, the
    functions timed in turns: a change in the machine's load then shifts all of them. The
    CPU time (this process, all threads) leaves out the time other processes hold the cores,
    which on a shared machine is most of the wall time's noise."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: (float("inf"), float("inf")) for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            synchronize(device)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def bench_real_tokens(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                      config: ModelConfig, settings: BenchSettings, device: torch.device,
                      autocast: Callable[[], contextlib.AbstractContextManager],
                      ) -> dict[str, float]:
    """Training steps (fwd + bwd + Adam) on ragged posts: ``training_loss`` against the
    logits of all 16 steps and ``sequence_loss``. ``model`` may be ``torch.compile``d."""
    batch = settings.batch_size
    image, context, inputs, targets = synthetic_batch(config, batch, device, seed=2,
                                                      ragged=True)
    tokens = int((targets != PAD_ID).sum())
    padding = 1 - tokens / targets.numel()

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn()
            loss.backward()
            optimizer.step()
        return run

    def padded() -> torch.Tensor:
        return sequence_loss(model(image, context, inputs), targets)

    def real_tokens() -> torch.Tensor:
        return model(image, context, inputs, target_ids=targets)[0]

    timings = interleaved({"padded": step(padded), "real": step(real_tokens)},
                          settings.steps, device)
    seconds = {name: wall for name, (wall, _) in timings.items()}
    wall_ratio = seconds["padded"] / seconds["real"]
    cpu_ratio = timings["padded"][1] / timings["real"][1]
    # On a GPU the host's CPU time says little (kernels run asynchronously): wall time there.
    ratio = cpu_ratio if device.type == "cpu" else wall_ratio
    # Useful work: the per-token FLOPs with per-sequence work spread over the real tokens.
    useful = 3 * flops_per_token(config, tokens / batch).efficient_total * tokens
    print(f"ragged posts: {tokens} real targets of {targets.numel()} ({padding:.0%} padding); "
          f"padded {batch / seconds['padded']:.1f} examples/s "
          f"({seconds['padded'] * 1e3:.0f} ms/step), real tokens "
          f"{batch / seconds['real']:.1f} examples/s ({seconds['real'] * 1e3:.0f} ms/step, "
          f"{useful / seconds['real'] / 1e9:.1f} useful GFLOP/s)")
    if device.type == "cpu":
        print(f"(the ratio below is of CPU time; of wall time it is {wall_ratio:.2f}x)")
    print(f"training, real tokens vs padded: {ratio:.2f}x")
    return {"real_tokens_examples_per_s": batch / seconds["real"],
            "padded_examples_per_s": batch / seconds["padded"],
            "real_tokens_speedup": ratio, "real_tokens_speedup_wall": wall_ratio,
            "ragged_padding": padding,
            "real_tokens_achieved_flops": useful / seconds["real"]}


def bench_layer(layer: str, args: argparse.Namespace, settings: BenchSettings,
                device: torch.device,
                autocast: Callable[[], contextlib.AbstractContextManager],
                ) -> dict[str, float]:
    config = ModelConfig(image_layer=layer, **(QUICK_MODEL if args.quick else {}))
    torch.manual_seed(0)
    model = CSMN(config).to(device)
    model.train()
    # Compiled for the training comparisons only: decoding and the baselines stay eager.
    trained = torch.compile(model) if args.compile else model
    # fused: one pass over the 190M parameters; torch's CPU default (a per-tensor loop) took
    # 3.5 s per step here against 0.1 s fused.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                 fused=True)
    batch = settings.batch_size
    image, context, inputs, targets = synthetic_batch(config, batch, device)
    tokens = int((targets != PAD_ID).sum())
    flops = flops_per_token(config)
    print(f"\n== CSMN-{'P5' if layer == 'pool5' else 'R5C'}: {count_parameters(model):,} "
          f"parameters, batch {batch} x {config.max_length} steps ({tokens} tokens)")
    print(f"forward GFLOP/token: efficient {flops.efficient_total / 1e9:.3f}, "
          f"literal {flops.literal_total / 1e9:.3f} "
          f"({flops.literal_total / flops.efficient_total:.2f}x)")

    def loss_of(logits_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with autocast():
            return sequence_loss(logits_fn(), targets)

    def parallel_logits() -> torch.Tensor:
        return trained(image, context, inputs)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_of(parallel_logits).backward()
        optimizer.step()

    def forward_backward(logits_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            loss_of(logits_fn).backward()
        return run

    step_s = timed(train_step, settings.steps, device)
    fwd_bwd_s = timed(forward_backward(parallel_logits), settings.steps, device)
    training_flops = 3 * flops.efficient_total * tokens  # backward ~ 2x forward
    results = {
        "train_examples_per_s": batch / step_s,
        "train_tokens_per_s": tokens / step_s,
        "train_step_s": step_s,
        "forward_backward_s": fwd_bwd_s,
        "achieved_flops": training_flops / step_s,
        "achieved_flops_forward_backward": training_flops / fwd_bwd_s,
    }
    print(f"training (fwd+bwd+Adam): {results['train_examples_per_s']:.1f} examples/s, "
          f"{results['train_tokens_per_s']:.0f} tokens/s, {step_s * 1e3:.0f} ms/step "
          f"(fwd+bwd {fwd_bwd_s * 1e3:.0f} ms, Adam on every parameter the rest); "
          f"{results['achieved_flops'] / 1e9:.1f} GFLOP/s")

    if not args.skip_baselines:
        results.update(bench_baselines(model, image, context, inputs, fwd_bwd_s, settings,
                                       device, forward_backward))
    results.update(bench_real_tokens(trained, optimizer, config, settings, device, autocast))
    if not args.skip_decoding:
        results.update(bench_decoding(model, config, settings, device, autocast))
    return results


def bench_baselines(model: CSMN, image: torch.Tensor, context: torch.Tensor,
                    inputs: torch.Tensor, fwd_bwd_s: float, settings: BenchSettings,
                    device: torch.device,
                    forward_backward: Callable[[Callable[[], torch.Tensor]], Callable[[], None]],
                    ) -> dict[str, float]:
    """fwd + bwd of the loop over time and of the literal eq. 9-10, against the parallel."""
    loop_s = timed(forward_backward(lambda: loop_over_time_logits(model, image, context,
                                                                   inputs)),
                   settings.baseline_steps, device)
    literal_s = timed(forward_backward(lambda: model(image, context, inputs, literal=True)),
                      settings.baseline_steps, device)
    results = {
        "loop_over_time_s": loop_s,
        "literal_s": literal_s,
        "speedup_over_loop": loop_s / fwd_bwd_s,
        "speedup_over_literal": literal_s / fwd_bwd_s,
    }
    print(f"fwd+bwd: parallel {fwd_bwd_s * 1e3:.0f} ms, loop over time {loop_s * 1e3:.0f} ms "
          f"({results['speedup_over_loop']:.2f}x), literal eq. 9-10 {literal_s * 1e3:.0f} ms "
          f"({results['speedup_over_literal']:.2f}x)")
    return results


def bench_decoding(model: CSMN, config: ModelConfig, settings: BenchSettings,
                   device: torch.device,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    model.eval()
    posts = settings.decode_posts
    image, context, _, _ = synthetic_batch(config, posts, device, seed=1)
    # _EOS banned: every post runs the full 16 steps, so both sides do the same work.
    banned = (PAD_ID, GO_ID, EOS_ID)

    def batched() -> None:
        with autocast():
            greedy_decode(model, image, context, banned_ids=banned)

    def one_at_a_time() -> None:
        with autocast():
            for i in range(settings.single_posts):
                greedy_decode(model, image[i:i + 1], context[i:i + 1], banned_ids=banned)

    batched_s = timed(batched, 1, device)
    single_s = timed(one_at_a_time, 1, device)
    batched_rate = posts / batched_s
    single_rate = settings.single_posts / single_s
    print(f"greedy decoding, 16 tokens: {batched_rate:.1f} posts/s batched ({posts} posts), "
          f"{single_rate:.2f} posts/s one at a time ({batched_rate / single_rate:.1f}x)")
    model.train()
    return {"decode_posts_per_s_batched": batched_rate,
            "decode_posts_per_s_single": single_rate,
            "decode_speedup": batched_rate / single_rate}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "tf32", "bf16"), default=None,
                        help="fp32 (CPU default), tf32 matmuls, or bf16 autocast "
                             "(CUDA default)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="timed steps of the slow baselines")
    parser.add_argument("--decode-posts", type=int, default=None)
    parser.add_argument("--single-posts", type=int, default=None,
                        help="posts decoded one at a time")
    parser.add_argument("--res5c", action="store_true", help="also benchmark CSMN-R5C")
    parser.add_argument("--skip-decoding", action="store_true")
    parser.add_argument("--skip-baselines", action="store_true",
                        help="skip the loop over time and the literal eq. 9-10 (slow)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--quick", action="store_true",
                        help="a small model (V = 4K) and batch: seconds on a CPU")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model for the training figures")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible to torch; running on the CPU instead, "
              "with the CPU settings (fp32 unless --dtype says otherwise)", file=sys.stderr)
        args.device = "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    settings = settings_for(args)

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    def autocast() -> contextlib.AbstractContextManager:
        if dtype_name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    peak_fp32 = matmul_peak(device, torch.float32)
    if dtype_name == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    peak_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    # The share is of the peak in the dtype the model computes in (bf16, TF32 or fp32).
    peak = matmul_peak(device, peak_dtype) if dtype_name != "fp32" else peak_fp32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__} on {name}; compute {dtype_name}")
    print(f"matmul peak: fp32 {peak_fp32 / 1e9:.1f} GFLOP/s"
          + (f", {dtype_name} {peak / 1e9:.1f} GFLOP/s" if dtype_name != "fp32" else ""))

    results: dict[str, object] = {
        "device": name, "torch": torch.__version__, "dtype": dtype_name,
        "matmul_peak_fp32": peak_fp32, "matmul_peak": peak,
        "settings": settings.__dict__,
    }
    layers = ("pool5", "res5c") if args.res5c else ("pool5",)
    for layer in layers:
        results[layer] = bench_layer(layer, args, settings, device, autocast)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous model and its Adam state are gone
    # Measured again at the end: on a shared machine the measured peak moves with the load,
    # and the load only ever lowers it, so the higher of the two is the machine's.
    peak_end = matmul_peak(device, peak_dtype)
    best_peak = max(peak, peak_end)
    results.update(matmul_peak_end=peak_end, matmul_peak_best=best_peak)
    print(f"\nmatmul peak ({dtype_name}): {peak / 1e9:.1f} GFLOP/s at the start, "
          f"{peak_end / 1e9:.1f} at the end; shares below are of {best_peak / 1e9:.1f}")
    for layer in layers:
        layer_results = results[layer]
        assert isinstance(layer_results, dict)
        share = layer_results["achieved_flops"] / best_peak
        share_fwd_bwd = layer_results["achieved_flops_forward_backward"] / best_peak
        layer_results.update(peak_fraction=share, peak_fraction_forward_backward=share_fwd_bwd)
        real_share = layer_results["real_tokens_achieved_flops"] / best_peak
        layer_results.update(real_tokens_peak_fraction=real_share)
        print(f"{layer}: training step at {share:.0%} of the matmul peak "
              f"({share_fwd_bwd:.0%} counting fwd+bwd only, without Adam); real-token "
              f"training step at {real_share:.0%}")
    if device.type == "cpu":
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(other processes share these cores: figures vary with them)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()

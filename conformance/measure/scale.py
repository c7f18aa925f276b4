"""The scale benchmark (``nox -s scale``, not CI): the suite run as a user runs it on a checkpoint
of real size, measuring what a vendor plans a runner with: wall time, the time split, peak memory
and the number of loads.

A Llama-style decoder of 0.52 B parameters (SCALE_CONFIG) is built from its config with seeded
random init and saved once, as safetensors, to a work directory. Then the suite runs on it in one
child process, as a user would: ``pytest --pyargs conformance --model DIR --variant 'sdpa*'
--variant 'bnb_*'`` plus SELECTION, without xdist, so that the child's peak RSS
(``getrusage(RUSAGE_CHILDREN)``) is the run's. The figures go to OUT/scale.json and the terminal.

    python -m conformance.measure.scale --workdir /tmp/scale --out reports/scale [-- PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# hidden 1024, 32 layers, 16 heads of 64 with 8 KV heads, MLP 3584, vocabulary 32,000, untied
# head: 518.6 M parameters, 2.07 GB in float32
SCALE_CONFIG: dict[str, Any] = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
    "intermediate_size": 3584, "num_hidden_layers": 32, "num_attention_heads": 16,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 2048,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "initializer_range": 0.02,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
}
# On 2 CPU cores one float32 forward of 4 x 64 tokens takes 3.6 s and float64 6.2 s (one thread),
# so the benchmark runs the logits check and the quantized footprint in float32 with two examples
# a check (the `scale` Hypothesis profile): the whole default selection would take hours here. On a
# GPU runner drop --dtype and the -k to run every check.
SELECTION = ("--dtype", "fp32", "-k", "test_logits or test_quantized_footprint",
             "--hypothesis-profile", "scale", "--threads", "2")
VARIANTS = ("--variant", "sdpa*", "--variant", "bnb_*")


def build(workdir: Path) -> Path:
    """The scale checkpoint in `workdir` (built once: a second call reuses it)."""
    out = workdir / "scale-llama-0.5b"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from conformance.zoo import INIT_SEED, seeded_init

    config = AutoConfig.for_model(**SCALE_CONFIG)
    torch.manual_seed(INIT_SEED)
    model = AutoModelForCausalLM.from_config(config)
    seeded_init(model, SCALE_CONFIG["initializer_range"])
    model.save_pretrained(out, safe_serialization=True)
    return out


# Peak RSS (getrusage) counts the file pages of every open safetensors mapping, which the page
# cache's state decides: the same code measured 14.6 and 20.2 GiB on two days. The memory the
# suite itself holds is the child's anonymous resident memory (RssAnon), sampled this often.
SAMPLE_S = 0.05


def anonymous_bytes(pid: int) -> int:
    """The process's anonymous resident memory now (Linux /proc; 0 where it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def run(checkpoint: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    """The suite on `checkpoint` in one child process; its wall time, peak RSS (and peak
    anonymous memory) and report."""
    from conformance.sizing import parameter_count

    command = [sys.executable, "-m", "pytest", "--pyargs", "conformance", "-q", "-p", "no:randomly",
               "-p", "no:xdist", "-p", "no:cacheprovider", "--model", str(checkpoint), *VARIANTS,
               *(extra or SELECTION), "--conformance-report", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env)
    peak_anonymous = 0
    while child.poll() is None:
        peak_anonymous = max(peak_anonymous, anonymous_bytes(child.pid))
        time.sleep(SAMPLE_S)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: kilobytes
    body = json.loads((out / "report.json").read_text())
    parameters = parameter_count(checkpoint) or 0
    summary = body["summary"]
    return {
        "command": command[1:], "exit_code": child.returncode, "wall_s": round(wall, 1),
        "parameters": parameters, "float32_bytes": 4 * parameters, "peak_rss_bytes": peak,
        "peak_rss_over_float32": round(peak / (4 * parameters), 2) if parameters else None,
        "peak_anonymous_bytes": peak_anonymous,
        "peak_anonymous_over_float32": round(peak_anonymous / (4 * parameters), 2) if parameters else None,
        "time_split_s": summary.get("time_split_s"), "counts": summary.get("counts"),
        "golden": summary.get("golden"), "outcomes": summary.get("outcomes"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="where the checkpoint is built")
    parser.add_argument("--out", type=Path, required=True, help="report directory")
    parser.add_argument("pytest_args", nargs="*", help="replace SELECTION (after --)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = build(args.workdir)
    figures = run(checkpoint, args.out, args.pytest_args)
    (args.out / "scale.json").write_text(json.dumps(figures, indent=2) + "\n")
    gib = 2**30
    print(f"scale: {figures['parameters'] / 1e6:.1f} M parameters ({figures['float32_bytes'] / gib:.2f} "
          f"GiB in float32); wall {figures['wall_s']} s; peak RSS {figures['peak_rss_bytes'] / gib:.2f} GiB "
          f"= {figures['peak_rss_over_float32']} x float32 (anonymous "
          f"{figures['peak_anonymous_bytes'] / gib:.2f} GiB = {figures['peak_anonymous_over_float32']} x); "
          f"counts {figures['counts']}; split "
          f"{figures['time_split_s']}; golden {figures['golden']}; outcomes {figures['outcomes']}")
    return figures["exit_code"]


if __name__ == "__main__":
    raise SystemExit(main())

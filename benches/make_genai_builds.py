#!/usr/bin/env python3
"""onnxruntime-genai builds of the training benchmark's model (see benches/train_bench.sh).

    python3 benches/make_genai_builds.py OUT_DIR [PRECISION ...]     (default: int4 fp32)

Reads OUT_DIR/hf (make_train_bench_model.py's checkpoint) and writes OUT_DIR/genai_<p>/
(model.onnx, model.onnx.data, genai_config.json) with onnxruntime-genai's builder,
`-p <p> -e cpu`: GroupQueryAttention, SkipSimplifiedLayerNormalization and, for int4,
MatMulNBits (4 bits, blocks of 32, symmetric), as deployed. Skips a build that exists.
Needs torch, transformers and onnxruntime-genai (fixtures/make.py's pins).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(out: Path, precision: str) -> None:
    dest = out / f"genai_{precision}"
    if (dest / "model.onnx").exists():
        return
    with tempfile.TemporaryDirectory(prefix="lora_graft_genai_bench_") as tmp:
        tmp = Path(tmp)
        hf = tmp / "hf"
        shutil.copytree(out / "hf", hf)
        # The benchmark's checkpoint is saved from a LlamaForCausalLM subclass; the builder
        # dispatches on the architecture's name.
        cfg = json.loads((hf / "config.json").read_text())
        cfg["architectures"] = ["LlamaForCausalLM"]
        (hf / "config.json").write_text(json.dumps(cfg, indent=2))
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(
            tokenizer_file=str(ROOT / "fixtures/tokenizer.json"),
            bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        ).save_pretrained(str(hf))
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
               "-o", str(tmp / "out"), "-p", precision, "-e", "cpu", "-c", str(tmp / "cache")]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
            raise SystemExit(f"onnxruntime-genai builder ({precision}) failed: exit {r.returncode}")
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("model.onnx", "model.onnx.data", "genai_config.json"):
            shutil.copy2(tmp / "out" / f, dest / f)
    print(f"wrote {dest}")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    for precision in sys.argv[2:] or ["int4", "fp32"]:
        build(out, precision)


if __name__ == "__main__":
    main()

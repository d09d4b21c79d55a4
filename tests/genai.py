"""End-to-end check that onnxruntime-genai serves lora-graft's adapters (tests/genai.rs).

    python tests/genai.py BASE_DIR SERVED_DIR BAKED_DIR ADAPTER_PATH

Each *_DIR is a folder onnxruntime-genai loads as one model: `genai_config.json` and the
model file it names (`decoder.filename`, here `model.onnx`) with its external data beside it.
No tokenizer file is needed: the prompt is given as token ids (`Generator.append_tokens`);
`og.Tokenizer` alone would want `tokenizer.json` and a `tokenizer_config.json` (`{}` does).

With greedy search (do_sample False, max_length 24) from the same prompt ids it generates
  (a)  from BASE_DIR, the original model;
  (b)  from SERVED_DIR (grafted with --adapter-inputs) with no adapter active;
  (c)  from SERVED_DIR with ADAPTER_PATH (an .onnx_adapter) active, through
       og.Adapters(model).load(ADAPTER_PATH, "a") and generator.set_active_adapter(...)
       (before append_tokens: activated later, it only applies from the next token on);
  (b') from SERVED_DIR with no adapter again, after (c) (the adapter does not stick);
  (d)  from BAKED_DIR, the model with the same adapter baked in;
and checks (b) == (a), (b') == (a), (c) == (d), (c) != (a). Prints the token lists and,
last, `genai: ok`. Exits 1 with a `genai: FAILED: ...` line on any failure, and 3 with one
line if onnxruntime_genai cannot be imported.

Python packages (one venv; onnxruntime-genai 0.18.0 requires onnxruntime>=1.31.0 and loads
the onnxruntime package's own libonnxruntime.so, so pip keeps the 1.32.0 pin):
    onnx==1.23.2 onnxruntime==1.32.0 numpy==2.4.6 safetensors==0.8.0 onnxruntime-genai==0.18.0

The folders, by hand (from the repository root; LG is the lora-graft binary):

    LG=target/release/lora-graft
    FX=fixtures/genai_int4
    W=$(mktemp -d)
    mkdir -p "$W/served" "$W/baked"
    # 1. the Multi-LoRA model; also writes the adapter file $W/served/model.safetensors
    "$LG" "$FX/model.onnx" --variant lora --adapter-inputs -r 4 -o "$W/served/model.onnx"
    # 2. an adapter that visibly changes greedy tokens: every lora_B seeded normal * 0.5,
    #    the file's metadata (cfg, lora_graft) kept
    python - "$W/served/model.safetensors" "$W/perturbed.safetensors" <<'EOF'
    import sys, numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file
    with safe_open(sys.argv[1], "numpy") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    rng = np.random.default_rng(0)
    for k in sorted(t):
        if k.endswith(".lora_B"):
            t[k] = (rng.standard_normal(t[k].shape) * 0.5).astype(t[k].dtype)
    save_file(t, sys.argv[2], metadata=meta)
    EOF
    # 3. the .onnx_adapter for the served model, and the same adapter baked in
    "$LG" export-adapter "$W/perturbed.safetensors" --model "$W/served/model.onnx" -o "$W/a.onnx_adapter"
    "$LG" "$FX/model.onnx" --adapter-in "$W/perturbed.safetensors" -o "$W/baked/model.onnx"
    # 4. genai's config beside each model (the fixture's, unchanged: the adapter inputs
    #    need no entry in it)
    cp "$FX/genai_config.json" "$W/served/"
    cp "$FX/genai_config.json" "$W/baked/"
    python tests/genai.py "$FX" "$W/served" "$W/baked" "$W/a.onnx_adapter"

(The fixture folder serves as BASE_DIR as it is. SERVED_DIR then holds genai_config.json,
model.onnx, model.onnx.data, model.safetensors; BAKED_DIR genai_config.json, model.onnx,
model.onnx.data, model.onnx.1.data.)
"""
import sys

try:
    import onnxruntime_genai as og
except Exception as e:  # ImportError, or OSError when libonnxruntime.so fails to load
    print(f"genai: cannot import onnxruntime_genai ({type(e).__name__}: {e})".replace("\n", " "))
    sys.exit(3)

import json
from pathlib import Path

PROMPT = [0, 17, 42, 99, 123]
MAX_LENGTH = 24


class Failed(Exception):
    pass


def check_folder(folder):
    folder = Path(folder)
    config = folder / "genai_config.json"
    if not config.is_file():
        raise Failed(f"{folder}: no genai_config.json (onnxruntime-genai loads a model from it)")
    name = json.loads(config.read_text())["model"]["decoder"]["filename"]
    if not (folder / name).is_file():
        raise Failed(f"{folder}: no {name} (the model genai_config.json names)")
    return str(folder)


def load(folder):
    try:
        return og.Model(check_folder(folder))
    except Failed:
        raise
    except Exception as e:
        raise Failed(f"og.Model({folder}): {e}") from e


def generate(model, what, adapters=None):
    try:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=MAX_LENGTH)
        generator = og.Generator(model, params)
        if adapters is not None:
            # Before the prompt: set later, it would apply from the next token only.
            generator.set_active_adapter(adapters, "a")
        generator.append_tokens(PROMPT)
        while not generator.is_done():
            generator.generate_next_token()
        tokens = [int(t) for t in generator.get_sequence(0)]
    except Exception as e:
        raise Failed(f"{what}: generation failed: {e}") from e
    print(f"{what:<28} {tokens}")
    return tokens


def run(base_dir, served_dir, baked_dir, adapter_path):
    if not Path(adapter_path).is_file():
        raise Failed(f"{adapter_path}: no such adapter file")
    base = generate(load(base_dir), "(a) base")
    served = load(served_dir)
    plain = generate(served, "(b) served, no adapter")
    if plain != base:
        raise Failed("(b) != (a): the served model with no adapter active does not generate the base model's tokens")
    adapters = og.Adapters(served)
    try:
        adapters.load(str(adapter_path), "a")
    except Exception as e:
        raise Failed(f"og.Adapters.load({adapter_path}): {e}") from e
    active = generate(served, "(c) served, adapter active", adapters)
    if active == base:
        raise Failed("(c) == (a): the adapter does not change the generated tokens, the check is vacuous")
    plain_again = generate(served, "(b') served, no adapter")
    if plain_again != base:
        raise Failed("(b') != (a): with no adapter active after the adapter was, the served model does not generate the base model's tokens")
    baked = generate(load(baked_dir), "(d) baked")
    if active != baked:
        raise Failed("(c) != (d): the served model with the adapter active does not generate the baked model's tokens")


def main(argv):
    if len(argv) != 5:
        print("usage: genai.py BASE_DIR SERVED_DIR BAKED_DIR ADAPTER_PATH", file=sys.stderr)
        return 2
    try:
        run(*argv[1:])
    except Failed as e:
        print("genai: FAILED: " + " ".join(str(e).split()))
        return 1
    print(f"onnxruntime-genai {og.__version__}")
    print("genai: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

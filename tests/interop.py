"""ONNX Runtime interop for grafted models (run by tests/interop.rs; needs onnx, onnxruntime).

For every entry of DIR/manifest.json: the grafted model passes onnx.checker (full check
where the base model passes it), keeps the base model's opsets, metadata and input and
output names, and ONNX Runtime's outputs equal the expected ones (tract's, or the base
model's at init) within the entry's tolerance; a trained model ("lm_data") has a lower
causal-LM loss on its training data than the base. Prints 'N passed, M failed'.
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file


def check_onnx(model_path, full_check):
    """onnx.checker on `model_path`: the full check, or, for an onnxruntime-genai model
    (whose builder puts SimplifiedLayerNormalization in the default domain, which the
    checker does not know and ONNX Runtime does), the plain check of a copy with that op
    moved to com.microsoft, as fixtures/make.py does for the base model."""
    if full_check:
        onnx.checker.check_model(str(model_path), full_check=True)
        return
    copy = onnx.load(str(model_path))
    for node in copy.graph.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain == "":
            node.domain = "com.microsoft"
    onnx.checker.check_model(copy)


def check(entry, root):
    model_path = root / entry["model"]
    base = onnx.load(entry["base"], load_external_data=False)
    grafted = onnx.load(str(model_path), load_external_data=False)
    check_onnx(model_path, entry["full_check"])
    assert grafted.opset_import == base.opset_import, "opsets changed"
    assert grafted.metadata_props == base.metadata_props, "metadata changed"
    if not entry.get("training"):
        assert [i.name for i in grafted.graph.input] == [i.name for i in base.graph.input], "inputs renamed"
        assert [o.name for o in grafted.graph.output] == [o.name for o in base.graph.output], "outputs renamed"
    else:
        domains = {n.domain for n in grafted.graph.node} - {"", "ai.onnx"}
        base_domains = {n.domain for n in base.graph.node} - {"", "ai.onnx"}
        assert domains <= base_domains, f"gradient code uses non-default domains {domains - base_domains}"
    if "lm_data" in entry:
        check_lower_loss(entry, model_path)
    if "io" not in entry:
        return
    io = load_file(str(root / entry["io"]))
    inputs = {k[len("input."):]: v for k, v in io.items() if k.startswith("input.")}
    options = ort.SessionOptions()
    # llama_int8: ONNX Runtime fuses DequantizeLinear + MatMul into its 8-bit kernel,
    # which by default also rounds the activations to int8; accuracy level 0 keeps them.
    for key, value in entry.get("ort_config", {}).items():
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, inputs)))
    for key, want in io.items():
        if not key.startswith("output."):
            continue
        name = key[len("output."):]
        diff = float(np.max(np.abs(got[name].astype(np.float64) - want.astype(np.float64))))
        scale = max(1.0, float(np.max(np.abs(want))))
        tol = entry["tol"] * (scale if entry.get("relative") else 1.0)
        assert diff <= tol, f"output {name} differs from the expected by {diff:.3g} (tolerance {tol:.3g})"


def lm_loss(model_path, rows, head_size=None):
    """Mean next-token cross-entropy of a causal LM over rows [R, S] of token ids (an
    onnxruntime-genai model gets an all-ones attention_mask and an empty KV cache whose
    head size its genai_config.json gives)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    total = count = 0.0
    for ids, labels in rows:
        feeds = {"input_ids": ids[None, :]}
        for i in session.get_inputs():
            if i.name == "attention_mask":
                feeds[i.name] = np.ones((1, len(ids)), dtype=np.int64)
            elif i.name.startswith("past"):
                shape = [d if isinstance(d, int) else 1 if "batch" in d else 0 if "past" in d else head_size
                         for d in i.shape]
                feeds[i.name] = np.zeros(shape, dtype=np.float16 if "float16" in i.type else np.float32)
        logits = session.run(["logits"] if "logits" in [o.name for o in session.get_outputs()] else None,
                             feeds)[0][0].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        target = labels[1:]
        keep = target != -100
        total -= float(logp[:-1][keep, target[keep]].sum())
        count += float(keep.sum())
    return total / count


def check_lower_loss(entry, model_path):
    """A trained model's loss on its training text, in ONNX Runtime, is below the base's."""
    ids = [t for line in Path(entry["lm_data"]).read_text().splitlines() if line.strip()
           for t in json.loads(line)["input_ids"]]
    seq = entry["seq"]
    rows = []
    for start in range(0, len(ids), seq):
        chunk = ids[start:start + seq]
        labels = chunk + [-100] * (seq - len(chunk))
        rows.append((np.array(chunk + [0] * (seq - len(chunk)), dtype=np.int64), np.array(labels, dtype=np.int64)))
    config = Path(entry["base"]).parent / "genai_config.json"
    head = json.loads(config.read_text())["model"]["decoder"]["head_size"] if config.exists() else None
    trained, base = lm_loss(model_path, rows, head), lm_loss(entry["base"], rows, head)
    print(f"     {entry['model']}: loss {trained:.4f} (base {base:.4f})")
    assert trained < base, f"trained loss {trained:.4f} is not below the base model's {base:.4f}"


def main():
    root = Path(sys.argv[1])
    manifest = json.loads((root / "manifest.json").read_text())
    passed = failed = 0
    for entry in manifest:
        try:
            check(entry, root)
            passed += 1
            print(f"ok   {entry['model']}")
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            failed += 1
            print(f"FAIL {entry['model']}: {type(e).__name__}: {e}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()

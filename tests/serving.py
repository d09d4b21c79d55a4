"""ONNX Runtime serving checks for adapter-input models (run by tests/serving.rs).

`serving.py check DIR`: for every entry of DIR/manifest.json,
  - the adapter-input model passes onnx.checker (full check where the base passes it);
  - with no adapter active, ONNX Runtime gives the base model's outputs (within
    `tol_base`, relative to the largest output);
  - with the entry's .onnx_adapter active (ort.LoraAdapter, RunOptions.add_active_adapter),
    it gives the outputs of the model with the same adapter baked in (within `tol`);
  - ort.AdapterFormat.read_adapter reads the .onnx_adapter back to the tensors lora-graft
    meant to write (the entry's `expected` safetensors).
Prints 'N passed, M failed'.

`serving.py write VALUES OUT`: writes the tensors of the safetensors file VALUES as an
.onnx_adapter with ONNX Runtime's own writer (adapter version 7, model version 3).
"""
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

from interop import check_onnx  # tests/interop.py, beside this script


def session(path):
    opts = ort.SessionOptions()
    # An initializer that is also a graph input is ONNX Runtime's adapter convention; its
    # warning about constant folding would fill the log.
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def rel_diff(got, want):
    got, want = got.astype(np.float64), want.astype(np.float64)
    return float(np.max(np.abs(got - want))) / max(1e-30, float(np.max(np.abs(want))))


def check(entry, root):
    served = root / entry["served"]
    check_onnx(served, entry["full_check"])
    inputs = {k[len("input."):]: v for k, v in load_file(str(root / entry["io"])).items()
              if k.startswith("input.")}
    base = session(entry["base"]).run(None, inputs)
    model = session(served)
    plain = model.run(None, inputs)
    for want, got in zip(base, plain):
        d = rel_diff(got, want)
        assert d <= entry["tol_base"], f"no adapter: {d:.3g} from the base (tolerance {entry['tol_base']})"
    adapter = ort.LoraAdapter()
    adapter.Load(str(root / entry["adapter"]))
    run_options = ort.RunOptions()
    run_options.add_active_adapter(adapter)
    active = model.run(None, inputs, run_options)
    baked = session(root / entry["baked"]).run(None, inputs)
    moved = 0.0
    for want, got, b in zip(baked, active, base):
        d = rel_diff(got, want)
        assert d <= entry["tol"], f"adapter active: {d:.3g} from the baked model (tolerance {entry['tol']})"
        moved = max(moved, rel_diff(b, want))
    floor = max(2 * entry["tol"], 1e-3)
    assert moved > floor, f"the adapter moves the outputs by {moved:.3g} only (< {floor:.3g}): the check is vacuous"
    params = ort.AdapterFormat.read_adapter(str(root / entry["adapter"])).get_parameters()
    expected = load_file(str(root / entry["expected"]))
    assert sorted(params) == sorted(expected), "parameter names differ"
    for name, want in expected.items():
        got = params[name].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, f"{name}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
        assert np.array_equal(got, want), f"{name}: values differ"


def check_slots(entry, root):
    """Row b of a batch through the slotted model equals row b of the model with slot
    adapter_index[b]'s adapter baked in (the base model for -1)."""
    feeds = {k[len("input."):]: v for k, v in load_file(str(root / entry["io"])).items()
             if k.startswith("input.")}
    stack = load_file(str(root / entry["stack"]))
    index = np.array(entry["index"], dtype=np.int64)
    got = session(root / entry["served"]).run(None, {**feeds, **stack, "adapter_index": index})
    runs = {-1: session(entry["base"]).run(None, feeds)}
    for slot, baked in enumerate(entry["baked"]):
        runs[slot] = session(root / baked).run(None, feeds)
    for row, slot in enumerate(entry["index"]):
        for k, (g, w) in enumerate(zip(got, runs[slot])):
            d = rel_diff(g[row], w[row])
            assert d <= entry["tol"], f"row {row} (slot {slot}), output {k}: {d:.3g} (tolerance {entry['tol']})"
        if slot >= 0:
            moved = max(rel_diff(b[row], w[row]) for b, w in zip(runs[-1], runs[slot]))
            assert moved > 1e-3, f"slot {slot}'s adapter moves row {row} by {moved:.3g} only: vacuous"


def write(values, out):
    tensors = load_file(values)
    f = ort.AdapterFormat()
    f.set_adapter_version(7)
    f.set_model_version(3)
    f.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in tensors.items()})
    f.export_adapter(out)


def main():
    if sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
        return
    root = Path(sys.argv[2])
    manifest = json.loads((root / "manifest.json").read_text())
    passed = failed = 0
    for entry in manifest:
        try:
            (check_slots if "index" in entry else check)(entry, root)
            passed += 1
            print(f"ok   {entry['served']}")
        except Exception as e:  # noqa: BLE001 - report every failure, then fail
            failed += 1
            print(f"FAIL {entry['served']}: {type(e).__name__}: {e}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed or not passed else 0)


if __name__ == "__main__":
    main()

"""examples/train_synthetic.py: trains a converted tiny ViT on CPU, prints img/s, writes a trace."""
import importlib.util
import json
import pathlib
import re

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_synthetic.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_synthetic", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_synthetic_runs_learns_and_profiles(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    rates = _load().main(["vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8",
                          "--depth", "2", "--embed-dim", "48", "--num-heads", "3",
                          "--num-classes", "10", "--batch", "8", "--steps", "6", "--lr", "3e-3",
                          "--device", "cpu", "--profile", str(trace)])
    out = capsys.readouterr().out
    assert "swapped blocks.0" in out and "swapped patch_embed" in out
    steps = re.findall(r"step (\d+)/6  loss ([\d.]+)  ([\d.]+) img/s", out)
    assert [int(s) for s, _, _ in steps] == list(range(1, 7))
    assert len(rates) == 6 and all(r > 0 for r in rates)
    losses = [float(loss) for _, loss, _ in steps]
    assert losses[-1] < losses[0], f"the loss did not go down on a fixed batch: {losses}"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any("aten::" in e.get("name", "") for e in events), "the trace has no op events"

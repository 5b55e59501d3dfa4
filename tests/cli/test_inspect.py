"""``lors-fx inspect``: every view, the JSON keys and values, DOT, --meta on a 7B-sized config,
exit codes. The real runs are expensive on CPU (a compile and a training step each), so one
module-scoped run shows every view at once and the tests read different parts of it."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
from torch import nn

from lors_fx import cli

from lors_fx.cli import inspect as cli_inspect
from lors_fx.testing.tiny_models import build_tiny

SEQ = "12"  # batch 2 x 12 = 24 tokens: no activation shape collides with a weight shape
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 4096}
JSON_KEYS = {"schema", "model", "pruning", "config", "step", "theoretical", "sites", "passes",
             "saved", "graphs", "graph_breaks", "recompiles", "compiled", "fallback", "code",
             "notes", "seconds", "quantization"}


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def _target_linears(model):
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("lm_head")]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """tiny-llama, every view, --graph backward, --json and --dot in one run."""
    folder = tmp_path_factory.mktemp("inspect")
    argv = ["inspect", "tiny-llama", "--seq", SEQ, "--r", "8", "--no-progress", "--show",
            "summary,sites,passes,saved,graph,diff", "--graph", "backward",
            "--json", str(folder / "out.json"), "--dot", str(folder / "region.dot")]
    code, out, err = _main(argv)
    assert code == 0, err
    data = json.loads((folder / "out.json").read_text())
    return {"out": out, "data": data, "dot": (folder / "region.dot").read_text()}


def _section(out, start, end=None):
    begin = out.index(start)
    finish = out.index(end, begin + 1) if end else len(out)
    return out[begin:finish]


def test_summary_names_sites_passes_breaks_and_saved_bytes(full_run):
    out, data = full_run["out"], full_run["data"]
    expected = len(_target_linears(build_tiny("tiny-llama")))
    assert expected == 14
    assert f"{expected} found, {expected} rewritten to lors::sparse_lora_linear" in out
    assert "pruned on the fly by magnitude to 50% unstructured" in out
    assert "graph breaks: 0" in out
    before, after = data["saved"]["before_bytes"], data["saved"]["after_bytes"]
    assert f"{before:,} B" in out and f"{after:,} B" in out
    assert f"{after / before:.3f}x" in out
    assert "naive masked form (x + W' + bool mask)" in out


def test_sites_view_lists_every_target_linear(full_run):
    sites = _section(full_run["out"], "sites: 14", "  graph  pass")
    for fqn in _target_linears(build_tiny("tiny-llama")):
        assert re.search(rf"^{re.escape(fqn)}\s+\d+x\d+\s+0\.5\s+unstructured\s+8\s+lors\s+yes",
                         sites, re.M), fqn


def test_passes_view_counts_matches_and_hides_the_capture(full_run):
    out = full_run["out"]
    assert re.search(r"^\s+0\s+annotate_sparse_linears\s+14\s+0\s+0\s", out, re.M)
    assert re.search(r"^\s+0\s+rewrite_masked_adapters\s+14\s+14\s+\d+\s", out, re.M)
    assert "capture_before" not in out
    assert [p["name"] for p in full_run["data"]["passes"]] == [
        "annotate_sparse_linears", "convert_peft_lora", "rewrite_quantized_adapters", "rewrite_masked_adapters"]


def test_saved_view_and_json_show_w_eff_only_before(full_run):
    out, data = full_run["out"], full_run["data"]
    assert "saved for backward, before (naive masked form)" in out
    assert "saved for backward, after (LoRS)" in out
    weight_shapes = set()
    for site in data["sites"]:
        weight_shapes |= {tuple(site["shape"]), tuple(reversed(site["shape"]))}

    def dense_weights(rows):  # W' (or its transpose) or the bool mask saved as an activation
        return [r for r in rows if r["kind"] == "activation" and tuple(r["shape"]) in weight_shapes]

    assert dense_weights(data["saved"]["before"])
    assert any(r["dtype"] == "bool" for r in dense_weights(data["saved"]["before"]))
    assert dense_weights(data["saved"]["after"]) == []
    assert data["saved"]["after_bytes"] < data["saved"]["before_bytes"]


def test_json_keys_and_values(full_run):
    data = full_run["data"]
    assert set(data) == JSON_KEYS
    for key in JSON_KEYS | {"naive_theoretical_bytes", "lors_theoretical_bytes", "diff_backward"}:
        assert key in cli_inspect.__doc__, f"{key} is not documented"
    assert data["schema"] == "lors_fx.inspect/1" and data["theoretical"] is False
    assert set(data["model"]) == {"name", "source", "kind", "architecture", "parameters",
                                  "dtype", "meta"}
    assert set(data["pruning"]) == {"applied", "method", "sparsity", "pattern", "note"}
    assert set(data["sites"][0]) == {"fqn", "shape", "sparsity", "pattern", "rank", "grad_mode",
                                     "rewritten", "bits", "group_size", "quant_aware", "naive_saved_bytes", "lors_saved_bytes"}
    assert set(data["passes"][0]) == {"graph", "name", "count", "nodes_created", "nodes_erased",
                                      "seconds"}
    assert set(data["saved"]) == {"before_bytes", "after_bytes", "ratio", "before", "after",
                                  "naive_theoretical_bytes", "lors_theoretical_bytes"}
    assert set(data["saved"]["after"][0]) == {"graph", "name", "source", "shape", "dtype",
                                              "bytes", "kind", "view_of"}
    assert set(data["code"]) == {"forward", "backward", "diff_forward", "diff_backward"}
    assert data["model"]["architecture"] == "LlamaForCausalLM" and data["compiled"] is True
    assert data["pruning"]["applied"] is True and data["pruning"]["method"] == "magnitude"
    fqns = [s["fqn"] for s in data["sites"]]
    assert sorted(fqns) == sorted(_target_linears(build_tiny("tiny-llama")))
    assert all(s["rewritten"] and s["rank"] == 8 and s["pattern"] == "unstructured"
               and s["sparsity"] == 0.5 for s in data["sites"])
    saved = data["saved"]
    assert 0 < saved["after_bytes"] < saved["before_bytes"]
    assert saved["ratio"] == pytest.approx(saved["after_bytes"] / saved["before_bytes"])
    assert saved["lors_theoretical_bytes"] < saved["naive_theoretical_bytes"]
    site = data["sites"][0]  # q_proj 64x64 fp32: x = 24 tokens x 64 x 4 B
    assert site["lors_saved_bytes"] == 24 * 64 * 4
    assert site["naive_saved_bytes"] == 24 * 64 * 4 + 64 * 64 * 4 + 64 * 64
    assert data["graph_breaks"] == 0 and len(data["graphs"]) == 1
    assert data["step"] == {"batch": 2, "seq": 12, "tokens": 24}
    assert data["config"]["r"] == 8 and data["config"]["grad_mode"] == "lors"


def test_graph_views_forward_and_backward(full_run):
    code, out = full_run["data"]["code"], full_run["out"]
    assert code["forward"].count("torch.ops.lors.sparse_lora_linear.default(") == 14
    assert '"f32[2, 12, 64]"' in code["forward"]  # values annotated with dtype and shape
    assert code["backward"] in out  # --show graph --graph backward prints the backward
    assert "# graph 0: backward" in out and "def forward(self" in code["backward"]


def test_diff_views(full_run):
    forward = full_run["data"]["code"]["diff_forward"]
    assert forward.startswith("--- graph0/dynamo.before\n+++ graph0/dynamo.after")
    removed = [line for line in forward.splitlines() if line.startswith("-")]
    added = [line for line in forward.splitlines() if line.startswith("+")]
    assert sum("torch._C._nn.linear(" in line for line in removed) >= 14
    assert sum("torch.ops.lors.sparse_lora_linear.default(" in line for line in added) == 14
    backward = full_run["data"]["code"]["diff_backward"]
    assert "graph0/backward.naive" in backward and backward in full_run["out"]
    signatures = [line for line in backward.splitlines() if "def forward(self" in line]
    naive = [s for s in signatures if s.startswith("-")]
    lors = [s for s in signatures if s.startswith("+")]
    assert len(naive) == len(lors) == 1
    weight_shapes = set()
    for site in full_run["data"]["sites"]:
        d_out, d_in = site["shape"]
        weight_shapes |= {f"{d_out}, {d_in}", f"{d_in}, {d_out}"}

    def saved_dense(signature):  # backward inputs computed in forward with a weight's shape: W'
        entries = re.findall(r'(\w+): "\w+\[([0-9, ]*)\]"', signature)
        return [name for name, shape in entries if shape in weight_shapes
                and not name.startswith(("primals_", "tangents_"))]

    assert saved_dense(naive[0]) and saved_dense(lors[0]) == []


def test_forward_diff_reads_like_the_model(full_run):
    """Module paths, not dynamo's placeholders; the op under the model line that calls it; a
    header saying what was rewritten; all in the text view."""
    forward, out = full_run["data"]["code"]["diff_forward"], full_run["out"]
    assert "l_args_0_modules" not in forward and "l_self_modules" not in forward
    assert "_parameters_" not in forward and "= None" not in forward
    assert "model.layers.0.self_attn.q_proj.lora_A" in forward  # spelled as the model does
    lines = forward.splitlines()
    ops = [i for i, line in enumerate(lines)
           if "torch.ops.lors.sparse_lora_linear.default(" in line]
    assert len(ops) == 14
    for i in ops:  # the comment above each op: the model's call, not the replaced F.linear
        comment = next(line for line in reversed(lines[:i])
                       if "# File:" in line and not line.startswith("-"))
        assert "reference_sparse_lora_linear" not in comment and "ops.py" not in comment
        assert "self." in comment and "_proj(" in comment, comment
    text = cli_inspect.render(full_run["data"], ["diff"], "forward")
    header = _section(text, "# forward diff:", "--- graph0/dynamo.before")
    assert "# rewritten: 14 of 14 sites" in header
    assert "model.layers.[0-1].self_attn.q_proj" in header
    assert "rewrite_masked_adapters (graph 0): matched 14" in header
    assert forward in text
    assert _section(out, "# backward diff:", "--- graph0/backward.naive")  # --graph backward


def test_code_views_are_cut_to_the_terminal_width(full_run):
    data = full_run["data"]
    text = cli_inspect.render(data, ["summary", "diff", "graph"], "forward", width=72)
    code = text[text.index("# forward diff:"):]
    assert max(len(line) for line in code.splitlines()) == 72
    assert any(line.endswith("...") for line in code.splitlines())
    assert cli_inspect.render(data, ["diff"], "forward", width=0).count(
        data["code"]["diff_forward"]) == 1  # no terminal: whole lines


def test_terminal_width_from_columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", "91")
    assert cli_inspect.terminal_width() == 91
    monkeypatch.delenv("COLUMNS")
    assert cli_inspect.terminal_width() == 0  # pytest's stdout is no terminal


def test_theoretical_means_the_same_in_text_and_json(tmp_path):
    """--meta: the JSON says null where nothing was computed; the text shows '-' there and
    calls "theoretical" only the numbers the JSON calls theoretical."""
    result = cli_inspect.inspect_model("tiny-llama", meta=True, seq=12, progress=False)
    data = result.data
    assert data["passes"] is None and data["graphs"] is None and data["graph_breaks"] is None
    assert all(s["rewritten"] is None for s in data["sites"])
    assert set(data["code"].values()) == {None}
    text = cli_inspect.render(data, ["summary", "sites", "passes", "saved"], "forward")
    sites = _section(text, "sites: 14", "passes:")
    assert sites.startswith("sites: 14 (byte counts theoretical; rewritten: - (not compiled")
    rows = [row for row in sites.splitlines()[3:] if row.strip()]
    assert rows and all(" theoretical " not in row and re.search(r"\s-\s", row) for row in rows)
    assert "batch 2 x seq 12 (not run: --meta)" in text


def test_dot_file_is_a_valid_digraph_of_the_region(full_run):
    dot = full_run["dot"]
    assert dot.startswith("digraph")
    assert dot.count("{") == dot.count("}")
    assert "subgraph cluster_before" in dot and "subgraph cluster_after" in dot
    declared = set(re.findall(r"^\s+([ab]_\w+) \[", dot, re.M))
    edges = re.findall(r"^\s+([ab]_\w+) -> ([ab]_\w+);", dot, re.M)
    assert edges and all(a in declared and b in declared for a, b in edges)
    assert dot.count("fillcolor=palegreen") == 14  # one lors op per site after the rewrite
    assert dot.count("fillcolor=lightblue") == 14  # one annotated linear per site before
    labels = re.findall(r'label="([^"]*)"', dot)
    assert any(label.startswith("model.layers.0.self_attn.q_proj.lora_A\\n") for label in labels)
    assert not any("l_args_0_modules" in label for label in labels)  # ids may keep them


def test_pattern_2_4_exact_grad_mode_and_checkpoint(tmp_path):
    out_json = tmp_path / "nm.json"
    code, out, err = _main(["inspect", "tiny-llama", "--pattern", "2:4", "--grad-mode", "exact",
                            "--checkpoint", "block", "--seq", SEQ, "--r", "4", "--no-progress",
                            "--show", "sites", "--json", str(out_json)])
    assert code == 0, err
    data = json.loads(out_json.read_text())
    assert data["pruning"]["pattern"] == "2:4"
    assert len(data["sites"]) == 14
    assert all(s["pattern"] == "2:4" and s["grad_mode"] == "exact" and s["rewritten"]
               for s in data["sites"])
    assert len(re.findall(r"\s2:4\s+4\s+exact\s+yes", out)) == 14
    # block checkpointing: the joint-graph pass ran, and both forms save only the block inputs
    assert data["config"]["checkpoint"] == "block"
    names = [p["name"] for p in data["passes"]]
    assert names[-1] == "insert_checkpoints" and data["passes"][-1]["count"] > 0
    assert 0 < data["saved"]["after_bytes"] <= data["saved"]["before_bytes"]
    assert data["saved"]["after_bytes"] < data["saved"]["lors_theoretical_bytes"]


def test_already_sparse_local_directory_is_used_as_it_is(tmp_path):
    from lors_fx.testing.tiny_models import build_model

    pruned = build_model("qwen2", "2:4")
    pruned.save_pretrained(tmp_path / "pruned-qwen2")
    out_json = tmp_path / "dir.json"
    code, out, err = _main(["inspect", str(tmp_path / "pruned-qwen2"), "--seq", SEQ, "--r", "4",
                            "--no-progress", "--json", str(out_json)])
    assert code == 0, err
    assert "already sparse (mean sparsity 0.500 over 14 target linears): used as it is" in out
    data = json.loads(out_json.read_text())
    assert data["model"]["kind"] == "directory" and data["pruning"]["applied"] is False
    assert all(s["pattern"] == "2:4" and s["rewritten"] for s in data["sites"])


def _write_7b(tmp_path):
    path = tmp_path / "llama-2-7b.json"
    path.write_text(json.dumps(LLAMA_7B))
    return path


def test_meta_7b_config_is_theoretical_and_allocates_nothing(tmp_path):
    path = _write_7b(tmp_path)
    result = cli_inspect.inspect_model(str(path), meta=True, batch=1, seq=2048,
                                       dtype="bfloat16", progress=False)
    assert all(p.device.type == "meta" for p in result.model.parameters())
    assert all(b.device.type == "meta" for b in result.model.buffers())
    data = result.data
    assert data["theoretical"] is True and data["passes"] is None and data["graphs"] is None
    assert len(data["sites"]) == 7 * 32
    per_layer = {s["fqn"].split(".")[-1] for s in data["sites"] if ".layers.0." in s["fqn"]}
    assert per_layer == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"}
    q = next(s for s in data["sites"] if s["fqn"].endswith("layers.0.self_attn.q_proj"))
    x = 2048 * 4096 * 2
    assert q["lors_saved_bytes"] == x and q["naive_saved_bytes"] == x + 4096 * 4096 * 3
    saved = data["saved"]
    assert saved["after_bytes"] == saved["lors_theoretical_bytes"]
    assert saved["lors_theoretical_bytes"] < saved["naive_theoretical_bytes"]
    assert any("theoretical" in note for note in data["notes"])


def test_meta_7b_through_the_module_entry_point(tmp_path):
    path = _write_7b(tmp_path)
    env = dict(os.environ, TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-m", "lors_fx.cli.main", "inspect", str(path), "--meta",
                           "--show", "summary,sites", "--json", str(tmp_path / "7b.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "224 target linears (treated as pruned)" in done.stdout
    assert "meta device: no weights" in done.stdout and "theoretical" in done.stdout
    assert "model.layers.31.mlp.down_proj" in done.stdout
    data = json.loads((tmp_path / "7b.json").read_text())
    assert data["model"]["parameters"] > 6_000_000_000
    assert data["saved"]["after_bytes"] < data["saved"]["before_bytes"]


@pytest.mark.parametrize("extra, message", [
    (["no-such-model"], "unknown model 'no-such-model'"),
    (["tiny-llama", "--sparsity", "1.5"], "--sparsity: must be a number in (0, 1), got '1.5'"),
    (["tiny-llama", "--sparsity", "0.5", "--pattern", "2:4"], "give one of them"),
    (["tiny-llama", "--checkpoint", "sometimes"], "--checkpoint: expected none, block"),
    (["tiny-llama", "--pattern", "4:2"], "--pattern: expected N:M"),
    (["tiny-llama", "--r", "0"], "--r: must be an integer >= 1, got '0'"),
    (["tiny-llama", "--grad-mode", "sparse"], "--grad-mode: expected lors or exact"),
    (["tiny-llama", "--show", "summary,everything"], "--show: expected"),
    (["tiny-llama", "--meta", "--show", "graph"], "--meta: no graphs"),
])
def test_bad_arguments_exit_2_with_one_line(extra, message):
    code, out, err = _main(["inspect", *extra, "--no-progress"])
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("lors-fx inspect: error: ")
    assert message in err


def test_a_failure_exits_1_with_the_reason(tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"model_type": "no-such-architecture", "hidden_size": 8}))
    code, out, err = _main(["inspect", str(bogus), "--no-progress"])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("lors-fx inspect: error: ValueError: ")
    assert "no-such-architecture" in err


def test_help_lists_the_options():
    code, out, _ = _main(["inspect", "--help"])
    assert code == 0
    for option in ("--sparsity", "--pattern", "--grad-mode", "--checkpoint", "--show",
                   "--graph", "--dot", "--json", "--meta"):
        assert option in out

"""Evo 2 interop (`hyena-glt import-evo2`, `hyena-glt export-vortex`, launch/interop/evo2.py), checked
against Vortex itself (the Evo 2 inference engine, PyPI vtx 1.1.0) run on the CPU in fp32 by
tests/support/evo2_oracle.py.

For each of the seven published configs (tests/interop/evo2_configs), shrunk to a tiny model
with the config's own block order: random weights in the release format (one .pt file and
.partN pieces) -> `import-evo2` -> our logits on lambda phage DNA equal Vortex's to 1e-5 of the
logit scale; `export-vortex` of the imported model gives back the file's tensors and loads into
Vortex with the same logits; greedy cached generation agrees token for token with Vortex's own.
The tests that need no Vortex (config mapping, refusals, bad inputs, round trips through our
own export) run without it; the others are skipped, with the reason, when vtx cannot be imported
(and fail instead under HYENA_GLT_REQUIRE_VTX=1, which `make test` sets).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import genome_path, run_cli

from support import evo2_oracle as oracle
from launch.interop import evo2

L_LOGITS, L_PROMPT, N_NEW = 256, 128, 24
TOLERANCE = 1e-5  # max |ours - vortex| <= TOLERANCE * max |vortex|


run = run_cli  # `hyena-glt ARGS` in this process: (exit status, stdout, stderr)


def to_evo_logits(logits: torch.Tensor) -> torch.Tensor:
    """Our logits (..., V) in Evo 2's id order: Evo 2 id r is our row (r + 4) % V."""
    return torch.roll(logits, -4, dims=-1)


@pytest.fixture(scope="module")
def vortex(vortex_available) -> None:
    """Vortex is importable (imported on first use only). Without it: skipped with the reason,
    or failed under HYENA_GLT_REQUIRE_VTX=1 (`make test`); see conftest's vortex_available."""


@pytest.fixture(scope="module")
def dna() -> bytes:
    from data_tools.fasta import check_file, read_records

    path = genome_path("lambda_phage.fasta.gz")
    seq = next(read_records(path, lambda: check_file(path))).seq
    return seq[1000 : 1000 + L_LOGITS].upper()


@pytest.fixture(scope="module")
def evo_ids(dna) -> torch.Tensor:
    return torch.tensor(list(dna))[None]  # Evo 2 id = byte


class Case:
    """One published config, shrunk: its YAML, release files, Vortex model and logits, and
    our import of it (through the CLI)."""

    def __init__(self, name: str, root: Path, evo_ids: torch.Tensor, seed: int):
        self.name, self.root = name, root
        self.cfg = oracle.tiny_config(name)
        self.yml = oracle.write_config(self.cfg, root / f"{name}.yml")
        self.state = oracle.random_release_state(self.cfg, seed=seed)
        self.pt = root / f"{name}.pt"
        oracle.save_release(self.state, self.pt)
        (root / "parts").mkdir()
        self.parts = oracle.save_release(self.state, root / "parts" / f"{name}.pt", parts=3)
        self.vortex = oracle.build_vortex(self.cfg, self.state)
        self.ref = oracle.vortex_logits(self.vortex, evo_ids)
        self.imported = root / "imported"
        rc, out, err = run("import-evo2", self.pt, "--config", self.yml, self.imported)
        assert rc == 0, err
        assert "bos_token false" in out


@pytest.fixture(scope="module", params=oracle.CONFIG_NAMES)
def case(request, vortex, tmp_path_factory, evo_ids) -> Case:
    name = request.param
    return Case(name, tmp_path_factory.mktemp(name), evo_ids, seed=oracle.CONFIG_NAMES.index(name))


def rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------------------- against Vortex


def test_import_matches_vortex_logits(case, evo_ids):
    from hyena_glt import load_causal_lm

    assert torch.isfinite(case.ref).all() and case.ref.abs().max() > 0.5  # a well-conditioned oracle
    model = load_causal_lm(case.imported).eval()
    with torch.no_grad():
        ours = to_evo_logits(model(evo_ids + 4).logits)  # ids byte + 4, no BOS
    err = rel_error(ours, case.ref)
    print(f"{case.name}: max |ours - vortex| / max |vortex| = {err:.2e} (max |vortex| {case.ref.abs().max():.3f})")
    assert err <= TOLERANCE, f"{case.name}: relative logit error {err:.2e} > {TOLERANCE:g}"


def test_score_command_feeds_an_imported_model_raw_bytes(case, evo_ids, dna, tmp_path):
    """`hyena-glt score` (no BOS for bos_token false) gives Vortex's log-likelihood of bases 1..L-1."""
    fa = tmp_path / "x.fa"
    fa.write_text(">x\n" + dna.decode() + "\n")
    rc, _, err = run("score", "--model", case.imported, "--input", fa, "--out", tmp_path / "s.tsv", "--chunk-size", "64")
    assert rc == 0, err
    ours = float((tmp_path / "s.tsv").read_text().splitlines()[1].split("\t")[2])
    logp = torch.log_softmax(case.ref.double(), -1)[0, :-1].gather(-1, evo_ids[0, 1:, None]).sum()
    assert abs(ours - float(logp)) <= 1e-4 * abs(float(logp))


def test_import_from_part_pieces_is_the_same(case, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "from_parts"
    rc, _, err = run("import-evo2", case.parts[0].with_name(f"{case.name}.pt"), "--config", case.yml, out)
    assert rc == 0, err
    a, b = load_file(out / "model.safetensors"), load_file(case.imported / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "config.json").read_text() == (case.imported / "config.json").read_text()
    assert not list(tmp_path.glob(".*")), "the joined temporary file was not removed"


def test_export_restores_the_file_and_runs_in_vortex(case, tmp_path, evo_ids):
    out_pt, out_yml = tmp_path / "export.pt", tmp_path / "export.yml"
    rc, _, err = run("export-vortex", case.imported, out_pt, "--config-out", out_yml)
    assert rc == 0, err
    exported = oracle.load_release(out_pt)
    original = {k: v for k, v in case.state.items() if not k.endswith("._extra_state")}
    assert exported.keys() == original.keys()
    for k, v in original.items():
        if k.endswith("log_poles"):  # lambda -> log(-lambda) -> lambda: within float rounding
            torch.testing.assert_close(exported[k], v, rtol=1e-6, atol=0)
        else:  # a bijection: bit for bit (embedding rows, flipped taps, identities)
            assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k

    evo_cfg = yaml.safe_load(out_yml.read_text())
    published = oracle.published_config(case.name)
    assert set(published) <= set(evo_cfg), f"fields missing: {sorted(set(published) - set(evo_cfg))}"
    assert evo2.config_from_evo2(evo_cfg) == evo2.config_from_evo2(case.cfg)
    logits = oracle.vortex_logits(oracle.build_vortex(evo_cfg, exported), evo_ids)
    assert rel_error(logits, case.ref) <= TOLERANCE  # only the poles moved (~5e-7 relative)


def test_cached_generation_matches_vortex(case, evo_ids):
    from hyena_glt import load_causal_lm

    prompt = evo_ids[:, :L_PROMPT]
    vortex_new, _ = oracle.vortex_generate(case.vortex, prompt, N_NEW)
    model = load_causal_lm(case.imported).eval()
    ours = model.generate(prompt + 4, N_NEW, temperature=0)  # the inference cache: prefill, then steps
    ours_new = ours[:, L_PROMPT:] - 4
    assert ours_new.tolist() == vortex_new.tolist()


@pytest.mark.parametrize("change", [
    {"mha_out_proj_bias": False, "hyena_out_proj_bias": False},  # no output biases in the file
    {"evo2_style_activations": False, "mlp_activation": "silu"},  # one activation in every MLP
    {"inner_mlp_size": None},  # Vortex's default MLP width
], ids=["no-out-bias", "silu-everywhere", "default-mlp-width"])
def test_config_variants_match_vortex(change, vortex, tmp_path, evo_ids):
    from hyena_glt import load_causal_lm

    cfg = oracle.tiny_config("evo2-7b-8k", **change)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    yml = oracle.write_config(cfg, tmp_path / "c.yml")
    state = oracle.random_release_state(cfg, seed=11)
    oracle.save_release(state, tmp_path / "m.pt")
    ref = oracle.vortex_logits(oracle.build_vortex(cfg, state), evo_ids)
    rc, _, err = run("import-evo2", tmp_path / "m.pt", "--config", yml, tmp_path / "out")
    assert rc == 0, err
    model = load_causal_lm(tmp_path / "out").eval()
    with torch.no_grad():
        assert rel_error(to_evo_logits(model(evo_ids + 4).logits), ref) <= TOLERANCE


@pytest.mark.parametrize("case", ["evo2-7b-262k"], indirect=True)
def test_the_oracle_catches_each_difference(case, evo_ids):
    """Leaving out any one bridge between the two models must fail the 1e-5 check by far."""
    from hyena_glt import HyenaGLTConfig, build_causal_lm

    cfg = evo2.config_from_evo2(case.cfg)
    ours = evo2.evo2_to_ours(case.state, cfg)

    def error(changes=None, tensors=None):
        model = build_causal_lm(HyenaGLTConfig(**{**cfg.model_dump(), **(changes or {})}), initialize=False)
        model.load_state_dict({**ours, **(tensors or {})}, strict=False)
        with torch.no_grad():
            return rel_error(to_evo_logits(model.eval()(evo_ids + 4).logits), case.ref)

    assert error() <= TOLERANCE
    skips = {f"model.layers.{i}.mixer.filter.skip": torch.ones(64) for i in (0, 4, 7)}
    for changes, tensors in [
        ({"norm_eps_placement": "inside"}, None),
        ({"rope_position_scale": 1.0}, None),
        ({"first_mlp_activation": None}, None),
        ({"medium_decay": True}, None),
        ({"short_filter_skip": True}, skips),
        (None, {k: v.flip(-1) for k, v in ours.items() if k.endswith("featurizer.weight")}),
        (None, {k: v.flip(-1) for k, v in ours.items() if k == "model.layers.0.mixer.filter.weight"}),
    ]:
        assert error(changes, tensors) > 100 * TOLERANCE, (changes, list(tensors or {})[:1])


# ---------------------------------------------------------------------------- config mapping


@pytest.mark.parametrize("name", oracle.CONFIG_NAMES)
def test_published_configs_map_both_ways(name):
    pub = oracle.published_config(name)
    cfg = evo2.config_from_evo2(pub)
    kinds = {i: c for f, c in evo2.layer_field_codes().items() for i in pub[f]}
    assert cfg.pattern == "".join(kinds[i] for i in range(pub["num_layers"]))
    assert (cfg.d_model, cfg.num_heads, cfg.mlp_hidden, cfg.num_filter_groups, cfg.vocab_size) == (
        pub["hidden_size"], pub["num_attention_heads"], pub["inner_mlp_size"], pub["hcs_filter_groups"], 512)
    assert (cfg.first_mlp_activation, cfg.mlp_activation) == ("gelu", "identity")
    assert (cfg.norm_eps_placement, cfg.medium_decay, cfg.short_filter_skip, cfg.mixer_out_bias) == (
        "outside", False, False, True)
    assert cfg.rope_base == pub["rotary_emb_base"]
    assert cfg.rope_position_scale == {"262k": 32, "1m": 128}.get(name.rsplit("-", 1)[1], 1)
    back = evo2.config_to_evo2(cfg, pub["model_name"])
    width_defaults = {"inner_size_multiple_of", "model_parallel_size"}  # only used when inner_mlp_size is absent
    for field in sorted(evo2.MODEL_FIELDS & set(pub) - width_defaults):
        assert back[field] == pub[field], field
    assert set(pub) <= set(back)


@pytest.mark.parametrize("change, message", [
    ({"hyena_flip_x1x2": True}, "hyena_flip_x1x2: True"),
    ({"qkv_proj_bias": True}, "qkv_proj_bias: True"),
    ({"qkv_proj_bias": None}, "qkv_proj_bias: absent (Vortex default True)"),
    ({"proj_groups": 2}, "proj_groups: 2"),
    ({"column_split_hyena": True}, "column_split_hyena: True"),
    ({"hcm_filter_groups": 128}, "hcs_filter_groups (256) != hcm_filter_groups (128)"),
    ({"mlp_activation": "relu"}, "mlp_activation: 'relu'"),
    ({"hyena_out_proj_bias": False}, "mha_out_proj_bias (True) != hyena_out_proj_bias (False)"),
    ({"attn_layer_idxs": [3, 10, 17, 24]}, "layers [31] are in none of"),
    ({"attn_layer_idxs": [3, 10, 17, 24, 31, 0]}, "attn_layer_idxs: layer 0 is also listed"),
    ({"brand_new_switch": 1}, "unknown field(s) ['brand_new_switch']"),
    ({"hidden_size": 4000}, "num_filters: 4096 must divide hidden_size=4000"),
])
def test_config_refusals_name_the_field(change, message):
    pub = oracle.published_config("evo2-7b-8k")
    for k, v in change.items():
        if v is None:
            pub.pop(k)
        else:
            pub[k] = v
    with pytest.raises(ValueError) as e:
        evo2.config_from_evo2(pub)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_export_refuses_what_evo2_cannot_express(tmp_path):
    from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM

    cfg = HyenaGLTConfig(pattern="SDH*", d_model=64, num_heads=4, num_filter_groups=4, vocab_size=512,
                         motif_branch=True, mlp_activation="identity")
    HyenaGLTForCausalLM(cfg).save_pretrained(tmp_path / "m")
    rc, _, err = run("export-vortex", tmp_path / "m", tmp_path / "x.pt")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for option in ("norm_eps_placement='inside'", "medium_decay=True", "short_filter_skip=True",
                   "motif_branch=True", "mlp_activation='identity'"):
        assert option in err, err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "x.yml").exists()


def test_full_size_shapes_7b():
    """The shapes import-evo2 expects of a full evo2-7b-8k file: those of the released weights
    (measured: docs/evo2.md)."""
    cfg = evo2.config_from_evo2(oracle.published_config("evo2-7b-8k"))
    shapes = evo2.expected_evo_shapes(cfg, evo2.tensor_rules(cfg))
    D, F = 4096, 11008
    assert len(shapes) == 2 + 32 * 5 + 9 * 5 + 9 * 6 + 9 * 7 + 5 * 4  # model; per block; S, D, H, attention
    assert shapes["embedding_layer.weight"] == (512, D) and shapes["norm.scale"] == (D,)
    assert shapes["blocks.0.filter.short_filter_weight"] == (3 * D, 1, 3)
    assert shapes["blocks.0.projections.weight"] == (3 * D, D)
    assert shapes["blocks.0.filter.h"] == (256, 1, 7) and "blocks.0.filter.D" not in shapes
    assert shapes["blocks.1.filter.h"] == (256, 1, 128) and shapes["blocks.1.filter.D"] == (D,)
    assert shapes["blocks.2.filter.log_poles"] == (D, 16, 1) and shapes["blocks.2.filter.residues"] == (D, 16)
    assert shapes["blocks.2.out_filter_dense.weight"] == (D, D) and shapes["blocks.2.out_filter_dense.bias"] == (D,)
    assert shapes["blocks.3.inner_mha_cls.Wqkv.weight"] == (3 * D, D)
    assert shapes["blocks.3.inner_mha_cls.out_proj.bias"] == (D,)
    assert shapes["blocks.3.inner_mha_cls.rotary_emb.inv_freq"] == (64,)
    assert shapes["blocks.31.mlp.l1.weight"] == (F, D) and shapes["blocks.31.mlp.l3.weight"] == (D, F)


# ---------------------------------------------------------------------------- without Vortex


def evo2_style_model(tmp_path: Path, name="evo2-7b-262k", **changes):
    """A random hyena-glt model with a tiny Evo 2 config (from our own config mapping)."""
    from hyena_glt import HyenaGLTConfig, HyenaGLTForCausalLM

    cfg = evo2.config_from_evo2(oracle.tiny_config(name))
    cfg = HyenaGLTConfig(**{**cfg.model_dump(), **changes})
    model = HyenaGLTForCausalLM(cfg).eval()
    with torch.no_grad():  # every parameter away from its init constant (skips start at 1, biases at 0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


def test_export_import_round_trip_without_vortex(tmp_path, evo_ids):
    from hyena_glt import load_causal_lm

    model, src = evo2_style_model(tmp_path)
    rc, _, err = run("export-vortex", src, tmp_path / "e.pt", "--dtype", "bfloat16")
    assert rc == 0, err
    bf16 = oracle.load_release(tmp_path / "e.pt")  # as the releases: bf16 but for poles and residues
    assert bf16["blocks.2.filter.log_poles"].dtype == torch.float32
    assert bf16["blocks.0.mlp.l1.weight"].dtype == torch.bfloat16
    rc, _, err = run("import-evo2", tmp_path / "e.pt", "--config", tmp_path / "e.yml", tmp_path / "bf16")
    assert rc == 0, err
    rc, _, err = run("export-vortex", tmp_path / "bf16", tmp_path / "e2.pt")  # dtypes kept as imported
    assert rc == 0, err
    again = oracle.load_release(tmp_path / "e2.pt")
    for k, v in bf16.items():
        assert again[k].dtype == v.dtype, k
        if not k.endswith("log_poles"):
            assert torch.equal(again[k], v), k
    rc, _, err = run("export-vortex", src, tmp_path / "f.pt")
    assert rc == 0, err
    rc, _, err = run("import-evo2", tmp_path / "f.pt", "--config", tmp_path / "f.yml", tmp_path / "back")
    assert rc == 0, err
    back = load_causal_lm(tmp_path / "back").eval()
    assert back.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(back(evo_ids + 4).logits, model(evo_ids + 4).logits, rtol=0, atol=1e-5)
    # and once more: export(import(x)) == x, tensor for tensor
    rc, _, err = run("export-vortex", tmp_path / "back", tmp_path / "g.pt")
    assert rc == 0, err
    f, g = oracle.load_release(tmp_path / "f.pt"), oracle.load_release(tmp_path / "g.pt")
    assert f.keys() == g.keys()
    for k in f:
        if k.endswith("log_poles"):
            torch.testing.assert_close(g[k], f[k], rtol=1e-6, atol=0)
        else:
            assert torch.equal(g[k], f[k]), k


def test_export_without_output_bias_writes_zeros(tmp_path, evo_ids):
    from hyena_glt import load_causal_lm

    model, src = evo2_style_model(tmp_path, mixer_out_bias=False)
    rc, _, err = run("export-vortex", src, tmp_path / "e.pt")
    assert rc == 0, err
    state = oracle.load_release(tmp_path / "e.pt")
    assert torch.equal(state["blocks.0.out_filter_dense.bias"], torch.zeros(64))
    assert torch.equal(state["blocks.3.inner_mha_cls.out_proj.bias"], torch.zeros(64))
    rc, _, err = run("import-evo2", tmp_path / "e.pt", "--config", tmp_path / "e.yml", tmp_path / "back")
    assert rc == 0, err
    back = load_causal_lm(tmp_path / "back").eval()
    assert back.config.mixer_out_bias and not model.config.mixer_out_bias
    with torch.no_grad():
        torch.testing.assert_close(back(evo_ids + 4).logits, model(evo_ids + 4).logits, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- bad inputs


@pytest.fixture
def release(tmp_path):
    """A valid tiny release (.pt, .part0..2, its YAML) written through our own export."""
    _, src = evo2_style_model(tmp_path, name="evo2-7b-8k")
    rc, _, err = run("export-vortex", src, tmp_path / "m.pt")
    assert rc == 0, err
    state = oracle.load_release(tmp_path / "m.pt")
    (tmp_path / "parts").mkdir()
    oracle.save_release(dict(state), tmp_path / "parts" / "m.pt", parts=3)
    return tmp_path, state


def _truncate(root, state):
    data = (root / "m.pt").read_bytes()
    (root / "m.pt").write_bytes(data[: len(data) // 2])
    return root / "m.pt", root / "m.yml"


def _missing_part(root, state):
    (root / "parts" / "m.pt.part1").unlink()
    return root / "parts" / "m.pt", root / "m.yml"


def _hidden_size(root, state):
    cfg = yaml.safe_load((root / "m.yml").read_text())
    cfg.update(hidden_size=128, num_filters=128, hcl_filter_groups=128, num_attention_heads=8)
    (root / "big.yml").write_text(yaml.safe_dump(cfg))
    return root / "m.pt", root / "big.yml"


def _positive_pole(root, state):
    state["blocks.2.filter.log_poles"][5, 3, 0] = 0.25
    oracle.save_release(state, root / "m.pt")
    return root / "m.pt", root / "m.yml"


def _unknown_key(root, state):
    state["blocks.2.filter.extra_taps"] = torch.zeros(3)
    oracle.save_release(state, root / "m.pt")
    return root / "m.pt", root / "m.yml"


def _missing_key(root, state):
    del state["blocks.1.filter.D"]
    oracle.save_release(state, root / "m.pt")
    return root / "m.pt", root / "m.yml"


def _wrong_rope_base(root, state):
    cfg = yaml.safe_load((root / "m.yml").read_text())
    cfg["rotary_emb_base"] = 1000000
    (root / "rope.yml").write_text(yaml.safe_dump(cfg))
    return root / "m.pt", root / "rope.yml"


def _refused_config(root, state):
    cfg = yaml.safe_load((root / "m.yml").read_text())
    cfg["hyena_flip_x1x2"] = True
    (root / "flip.yml").write_text(yaml.safe_dump(cfg))
    return root / "m.pt", root / "flip.yml"


def _not_a_checkpoint(root, state):
    (root / "m.pt").write_text("hello")
    return root / "m.pt", root / "m.yml"


@pytest.mark.parametrize("damage, message", [
    (_truncate, "cannot be read as a torch.save checkpoint (truncated or corrupt?)"),
    (_missing_part, "part file(s) m.pt.part1 missing"),
    (_hidden_size, "embedding_layer.weight: shape (512, 64) in the file, (512, 128) from the config"),
    (_positive_pole, "blocks.2.filter.log_poles: 1 of 1024 poles are not negative (largest 0.25)"),
    (_unknown_key, "unknown key blocks.2.filter.extra_taps"),
    (_missing_key, "missing key blocks.1.filter.D"),
    (_wrong_rope_base, "blocks.3.inner_mha_cls.rotary_emb.inv_freq: does not match rotary_emb_base=1e+06"),
    (_refused_config, "hyena_flip_x1x2: True means the Hyena gate and key projections are swapped; "
                      "hyena-glt needs False"),
    (_not_a_checkpoint, "cannot be read as a torch.save checkpoint"),
], ids=["truncated", "missing-part", "hidden-size", "positive-pole", "unknown-key", "missing-key",
        "rope-base", "refused-field", "not-a-checkpoint"])
def test_bad_inputs_are_one_line_and_write_nothing(release, damage, message):
    root, state = release
    ckpt, yml = damage(root, state)
    before = sorted(p.name for p in root.iterdir())
    rc, out, err = run("import-evo2", ckpt, "--config", yml, root / "out")
    assert rc == 2, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("hyena-glt import-evo2: error: ") and message in err, err
    assert not (root / "out").exists()
    assert sorted(p.name for p in root.iterdir()) == before  # no temporary files left behind


def test_import_refuses_a_non_empty_out_dir(release):
    root, _ = release
    (root / "out").mkdir()
    (root / "out" / "keep.txt").write_text("mine")
    rc, _, err = run("import-evo2", root / "m.pt", "--config", root / "m.yml", root / "out")
    assert rc == 2 and "already exists and is not empty" in err
    assert [p.name for p in (root / "out").iterdir()] == ["keep.txt"]
